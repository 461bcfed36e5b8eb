"""onnxruntime sessions over an exported decoder: provider checks, threads, IO binding, device-resident KV cache.

The KV cache stays in onnxruntime ``OrtValue``s between steps: ``present.*`` outputs are bound on the session's
device and fed back as ``past_key_values.*`` without a round trip through numpy (on CUDA they never leave the GPU).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from export.ort_session import PROVIDERS, SessionError, available_providers, create_session

from .artifacts import ExportArtifact
from .errors import EngineError
from .runtime import DecoderRuntime, StepOutput, check_step_inputs

__all__ = ["PROVIDERS", "OrtDecoder", "available_providers"]


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
        try:
            self.session, provider = create_session(artifact.model_path, provider, threads=threads,
                                                    optimization=optimization, allow_fallback=allow_fallback)
        except SessionError as error:
            raise EngineError(str(error)) from None
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
        check_step_inputs(self.spec, input_ids, attention_mask, position_ids, cache[0].shape()[2])
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

    def cache_to_host(self, cache: list[ort.OrtValue]) -> list[np.ndarray]:
        return [value.numpy() for value in cache]

    def cache_from_host(self, arrays: list[np.ndarray]) -> list[ort.OrtValue]:
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), self.device, 0) for a in arrays]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_step_inputs(self.spec, feeds["input_ids"], feeds["attention_mask"], feeds.get("position_ids"),
                          np.shape(feeds[self._past_names[0]])[2])
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds)))

    def describe(self) -> str:
        threads = self.session.get_session_options().intra_op_num_threads
        return f"{self.name} (threads={threads or 'default'})"
