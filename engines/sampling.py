"""Next-token selection on numpy logits: repetition penalty, temperature, top-k, top-p, greedy or seeded sampling.

The processors follow transformers' definitions so that settings mean the same thing in both:
repetition penalty divides positive and multiplies negative scores of already-seen tokens (CTRL paper);
top-k keeps the k highest scores; top-p keeps the smallest set of tokens whose probability reaches p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "SamplingSettings",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "softmax",
    "select_next_tokens",
]


@dataclass(frozen=True)
class SamplingSettings:
    do_sample: bool = False  # False: greedy (argmax), the other settings except repetition_penalty are unused
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off

    def __post_init__(self):
        # written as "not (x > 0)" so that NaN, which compares False with everything, is refused too
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature} (use greedy decoding instead of 0).")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not self.repetition_penalty > 0 or self.repetition_penalty == float("inf"):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}.")


def apply_repetition_penalty(scores: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """scores (B, V); seen (B, V) bool: tokens already in each row (prompt + generated)."""
    if penalty == 1.0:
        return scores
    penalised = np.where(scores < 0, scores * penalty, scores / penalty)
    return np.where(seen, penalised, scores)


def apply_temperature(scores: np.ndarray, temperature: float) -> np.ndarray:
    return scores if temperature == 1.0 else scores / temperature


def apply_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]  # the k-th largest score per row
    return np.where(scores < kth, -np.inf, scores)


def softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def apply_top_p(scores: np.ndarray, p: float) -> np.ndarray:
    if p >= 1.0:
        return scores
    order = np.argsort(-scores, axis=-1, kind="stable")  # descending
    sorted_probs = np.take_along_axis(softmax(scores), order, axis=-1)
    mass_before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # probability of strictly higher-ranked tokens
    drop_sorted = mass_before >= p  # keep tokens until the kept mass reaches p (the top token always stays)
    drop = np.zeros_like(drop_sorted)
    np.put_along_axis(drop, order, drop_sorted, axis=-1)
    return np.where(drop, -np.inf, scores)


def select_next_tokens(
    logits: np.ndarray, seen: np.ndarray, settings: SamplingSettings, rng: np.random.Generator
) -> np.ndarray:
    """(B,) next token ids from (B, V) logits."""
    scores = apply_repetition_penalty(logits.astype(np.float64), seen, settings.repetition_penalty)
    if not settings.do_sample:
        return scores.argmax(axis=-1)
    scores = apply_top_p(apply_top_k(apply_temperature(scores, settings.temperature), settings.top_k), settings.top_p)
    probs = softmax(scores)
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random(probs.shape[0])[:, None] * cumulative[:, -1:]
    return np.minimum((cumulative < draws).sum(axis=-1), probs.shape[-1] - 1)
