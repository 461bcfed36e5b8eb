"""TensorRT engines over an exported GPTMeg: strongly typed fp16 builds (precisions come from the ONNX casts),
prefill/decode optimization profiles, an engine cache keyed by model, GPU, TensorRT version and options, a
persistent timing cache, a runner with the same interface as onnxruntime's, and the equivalent trtexec command.

Everything that needs TensorRT or a GPU imports it lazily: without them, each entry point raises one clear
EngineError naming what is missing and pointing to onnxruntime."""

from .cache import EngineMetadata, check_compatible, engine_cache_key
from .options import BuildOptions
from .profiles import DECODE, PREFILL, decoder_profiles
from .trtexec import trtexec_command

__all__ = ["BuildOptions", "EngineMetadata", "DECODE", "PREFILL", "check_compatible", "decoder_profiles",
           "engine_cache_key", "trtexec_command"]
