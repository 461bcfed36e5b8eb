"""``python -m export``: GPTMeg (or GPT-2) checkpoint -> ONNX folder with its fp32 islands, checked and validated."""

from __future__ import annotations

import argparse

from rich.console import Console

from gptmeg import CheckpointError

from .api import DTYPES, ContractBroken, ExportError, ValidationFailed, default_output_dir, export_model
from .onnx_export import DEFAULT_OPSET
from .report import contract_table, verification_table
from .staging import OutputExistsError, OutputNotWritableError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description=(
            "Export GPTMeg to ONNX: one decoder with a KV cache (prefill and decode), fp32 LayerNorm/GELU/"
            "attention-score islands kept in fp16 exports, checked against the precision plan and validated "
            "in onnxruntime against the eager model. Without --model, exports the built-in tiny model."
        ),
    )
    parser.add_argument("--model", metavar="DIR", help="GPTMeg or GPT-2 checkpoint folder (default: built-in tiny model)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: exports/<model name>-<dtype>)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="precision of the graph (default fp16)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= 17 (default {DEFAULT_OPSET})")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-validate", action="store_true", help="skip the onnxruntime-vs-eager validation")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu",
        help="where validation runs: eager reference and onnxruntime provider (default cpu)",
    )
    parser.add_argument("--external-data", action="store_true",
                        help="store the weights in model.onnx.data (automatic for models over 2 GB)")
    parser.add_argument("--quiet", action="store_true", help="print only errors and the output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, quiet=args.quiet, soft_wrap=True)
    out = args.out or default_output_dir(args.model, args.dtype)

    def step(description: str):
        return console.status(f"{description}...")

    try:
        result = export_model(
            args.model, out, dtype=args.dtype, opset=args.opset, force=args.force,
            validate=not args.no_validate, device=args.device, external_data=args.external_data or None, step=step,
        )
    except ContractBroken as error:
        console.print(contract_table(error.report, only_broken=True))
        console.print(f"[red]error:[/] {error}\nNothing was written to {out}.", highlight=False)
        return 1
    except ValidationFailed as error:
        console.print(verification_table(error.report))
        console.print(f"[red]error:[/] {error}\nNothing was written to {out}.", highlight=False)
        return 1
    except (ExportError, CheckpointError, OutputExistsError, OutputNotWritableError) as error:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {error}", highlight=False)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True, soft_wrap=True).print(f"interrupted; nothing was written to {out}.")
        return 130

    console.print(contract_table(result.contract))
    if result.verification is not None:
        console.print(verification_table(result.verification))
    files = sorted(p.name for p in result.folder.iterdir())
    console.print(f"wrote {result.folder}/ in {result.seconds:.1f}s: {', '.join(files)}", highlight=False)
    print(result.folder)
    return 0
