"""Prefill latency and decode throughput of a runtime, as medians over repeated runs."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

from .generation import GenerationSettings, generate
from .runtime import DecoderRuntime

__all__ = ["BenchResult", "random_prompts", "bench_runtime"]


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


def bench_runtime(
    runtime: DecoderRuntime, batch: int = 1, prompt_length: int = 32, new_tokens: int = 32, repeats: int = 3,
    warmup: int = 1,
) -> BenchResult:
    """Greedy generation of exactly ``new_tokens`` per row (EOS ignored), ``warmup`` + ``repeats`` runs."""
    prompts = random_prompts(runtime.spec.vocab_size, batch, prompt_length)
    settings = GenerationSettings(max_new_tokens=new_tokens, eos_token_id=-1)
    results = [generate(runtime, prompts, settings) for _ in range(warmup + repeats)][warmup:]
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
