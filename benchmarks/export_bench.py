"""Export time and peak memory of a GPT-2-small-sized GPTMeg (12 x 768, vocab 50257, random weights).

Each export runs `python -m export --no-validate` in a fresh subprocess; wall time is measured around it and peak
RSS is the child's ru_maxrss. Median of --repeats runs per dtype. Goal (issue #3): < 60 s and < 4 GB on the
2-core CPU machine.

    .venv/bin/python -m benchmarks.export_bench [--repeats 3] [--work DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.common import gpt2_small_checkpoint, machine, measure_subprocess, median, repeats_and_workspace


def run_once(model: Path, out: Path, dtype: str) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of one export subprocess."""
    return measure_subprocess([sys.executable, "-m", "export", "--model", str(model), "--out", str(out), "--dtype",
                               dtype, "--no-validate", "--force", "--quiet"])


def main() -> None:
    with repeats_and_workspace(__doc__, "export") as (args, work):
        model = gpt2_small_checkpoint(work / "gpt2-small-random")
        print(f"machine: {machine()}")
        print("| dtype | export wall time (median of %d) | runs | peak RSS (max) | model.onnx size |" % args.repeats)
        print("| --- | --- | --- | --- | --- |")
        for dtype in ("fp32", "fp16"):
            times, peaks = [], []
            for _ in range(args.repeats):
                seconds, peak = run_once(model, work / f"out-{dtype}", dtype)
                times.append(seconds)
                peaks.append(peak)
            size = (work / f"out-{dtype}" / "model.onnx").stat().st_size / 2**20
            runs = ", ".join(f"{t:.1f}" for t in times)
            print(f"| {dtype} | {median(times):.1f} s | {runs} | {max(peaks):.2f} GiB | {size:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
