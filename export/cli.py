"""``python -m export``: GPTMeg (or GPT-2) checkpoint -> ONNX folder with its fp32 islands, checked and validated."""

from __future__ import annotations

import argparse

from pathlib import Path

from rich.console import Console
from rich.text import Text

from .errors import ExportError
from .manifest import is_export_folder
from .opsets import DEFAULT_OPSET, MIN_OPSET, check_opset, max_opset
from .report import contract_table, verification_table
from safeio.staging import OutputExistsError, OutputNotWritableError, check_writable
from safeio.terminal import interrupt_exit_code, print_error, print_plain, termination_as_interrupt

DTYPE_CHOICES = ("fp16", "fp32")

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
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp16", help="precision of the graph (default fp16)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX opset, {MIN_OPSET}..{max_opset()} here (default {DEFAULT_OPSET})")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output folder, if it is an earlier export (never any other folder)")
    parser.add_argument("--allow-incomplete-checkpoint", action="store_true",
                        help="export even when the checkpoint lacks tensors of the model (they get random values)")
    parser.add_argument("--no-validate", action="store_true", help="skip the onnxruntime-vs-eager validation")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu",
        help="where validation runs: eager reference and onnxruntime provider (default cpu)",
    )
    parser.add_argument("--external-data", action="store_true",
                        help="store the weights in model.onnx.data (automatic for models over 2 GB)")
    parser.add_argument("--quiet", action="store_true", help="print only errors and the output folder")
    return parser


def _preflight(args) -> None:
    """The checks that need no torch, so that a wrong flag or a refused --out is answered at once (the export
    repeats them where it matters, right before writing)."""
    check_opset(args.opset)
    if args.model is not None and not Path(args.model).is_dir():
        raise ValueError(f"{args.model!r} is not a directory. Pass a local GPTMeg or GPT-2 checkpoint folder.")
    if args.out is not None:
        protected = [Path(args.model)] if args.model is not None else []
        check_writable(Path(args.out), args.force, marker=is_export_folder, protected=protected)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, quiet=args.quiet, soft_wrap=True)
    errors = Console(stderr=True, soft_wrap=True)
    try:
        _preflight(args)
    except (ValueError, ExportError, OutputExistsError, OutputNotWritableError) as error:
        print_error(errors, str(error))
        return 2

    from gptmeg import CheckpointError  # torch and transformers load here, after the instant checks

    from .api import ContractBroken, ValidationFailed, default_output_dir, export_model

    out = args.out or default_output_dir(args.model, args.dtype)

    def step(description: str):
        return console.status(Text(f"{description}..."))

    try:
        with termination_as_interrupt():
            result = export_model(
                args.model, out, dtype=args.dtype, opset=args.opset, force=args.force,
                validate=not args.no_validate, device=args.device, external_data=args.external_data or None,
                allow_incomplete=args.allow_incomplete_checkpoint, step=step,
            )
    except ContractBroken as error:
        console.print(contract_table(error.report, only_broken=True))
        print_error(errors, f"{error}\nNothing was written to {out}.")
        return 1
    except ValidationFailed as error:
        console.print(verification_table(error.report))
        print_error(errors, f"{error}\nNothing was written to {out}.")
        return 1
    except (ExportError, CheckpointError, OutputExistsError, OutputNotWritableError) as error:
        print_error(errors, str(error))
        return 2
    except KeyboardInterrupt as error:
        if getattr(error, "committed", False):
            print_plain(errors, f"interrupted after {out} was written in full; it is complete.")
        else:
            print_plain(errors, f"interrupted; {out} was not changed and nothing was left behind.")
        return interrupt_exit_code(error)

    console.print(contract_table(result.contract))
    if result.verification is not None:
        console.print(verification_table(result.verification))
    for note in result.notes:
        print_plain(errors, f"note: {note}", style="yellow")
    files = sorted(p.name for p in result.folder.iterdir())
    print_plain(console, f"wrote {result.folder}/ in {result.seconds:.1f}s: {', '.join(files)}")
    print(result.folder)
    return 0
