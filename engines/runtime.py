"""The one interface every backend implements (onnxruntime now, TensorRT next): the generation loop drives a
``DecoderRuntime`` and never knows which backend it is."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from .artifacts import DecoderSpec

__all__ = ["DecoderRuntime", "StepOutput"]


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

    def describe(self) -> str:
        return self.name
