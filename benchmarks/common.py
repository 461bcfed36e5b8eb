"""Helpers shared by the benchmarks: a GPT-2-small-sized random GPTMeg checkpoint, medians, machine facts."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from gptmeg import GPTMegConfig, GPTMegLMHeadModel

GPT2_SMALL = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)


def gpt2_small_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A GPT-2-small-sized GPTMeg with random weights (no download), saved once and reused."""
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(seed)
    config = GPTMegConfig(**GPT2_SMALL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPTMegLMHeadModel(config).eval().save_pretrained(folder)
    return folder


@contextlib.contextmanager
def repeats_and_workspace(description: str, name: str):
    """``(args, work)`` of a benchmark taking ``--repeats`` and ``--work``; a temporary work folder (no --work) is
    removed at the end."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix=f"gptmeg-{name}-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield args, work
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


def median(values) -> float:
    return float(statistics.median(values))


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


# Runs the measured command and reports its wall time, exit code and ru_maxrss. A child started straight from the
# benchmark process would count the benchmark's own peak: Linux carries the forking process's memory high-water mark
# into the child's ru_maxrss (vfork shares its mm, exec folds the old mm's peak in). Started from this small fresh
# interpreter, the command's peak is its own.
_LAUNCHER = """import os, subprocess, sys, time
started = time.perf_counter()
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(time.perf_counter() - started, os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def measure_subprocess(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GiB) of one fresh process (its own rusage, from wait4; ru_maxrss is in KiB on
    Linux), started from a small launcher so that this process's memory does not count. A failing process ends the
    benchmark with the end of its stderr."""
    with tempfile.TemporaryFile() as errors:
        done = subprocess.run([sys.executable, "-c", _LAUNCHER, *argv], stdout=subprocess.PIPE, stderr=errors,
                              text=True)
        fields = done.stdout.split() if done.returncode == 0 else []
        if len(fields) != 3 or int(fields[1]) != 0:
            errors.seek(0)
            raise SystemExit(f"{' '.join(argv[:4])} failed: {errors.read().decode(errors='replace')[-2000:]}")
    return float(fields[0]), int(fields[2]) / 2**20
