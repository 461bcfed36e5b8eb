"""Converting a Megatron checkpoint: wall time and peak memory of ``python -m gptmeg.convert`` on a
GPT-2-medium-sized (24 layers x 1024, 16 heads, vocab 50257 padded to 50432) TP=2 PP=2 synthetic Megatron-LM
checkpoint, with the time and memory of just reading every shard (``torch.load``, all tensors touched) beside it.

Each measurement is a fresh subprocess (peak RSS = its ru_maxrss); median of --repeats. Goal (issue #10): peak RSS
under 2x the fp16 model size plus one layer's shards.

    .venv/bin/python -m benchmarks.convert_bench [--repeats 3] [--work DIR]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks.common import machine, measure_subprocess, median, repeats_and_workspace

MEDIUM = dict(hidden=1024, heads=16, ffn=4096, layers=24, max_pos=1024, orig_vocab=50257, divisible_by=128, tp=2,
              pp=2)
READ_ALL = """
import sys, torch
from pathlib import Path
total = 0
for path in sorted(Path(sys.argv[1]).rglob("*.pt")):
    state = torch.load(path, map_location="cpu", weights_only=False)
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += float(item.float().sum()) * 0  # touch every element
        elif isinstance(item, dict):
            stack.extend(item.values())
"""


def synthetic_checkpoint(folder: Path) -> tuple[Path, int, int]:
    """(the checkpoint, fp16 model bytes, bytes of one block's shards over all TP ranks), written once."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import megatron_synth as ms

    dims = ms.Dims(**MEDIUM)
    h, f, v, p = dims.hidden, dims.ffn, dims.padded_vocab, dims.max_pos
    block = 2 * (4 * h * h + 2 * h * f + 9 * h + f)  # fp16 bytes: qkv, dense, h_to_4h, 4h_to_h, biases, 2 LayerNorms
    model = dims.layers * block + 2 * (v * h + p * h + 2 * h)
    if not (folder / "latest_checkpointed_iteration.txt").is_file():
        # preexisting wrappers of the generator may import numpy RNG etc.; the generator is the tests' oracle
        with ms.megatron_enums_module():
            ms.write_megatron_lm(folder, ms.canonical_weights(dims), dims, version=3.0)
    return folder, model, block


def main() -> None:
    with repeats_and_workspace(__doc__, "convert") as (args, work):
        print(f"machine: {machine()}")
        started = time.perf_counter()
        src, model_bytes, block_bytes = synthetic_checkpoint(work / "megatron-medium-tp2-pp2")
        print(f"synthetic checkpoint ready in {time.perf_counter() - started:.0f} s; fp16 model {model_bytes / 2**30:.2f} "
              f"GiB, one block's shards {block_bytes / 2**20:.0f} MiB; goal: peak RSS < "
              f"{(2 * model_bytes + block_bytes) / 2**30:.2f} GiB", flush=True)
        rows = {"read every shard (torch.load)": [sys.executable, "-c", READ_ALL, str(src)],
                "python -m gptmeg.convert": [sys.executable, "-m", "gptmeg.convert", str(src), str(work / "out"),
                                             "--force"]}
        print(f"| step | wall time (median of {args.repeats}) | runs (s) | peak RSS (max) |")
        print("| --- | --- | --- | --- |")
        for name, argv in rows.items():
            times, peaks = zip(*(measure_subprocess(argv) for _ in range(args.repeats)))
            print(f"| {name} | {median(times):.1f} s | {', '.join(f'{t:.1f}' for t in times)} | {max(peaks):.2f} GiB |",
                  flush=True)


if __name__ == "__main__":
    main()
