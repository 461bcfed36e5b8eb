"""Prefill latency and decode throughput of a runtime, as medians over repeated runs."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

from .errors import EngineError
from .generation import GenerationSettings, generate
from .runtime import DecoderRuntime

__all__ = ["BenchResult", "check_bench_settings", "random_prompts", "bench_runtime"]


@dataclass
class BenchResult:
    backend: str
    batch: int
    prompt_length: int
    new_tokens: int
    prefill_ms: float  # median
    decode_ms_per_step: float  # median time of one decode step (one token for every row)
    decode_tokens_per_second: float  # median aggregate: batch * steps / decode time
    runs: int


def random_prompts(vocab_size: int, batch: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(batch, length)).tolist()


def check_bench_settings(context: int, batches: list[int], prompt_length: int, new_tokens: int, repeats: int) -> None:
    """EngineError naming the option when a benchmark cannot measure what it is asked to."""
    if not batches or min(batches) < 1:
        raise EngineError(f"--batch sizes must be >= 1, got {batches}.")
    if prompt_length < 1:
        raise EngineError(f"--prompt-length must be >= 1, got {prompt_length}.")
    if new_tokens < 2:
        raise EngineError(f"--new-tokens must be >= 2 (the first token comes from the prefill, the rest are the "
                          f"decode steps measured), got {new_tokens}.")
    if repeats < 1:
        raise EngineError(f"--repeats must be >= 1, got {repeats}.")
    if prompt_length + new_tokens > context:
        raise EngineError(f"--prompt-length {prompt_length} + --new-tokens {new_tokens} exceed the model's context of "
                          f"{context} tokens; lower one of them (at most {context} together).")


def bench_runtime(
    runtime: DecoderRuntime, batch: int = 1, prompt_length: int = 32, new_tokens: int = 32, repeats: int = 3,
    warmup: int = 1,
) -> BenchResult:
    """Greedy generation of exactly ``new_tokens`` per row (EOS ignored), ``warmup`` + ``repeats`` runs.

    Settings that cannot be measured as asked (the context too short for prompt + new tokens, fewer than two new
    tokens so no decode step, no repeats) are an EngineError, never a table of numbers for something else."""
    check_bench_settings(runtime.spec.max_sequence, [batch], prompt_length, new_tokens, repeats)
    prompts = random_prompts(runtime.spec.vocab_size, batch, prompt_length)
    settings = GenerationSettings(max_new_tokens=new_tokens, eos_token_id=-1)
    results = [generate(runtime, prompts, settings) for _ in range(warmup + repeats)][warmup:]
    produced = {len(row) for r in results for row in r.tokens}
    if produced != {new_tokens}:  # cannot happen after the checks above; a wrong table is worse than an error
        raise EngineError(f"asked for {new_tokens} new tokens per row but runs produced {sorted(produced)}.")
    return BenchResult(
        backend=runtime.describe(),
        batch=batch,
        prompt_length=prompt_length,
        new_tokens=new_tokens,
        prefill_ms=1e3 * statistics.median(r.prefill_seconds for r in results),
        decode_ms_per_step=1e3 * statistics.median(r.decode_seconds / max(r.decode_steps, 1) for r in results),
        decode_tokens_per_second=statistics.median(r.decode_tokens_per_second for r in results),
        runs=repeats,
    )
