"""Runtimes over an exported GPTMeg folder (no PyTorch model code): onnxruntime sessions with a device-resident
KV cache, the backend-agnostic generation loop, sampling, benchmarks."""

from .artifacts import DecoderSpec, ExportArtifact, open_export
from .backends import BACKENDS, make_runtime
from .errors import ArtifactError, EngineError
from .generation import GenerationResult, GenerationSettings, generate, left_pad
from .runtime import DecoderRuntime, StepOutput
from .sampling import SamplingSettings

__all__ = [
    "BACKENDS",
    "ArtifactError",
    "DecoderRuntime",
    "DecoderSpec",
    "EngineError",
    "ExportArtifact",
    "GenerationResult",
    "GenerationSettings",
    "SamplingSettings",
    "StepOutput",
    "generate",
    "left_pad",
    "make_runtime",
    "open_export",
]
