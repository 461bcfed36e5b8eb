"""The TensorRT runtime: same interface as onnxruntime's, KV cache resident on the GPU between steps.

Device memory is held in torch CUDA tensors (torch is already a dependency); ``present.*`` outputs of one step are
passed as the next step's ``past_key_values.*`` without leaving the GPU. Prefill calls use profile 0, one-token
decode calls profile 1 (see :mod:`.profiles`).
"""

from __future__ import annotations

import numpy as np

from ..artifacts import ExportArtifact
from ..errors import EngineError
from ..runtime import DecoderRuntime, StepOutput, check_step_inputs
from .build import BuildResult, find_engine
from .cache import ENGINE_NAME
from .environment import load_tensorrt
from .options import BuildOptions
from .profiles import profile_for

__all__ = ["TrtDecoder"]


class TrtDecoder(DecoderRuntime):
    def __init__(self, artifact: ExportArtifact, engine: BuildResult | None = None,
                 options: BuildOptions = BuildOptions(), **_ignored):
        import torch

        self._torch = torch
        trt = load_tensorrt()
        engine = engine or find_engine(artifact, options)
        if engine is None:
            raise EngineError(f"no TensorRT engine is built for {artifact.folder} on this GPU with these options; "
                              f"run `python -m engines build {artifact.folder}` first.")
        self.spec = artifact.spec
        self.name = "tensorrt"
        self.engine_folder = engine.folder
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine((engine.folder / ENGINE_NAME).read_bytes())
        if self.engine is None:
            raise EngineError(f"TensorRT could not load {engine.folder / ENGINE_NAME}; rebuild it with --force.")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self._dtypes = {
            trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
            trt.DataType.INT64: torch.int64, trt.DataType.INT32: torch.int32, trt.DataType.BOOL: torch.bool,
        }
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._placeholder = torch.zeros(16, dtype=torch.uint8, device="cuda")  # address for empty tensors
        self._profile = None

    def _run(self, inputs: dict) -> dict:
        torch = self._torch
        past_length = inputs[self.spec.past_names()[0]].shape[2]
        profile = profile_for(past_length, inputs["input_ids"].shape[1])
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self._profile = profile
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            address = tensor.data_ptr() if tensor.numel() else self._placeholder.data_ptr()
            self.context.set_tensor_address(name, address)
        outputs = {}
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = self._dtypes[self.engine.get_tensor_dtype(name)]
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineError("TensorRT execution failed (see its log).")
        self.stream.synchronize()
        return outputs

    def _device(self, array: np.ndarray):
        return self._torch.from_numpy(np.ascontiguousarray(array)).to("cuda")

    def empty_cache(self, batch_size: int):
        dtype = self._torch.float16 if self.spec.kv_dtype == "float16" else self._torch.float32
        shape = (batch_size, self.spec.n_head, 0, self.spec.head_dim)
        return [self._torch.empty(shape, dtype=dtype, device="cuda") for _ in self.spec.past_names()]

    def step(self, input_ids, attention_mask, position_ids, cache) -> StepOutput:
        check_step_inputs(self.spec, input_ids, attention_mask, position_ids, cache[0].shape[2])
        inputs = {"input_ids": self._device(input_ids.astype(np.int64)),
                  "attention_mask": self._device(attention_mask.astype(np.int64)),
                  "position_ids": self._device(position_ids.astype(np.int64)),
                  **dict(zip(self.spec.past_names(), cache))}
        outputs = self._run(inputs)
        logits = outputs["logits"][:, -1].float().cpu().numpy()
        return StepOutput(logits=logits, cache=[outputs[n] for n in self.spec.present_names()])

    # The cache stays on the GPU when batches merge or lose rows (the host round trip would copy it twice).

    def cache_to_host(self, cache) -> list[np.ndarray]:
        return [tensor.cpu().numpy() for tensor in cache]

    def cache_from_host(self, arrays: list[np.ndarray]):
        return [self._device(array) for array in arrays]

    def merge_caches(self, first, second):
        torch, merged = self._torch, []
        for a, b in zip(first, second):
            length = max(a.shape[2], b.shape[2])
            padded = []
            for t in (a, b):
                pad = torch.zeros(t.shape[:2] + (length - t.shape[2],) + t.shape[3:], dtype=t.dtype, device=t.device)
                padded.append(torch.cat([pad, t], dim=2))
            merged.append(torch.cat(padded, dim=0))
        return merged

    def select_rows(self, cache, rows, start: int = 0):
        index = self._torch.as_tensor(np.asarray(rows, dtype=np.int64), device="cuda")
        return [tensor.index_select(0, index)[:, :, start:].contiguous() for tensor in cache]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_step_inputs(self.spec, feeds["input_ids"], feeds["attention_mask"], feeds.get("position_ids"),
                          np.shape(feeds[self.spec.past_names()[0]])[2])
        outputs = self._run({name: self._device(value) for name, value in feeds.items()})
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}

    def describe(self) -> str:
        return f"tensorrt (engine {self.engine_folder.name})"
