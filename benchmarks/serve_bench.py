"""Serving throughput: `python -m engines serve --max-batch 8` (continuous batching) against `--max-batch 1`, over
HTTP, measured in pairs in the same run (issue #11).

A GPT-2-small-sized random GPTMeg (12 x 768, vocab 50257) exported in fp32 once into the work folder (reused on
the next run), served with a word-level tokenizer that gives every one of the 50257 ids a text ("t123"), so each
generated token streams as one chunk (the checkpoint has no tokenizer, and a byte-level one smaller than the
vocabulary would decode most random ids to nothing, leaving the time to first token unmeasurable). For each of
--repeats pairs, one server with --max-batch 8 and one with --max-batch 1 (order alternating between pairs), each
warmed up, then --requests streamed requests at --concurrency: --prompt-tokens random ids, --new-tokens new tokens,
greedy, EOS ignored. Reports per run and as medians: generated tokens/s (from usage) and the batch-8 / batch-1
ratio per pair, time to first token and latency p50/p99, /health p99 during the load, mean batch occupancy, and
whether the "nothing lost" checks held.

    .venv/bin/python -m benchmarks.serve_bench [--repeats 3] [--requests 48] [--concurrency 8] [--threads 2]
        [--work DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import gpt2_small_checkpoint, machine, median
from benchmarks.serve_load import LoadSpec, read_metrics, run_load_sync, settled_metrics

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50257


def small_export(work: Path) -> Path:
    """The GPT-2-small-sized fp32 export, made once (`python -m export`, no validation)."""
    folder = work / "export-small-fp32"
    if not (folder / "manifest.json").is_file():
        checkpoint = gpt2_small_checkpoint(work / "gpt2-small-random")
        subprocess.run([sys.executable, "-m", "export", "--model", str(checkpoint), "--dtype", "fp32",
                        "--no-validate", "--quiet", "--force", "--out", str(folder)], check=True, cwd=ROOT)
    return folder


def word_tokenizer(work: Path) -> Path:
    """A tokenizer.json with one word per id ("t0" ... "t50256"), decoding ids to space-separated words."""
    folder = work / "tokenizer-words"
    if not (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer, models, pre_tokenizers

        tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def one_run(export: Path, tokenizer: Path, max_batch: int, args) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from servertools import ServerProcess

    spec = LoadSpec(requests=args.requests, concurrency=args.concurrency, prompt_tokens=args.prompt_tokens,
                    vocab_size=VOCAB, max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True,
                    hang_up_every=args.hang_up_every, hang_up_after=2, timeout=300.0,
                    prompt_seed=args.seed)
    warm_up = LoadSpec(requests=args.concurrency, concurrency=args.concurrency, prompt_tokens=args.prompt_tokens,
                       vocab_size=VOCAB, max_tokens=4, temperature=0.0, ignore_eos=True, timeout=300.0,
                       prompt_seed=args.seed + 1)
    with ServerProcess(export, "--max-batch", str(max_batch), "--tokenizer", str(tokenizer), threads=args.threads,
                       timeout=300.0) as server:
        run_load_sync(server.url, warm_up)
        before = read_metrics(server.url)
        result = run_load_sync(server.url, spec)
        after = settled_metrics(server.url, before, timeout=60.0)
    figures = result.summary(before, after)
    failures = result.nothing_lost_failures(before, after)
    figures["nothing_lost"] = not failures
    figures["failures"] = failures
    figures["max_batch"] = max_batch
    return figures


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs (default 3)")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--hang-up-every", type=int, default=0, help="hang up every k-th stream (default 0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gptmeg-serve-bench",
                        help="folder for the checkpoint, the export and the tokenizer, reused between runs")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    export = small_export(args.work)
    tokenizer = word_tokenizer(args.work)
    print(f"machine: {machine()}; server --threads {args.threads}")
    print(f"GPT-2-small-sized fp32 export, {args.requests} streamed requests at concurrency {args.concurrency}, "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy, EOS ignored\n", flush=True)
    header = ("| pair | --max-batch | tok/s (usage) | req/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | "
              "latency p99 ms | /health p50 ms | /health p99 ms | occupancy | nothing lost |")
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    runs: list[tuple[dict, dict]] = []
    for pair in range(1, args.repeats + 1):
        order = (8, 1) if pair % 2 else (1, 8)
        measured = {}
        for max_batch in order:
            figures = one_run(export, tokenizer, max_batch, args)
            measured[max_batch] = figures
            print(f"| {pair} | {max_batch} | {figures['tokens_per_s']:.1f} | {figures['requests_per_s']:.2f} | "
                  f"{_ms(figures['ttft_p50_s'])} | {_ms(figures['ttft_p99_s'])} | {_ms(figures['latency_p50_s'])} | "
                  f"{_ms(figures['latency_p99_s'])} | {1e3 * figures['health_p50_s']:.1f} | "
                  f"{1e3 * figures['health_p99_s']:.1f} | {figures['occupancy']:.2f} | "
                  f"{'yes' if figures['nothing_lost'] else 'NO'} |", flush=True)
            for failure in figures["failures"]:
                print(f"  nothing lost: {failure}", flush=True)
        runs.append((measured[8], measured[1]))

    ratios = [b8["tokens_per_s"] / b1["tokens_per_s"] for b8, b1 in runs]
    print("\n| pair | batch 8 tok/s | batch 1 tok/s | batch 8 / batch 1 |")
    print("| --- | --- | --- | --- |")
    for pair, ((b8, b1), ratio) in enumerate(zip(runs, ratios), start=1):
        print(f"| {pair} | {b8['tokens_per_s']:.1f} | {b1['tokens_per_s']:.1f} | {ratio:.2f}x |")

    def spread(values, fmt=".1f", scale=1.0) -> str:
        values = [scale * v for v in values]
        return f"{median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}})"

    print(f"\nmedians over {args.repeats} pairs (min–max):\n")
    print("| --max-batch | tok/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms | /health p99 ms | "
          "occupancy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for column, label in ((0, 8), (1, 1)):
        figures = [run[column] for run in runs]
        print(f"| {label} | {spread([f['tokens_per_s'] for f in figures])} | "
              f"{spread([f['ttft_p50_s'] for f in figures], '.0f', 1e3)} | "
              f"{spread([f['ttft_p99_s'] for f in figures], '.0f', 1e3)} | "
              f"{spread([f['latency_p50_s'] for f in figures], '.0f', 1e3)} | "
              f"{spread([f['latency_p99_s'] for f in figures], '.0f', 1e3)} | "
              f"{spread([f['health_p99_s'] for f in figures], '.1f', 1e3)} | "
              f"{spread([f['occupancy'] for f in figures], '.2f')} |")
    print(f"\nbatch 8 / batch 1 aggregate tokens/s: median {spread(ratios, '.2f')}x; goal >= 2.5x: "
          f"{'met' if median(ratios) >= 2.5 else 'not met'} by the median, in {sum(r >= 2.5 for r in ratios)} of "
          f"{len(ratios)} pairs")


if __name__ == "__main__":
    main()
