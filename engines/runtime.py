"""The one interface every backend implements (onnxruntime now, TensorRT next): the generation loop drives a
``DecoderRuntime`` and never knows which backend it is."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from .artifacts import DecoderSpec
from .errors import EngineError

__all__ = ["DecoderRuntime", "StepOutput", "check_step_inputs"]


def _first_outside(values, limit: int) -> int | None:
    """The first element of ``values`` outside [0, limit), or None."""
    array = np.asarray(values)
    if not array.size or (array.min() >= 0 and array.max() < limit):
        return None
    return int(array[(array < 0) | (array >= limit)].flat[0])


def check_step_inputs(spec: DecoderSpec, input_ids, attention_mask, position_ids, past_length: int) -> None:
    """Refuse what eager PyTorch refuses and the graph would not: token ids outside [0, vocab) and positions outside
    [0, context) (ONNX Gather counts a negative index from the end, so id -1 would silently read the last row), and
    an attention mask that does not cover past + new tokens row for row (the graph would broadcast a length-1 mask).
    """
    bad = _first_outside(input_ids, spec.vocab_size)
    if bad is not None:
        raise EngineError(f"token id {bad} is outside the vocabulary [0, {spec.vocab_size}).")
    bad = _first_outside(position_ids, spec.max_sequence) if position_ids is not None else None
    if bad is not None:
        raise EngineError(f"position {bad} is outside the model's context [0, {spec.max_sequence}).")
    want = (np.shape(input_ids)[0], past_length + np.shape(input_ids)[1])
    if tuple(np.shape(attention_mask)) != want:
        raise EngineError(f"attention_mask has shape {tuple(np.shape(attention_mask))}; with {past_length} cached and "
                          f"{np.shape(input_ids)[1]} new tokens it must be {want}.")


@dataclass
class StepOutput:
    logits: np.ndarray  # (B, V) float32: next-token scores at the last position of each row
    cache: Any  # backend-owned KV cache (device-resident where the backend allows); pass to the next step


class DecoderRuntime(ABC):
    """Runs the exported decoder: one call per prefill or decode step."""

    name: str
    spec: DecoderSpec

    @abstractmethod
    def empty_cache(self, batch_size: int) -> Any:
        """A KV cache with past length 0 for ``batch_size`` rows."""

    @abstractmethod
    def step(
        self,
        input_ids: np.ndarray,  # (B, T) int64
        attention_mask: np.ndarray,  # (B, P+T) int64
        position_ids: np.ndarray,  # (B, T) int64
        cache: Any,
    ) -> StepOutput:
        """Run T new tokens per row against the cache; return last-position logits and the grown cache."""

    @abstractmethod
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One raw call of the graph: every input by name in, every output by name out, on the host. For
        validation (all positions' logits, every ``present.*``); generation uses :meth:`step`."""

    # --- cache operations for continuous batching (engines.serving) --------------------------------------------
    # A cache is 2 * n_layer arrays (B, H, P, D) whose past columns are right-aligned: row b's real tokens are its
    # last columns, the attention mask says which. The defaults go through host memory; a backend whose cache lives
    # on a device overrides them to keep it there.

    def cache_to_host(self, cache: Any) -> list[np.ndarray]:
        """The cache as numpy arrays (B, H, P, D)."""
        raise NotImplementedError(f"{self.name} cannot move its KV cache to the host.")

    def cache_from_host(self, arrays: list[np.ndarray]) -> Any:
        """A cache of this backend holding ``arrays``."""
        raise NotImplementedError(f"{self.name} cannot build a KV cache from host arrays.")

    def merge_caches(self, first: Any, second: Any) -> Any:
        """One cache with ``first``'s rows then ``second``'s. The shorter past is left-padded with zeros to the longer
        one's length (the caller pads its attention mask the same way)."""
        merged = []
        for a, b in zip(self.cache_to_host(first), self.cache_to_host(second)):
            length = max(a.shape[2], b.shape[2])
            merged.append(np.concatenate([_left_pad_past(a, length), _left_pad_past(b, length)], axis=0))
        return self.cache_from_host(merged)

    def select_rows(self, cache: Any, rows: np.ndarray, start: int = 0) -> Any:
        """The cache of ``rows`` (indices, in order) without its first ``start`` past columns."""
        rows = np.asarray(rows, dtype=np.int64)
        return self.cache_from_host([np.ascontiguousarray(a[rows, :, start:]) for a in self.cache_to_host(cache)])

    def describe(self) -> str:
        return self.name


def _left_pad_past(array: np.ndarray, length: int) -> np.ndarray:
    """(B, H, P, D) -> (B, H, length, D) with zero columns in front."""
    missing = length - array.shape[2]
    if missing == 0:
        return array
    pad = np.zeros(array.shape[:2] + (missing,) + array.shape[3:], dtype=array.dtype)
    return np.concatenate([pad, array], axis=2)
