"""The eager GPTMeg as a :class:`engines.DecoderRuntime`: the reference runs through the same generation loop and
the same raw-call interface as every deployed backend, on CPU or CUDA."""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from engines.artifacts import DecoderSpec
from engines.runtime import DecoderRuntime, StepOutput
from gptmeg import GPTMegLMHeadModel
from gptmeg._compat import cache_tensors, output_cache

__all__ = ["EagerDecoder"]


class EagerDecoder(DecoderRuntime):
    def __init__(self, model: GPTMegLMHeadModel, spec: DecoderSpec):
        self.model = model.eval()
        self.spec = spec
        self.device = model.device
        self.name = f"eager[{model.device.type}-{str(model.dtype).removeprefix('torch.')}]"

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def empty_cache(self, batch_size: int):
        return DynamicCache(config=self.model.config)

    @torch.no_grad()
    def step(self, input_ids, attention_mask, position_ids, cache) -> StepOutput:
        out = self.model(self._tensor(input_ids), attention_mask=self._tensor(attention_mask),
                         position_ids=self._tensor(position_ids), cache=cache, use_cache=True)
        return StepOutput(logits=out.logits[:, -1].float().cpu().numpy(), cache=output_cache(out))

    @torch.no_grad()
    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cache = DynamicCache(config=self.model.config)
        for i, name in enumerate(self.spec.past_names()):
            if i % 2 == 0:
                key = self._tensor(feeds[name]).to(self.model.dtype)
                value = self._tensor(feeds[self.spec.past_names()[i + 1]]).to(self.model.dtype)
                if key.shape[2]:
                    cache.update(key, value, i // 2)
        out = self.model(self._tensor(feeds["input_ids"]), attention_mask=self._tensor(feeds["attention_mask"]),
                         position_ids=self._tensor(feeds["position_ids"]), cache=cache, use_cache=True)
        present = cache_tensors(output_cache(out))
        return {"logits": out.logits.float().cpu().numpy(),
                **{name: t.cpu().numpy() for name, t in zip(self.spec.present_names(), present)}}
