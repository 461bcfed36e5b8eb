"""``python -m gptmeg.convert SRC OUT``: a Megatron-LM / Megatron-DeepSpeed checkpoint -> a GPTMeg checkpoint folder.

SRC may be the save folder (its tracker file names the iteration) or one iteration's folder. OUT gets
model.safetensors, config.json (model_type gptmeg, Megatron's numerics flags under "megatron"),
generation_config.json, the tokenizer (--tokenizer DIR, or tokenizer files found in SRC) and conversion.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from safeio.staging import OutputExistsError, OutputNotWritableError, check_writable
from safeio.terminal import interrupt_exit_code, print_error, print_plain, termination_as_interrupt

from .checkpoint import CheckpointError
from .megatron import convert, is_conversion_folder, save_conversion

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gptmeg.convert",
        description="Convert a Megatron-LM or Megatron-DeepSpeed GPT checkpoint (legacy mp_rank folders, DeepSpeed "
                    "pipeline layer files, non-pipeline DeepSpeed, universal) into a GPTMeg checkpoint folder. The "
                    "checkpoint's pickles are read with an allowlist: no code from them runs.",
    )
    parser.add_argument("src", metavar="SRC", help="the Megatron save folder, or one iteration's folder")
    parser.add_argument("out", metavar="OUT", help="the GPTMeg checkpoint folder to write")
    parser.add_argument("--iteration", default=None, help="iteration to convert (default: the tracker's latest)")
    parser.add_argument("--tokenizer", metavar="DIR", default=None,
                        help="folder with the tokenizer files to include (default: tokenizer files found in SRC)")
    parser.add_argument("--trim-vocab", action="store_true",
                        help="drop the rows Megatron padded the vocabulary with (default: keep them, never emit them)")
    parser.add_argument("--qkv-layout", choices=["auto", "per-head", "blocks", "per-head-hn3"], default="auto",
                        help="QKV row order of one tensor-parallel partition: auto (from checkpoint_version), "
                             "per-head [heads,3,d] (versions 2.0/3.0), blocks [3,heads,d] (version 0, and "
                             "Megatron-DeepSpeed after its 2024-12 FPDT change), per-head-hn3 [heads,d,3] (1.0)")
    parser.add_argument("--tp-replicated", choices=["first", "average"], default="first",
                        help="replicated tensors that differ across TP ranks: rank 0's copy or the mean")
    parser.add_argument("--numerics", choices=["gptmeg", "megatron-exact"], default="gptmeg",
                        help="fp16 numerics plan of the converted model: gptmeg (GPTMeg's three divergences, the "
                             "default) or megatron-exact (also Megatron's query-key layer scaling with the "
                             "checkpoint's coefficient scheme, fp32 softmax, fused bias adds and fp32 residuals, as "
                             "its args record them; config field megatron_numerics)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it is an earlier conversion")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    out, src = Path(args.out), Path(args.src)
    try:
        if not src.is_dir():
            raise ValueError(f"{src} is not a folder. Pass the Megatron save folder.")
        check_writable(out, args.force, marker=is_conversion_folder, protected=[src], what="a conversion",
                       option="OUT")  # before reading gigabytes
    except (ValueError, OutputExistsError, OutputNotWritableError) as error:
        print_error(console, str(error))
        return 2

    try:
        with termination_as_interrupt(), console.status("converting") as status:
            conversion = convert(src, iteration=args.iteration, tokenizer_dir=args.tokenizer, lazy=True,
                                 trim_vocab=args.trim_vocab, qkv_layout=args.qkv_layout,
                                 tp_replicated=args.tp_replicated, progress=status.update,
                                 numerics=args.numerics)
            status.update(f"writing {out}")
            save_conversion(conversion, out, force=args.force, protected=[src])
    except (CheckpointError, OutputExistsError, OutputNotWritableError) as error:
        print_error(console, str(error))
        return 2
    except OSError as error:
        print_error(console, f"could not write {out}: {error.strerror or error}. Nothing was written.")
        return 2
    except KeyboardInterrupt as error:
        print_plain(console, f"interrupted; {out} was not changed.")
        return interrupt_exit_code(error)
    record = conversion.record
    print_plain(console, f"{record['layout']} checkpoint, iteration {record['iteration']}, checkpoint_version "
                         f"{record['checkpoint_version']}, TP={record['tensor_parallel']} PP="
                         f"{record['pipeline_parallel']}: {conversion.config.n_layer} layers, width "
                         f"{conversion.config.n_embd}, {record['vocab_rows_kept']} vocabulary rows "
                         f"(original {record['original_vocab_size']}), activation "
                         f"{conversion.config.activation_function}, numerics {record['numerics_plan']}")
    for note in conversion.notes:
        print_plain(console, f"note: {note}", style="yellow")
    if conversion.tokenizer is None:
        print_plain(console, "note: no tokenizer was given or found; pass --tokenizer DIR to include one.",
                    style="yellow")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
