"""Building a runtime by backend name, so the CLI and benchmarks stay backend-agnostic."""

from __future__ import annotations

from .artifacts import ExportArtifact
from .errors import EngineError
from .runtime import DecoderRuntime

__all__ = ["BACKENDS", "make_runtime"]

BACKENDS = ("onnxruntime",)


def make_runtime(artifact: ExportArtifact, backend: str = "onnxruntime", **options) -> DecoderRuntime:
    if backend == "onnxruntime":
        from .onnxruntime_backend import OrtDecoder

        return OrtDecoder(artifact, **options)
    raise EngineError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
