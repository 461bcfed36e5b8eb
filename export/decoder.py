"""The exportable decoder: GPTMeg's LM with a KV cache as flat tensors in, flat tensors out.

``torch.onnx.export(dynamo=True)`` cannot take a transformers ``Cache`` object, so this wrapper takes the cache as
``past_key_values.{i}.key`` / ``.value`` tensors, rebuilds a ``DynamicCache`` inside, and returns the logits and
the grown cache as ``present.{i}.key`` / ``.value``. One graph serves prefill (past length 0) and decode.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from gptmeg import GPTMegLMHeadModel


__all__ = ["DecoderWithPast", "additive_causal_mask"]


def additive_causal_mask(attention_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """transformers' eager mask from a (B, P+T) 0/1 padding mask: (B, 1, T, P+T), 0 where a query may attend a
    key (key not padding, key position <= query position), ``finfo(dtype).min`` elsewhere."""
    total = attention_mask.shape[1]
    past = total - query_len
    query_pos = torch.arange(query_len, device=attention_mask.device) + past  # (T,)
    key_pos = torch.arange(total, device=attention_mask.device)  # (P+T,)
    causal = key_pos[None, :] <= query_pos[:, None]  # (T, P+T)
    allowed = causal[None, None, :, :] & attention_mask[:, None, None, :].bool()  # (B, 1, T, P+T)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    blocked = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, blocked)


class DecoderWithPast(nn.Module):
    def __init__(self, model: GPTMegLMHeadModel):
        super().__init__()
        self.model = model
        self.n_layer = model.config.n_layer

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T) int64
        attention_mask: torch.Tensor,  # (B, P+T) int64, 1 = real token, 0 = padding
        position_ids: torch.Tensor,  # (B, T) int64
        *past: torch.Tensor,  # 2 * n_layer tensors (B, H, P, D): key_0, value_0, key_1, ...
    ) -> tuple[torch.Tensor, ...]:
        cache = DynamicCache(config=self.model.config)
        for layer in range(self.n_layer):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        mask = additive_causal_mask(attention_mask, input_ids.shape[1], self.model.dtype)
        outputs = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        present = [t for layer in cache.layers[: self.n_layer] for t in (layer.keys, layer.values)]
        return (outputs.logits, *present)
