"""onnxruntime sessions over an exported decoder: provider checks, threads, IO binding, device-resident KV cache.

The KV cache stays in onnxruntime ``OrtValue``s between steps: ``present.*`` outputs are bound on the session's
device and fed back as ``past_key_values.*`` without a round trip through numpy (on CUDA they never leave the GPU).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort

from .artifacts import ExportArtifact
from .errors import EngineError
from .runtime import DecoderRuntime, StepOutput

__all__ = ["PROVIDERS", "OrtDecoder", "available_providers"]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def available_providers() -> list[str]:
    """Our provider names (cpu, cuda) that this onnxruntime build offers."""
    offered = set(ort.get_available_providers())
    return [name for name, provider in PROVIDERS.items() if provider in offered]


class OrtDecoder(DecoderRuntime):
    def __init__(
        self,
        artifact: ExportArtifact,
        provider: str = "cpu",
        *,
        threads: int | None = None,
        optimization: str = "all",
        allow_fallback: bool = False,
    ):
        if provider not in PROVIDERS:
            raise EngineError(f"unknown provider {provider!r}: choose one of {', '.join(PROVIDERS)}.")
        if optimization not in _OPTIMIZATION:
            raise EngineError(f"unknown optimization level {optimization!r}: choose one of {', '.join(_OPTIMIZATION)}.")
        wanted = PROVIDERS[provider]
        if wanted not in ort.get_available_providers():
            message = (
                f"onnxruntime {ort.__version__} here has no {wanted} (it offers "
                f"{', '.join(ort.get_available_providers())}). "
                + ("Install onnxruntime-gpu (pip install '.[cuda]') on a machine with CUDA, or use --provider cpu."
                   if provider == "cuda" else "")
            )
            raise EngineError(message.strip())
        options = ort.SessionOptions()
        options.graph_optimization_level = _OPTIMIZATION[optimization]
        options.log_severity_level = 3
        if threads is not None:
            if threads < 1:
                raise EngineError(f"threads must be >= 1, got {threads}.")
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = [wanted] + (["CPUExecutionProvider"] if provider == "cuda" else [])
        try:
            self.session = ort.InferenceSession(str(artifact.model_path), options, providers=providers)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime could not load {artifact.model_path}: {error}") from None
        active = self.session.get_providers()[0]
        if active != wanted:
            # onnxruntime-gpu silently falls back to CPU when CUDA libraries are missing
            message = f"asked for {wanted} but onnxruntime runs on {active} (CUDA libraries missing or mismatched?)."
            if not allow_fallback:
                raise EngineError(message + " Fix the CUDA install or use --provider cpu.")
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            provider = "cpu"
        self.provider = provider
        self.device = "cuda" if provider == "cuda" else "cpu"
        self.spec = artifact.spec
        self.name = f"onnxruntime[{provider}]"
        self._past_names = self.spec.past_names()
        self._present_names = self.spec.present_names()

    def empty_cache(self, batch_size: int) -> list[ort.OrtValue]:
        shape = (batch_size, self.spec.n_head, 0, self.spec.head_dim)
        empty = np.zeros(shape, dtype=self.spec.numpy_kv_dtype)
        return [ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0) for _ in self._past_names]

    def step(self, input_ids, attention_mask, position_ids, cache) -> StepOutput:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        for name, value in zip(self._past_names, cache):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()[:, -1, :].astype(np.float32)
        return StepOutput(logits=logits, cache=list(outputs[1:]))

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds)))

    def describe(self) -> str:
        threads = self.session.get_session_options().intra_op_num_threads
        return f"{self.name} (threads={threads or 'default'})"
