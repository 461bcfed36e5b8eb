"""Building a runtime by backend name, so the CLI and benchmarks stay backend-agnostic."""

from __future__ import annotations

from .artifacts import ExportArtifact
from .errors import EngineError
from .runtime import DecoderRuntime

__all__ = ["ALIASES", "BACKENDS", "make_runtime"]

BACKENDS = ("onnxruntime", "tensorrt")
ALIASES = {"ort": "onnxruntime", "trt": "tensorrt"}


def make_runtime(artifact: ExportArtifact, backend: str = "onnxruntime", **options) -> DecoderRuntime:
    """A runtime over ``artifact``. onnxruntime options: provider, threads, optimization, allow_fallback.
    tensorrt: uses the engine ``python -m engines build`` cached for this export and GPU (options: engine, options)."""
    backend = ALIASES.get(backend, backend)
    if backend == "onnxruntime":
        from .onnxruntime_backend import OrtDecoder

        return OrtDecoder(artifact, **options)
    if backend == "tensorrt":
        from .tensorrt.runner import TrtDecoder

        return TrtDecoder(artifact, **{k: v for k, v in options.items() if k in ("engine", "options")})
    raise EngineError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)} (or trt / ort).")
