"""Tensor-parallel merge rules and Megatron -> GPT-2 names (shared/research/megatron-checkpoints.md §2, §3).

| Megatron tensor                                   | parallel type   | merge                              |
| ------------------------------------------------- | --------------- | ---------------------------------- |
| word_embeddings.weight                            | vocab-parallel  | cat rows                           |
| self_attention.query_key_value.{weight,bias}      | column-parallel | reorder per partition, cat heads   |
| mlp.dense_h_to_4h.{weight,bias}                   | column-parallel | cat dim 0                          |
| self_attention.dense.weight, mlp.dense_4h_to_h.weight | row-parallel | cat dim 1                         |
| LayerNorms, position embeddings, row-parallel biases | replicated   | rank 0 (or the average); drift reported |

Megatron's ``Linear`` layers store ``[out, in]`` and GPT-2's ``Conv1D`` ``[in, out]``: every matrix is transposed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import MegatronCheckpointError

__all__ = ["QKV_LAYOUTS", "Merger", "qkv_layout_for_version", "split_qkv_partition"]

QKV_LAYOUTS = ("auto", "per-head", "blocks", "per-head-hn3")
_REPLICATED = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
               "post_attention_layernorm.bias", "self_attention.dense.bias", "mlp.dense_4h_to_h.bias")
_BLOCK_NAMES = {  # Megatron block key -> (GPT-2 name under transformer.h.{i}., transpose)
    "input_layernorm.weight": ("ln_1.weight", False),
    "input_layernorm.bias": ("ln_1.bias", False),
    "self_attention.dense.weight": ("attn.c_proj.weight", True),
    "self_attention.dense.bias": ("attn.c_proj.bias", False),
    "post_attention_layernorm.weight": ("ln_2.weight", False),
    "post_attention_layernorm.bias": ("ln_2.bias", False),
    "mlp.dense_h_to_4h.weight": ("mlp.c_fc.weight", True),
    "mlp.dense_h_to_4h.bias": ("mlp.c_fc.bias", False),
    "mlp.dense_4h_to_h.weight": ("mlp.c_proj.weight", True),
    "mlp.dense_4h_to_h.bias": ("mlp.c_proj.bias", False),
}
_ROW_PARALLEL = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")
_COLUMN_PARALLEL = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")


def qkv_layout_for_version(version: float | None) -> str:
    """How one TP partition's QKV rows are ordered, by checkpoint_version (absent = 0):
    0 -> "blocks" [3, np, hn]; 1.0 -> "per-head-hn3" [np, hn, 3]; 2.0, 3.0 -> "per-head" [np, 3, hn]."""
    version = float(version or 0)
    if version == 0:
        return "blocks"
    if version == 1.0:
        return "per-head-hn3"
    return "per-head"


def split_qkv_partition(tensor: torch.Tensor, layout: str, heads: int) -> torch.Tensor:
    """One partition's QKV weight ``[3*np*hn, H]`` (or bias ``[3*np*hn]``) as ``[3, np, hn, ...]``."""
    rest = tuple(tensor.shape[1:])
    if layout == "blocks":
        return tensor.reshape(3, heads, -1, *rest)
    if layout == "per-head-hn3":
        t = tensor.reshape(heads, -1, 3, *rest)
        return t.permute(2, 0, 1, *range(3, t.dim()))
    if layout == "per-head":
        return tensor.reshape(heads, 3, -1, *rest).transpose(0, 1)
    raise ValueError(f"unknown QKV layout {layout!r}")


@dataclass
class Merger:
    """Merges the TP shards of one checkpoint into GPTMeg tensors, noting how far replicated copies drift."""

    num_heads: int
    qkv_layout: str  # a resolved layout (not "auto")
    replicated: str = "first"  # "first" | "average"
    dtype: torch.dtype | None = None  # cast every tensor (universal fp32 masters -> the training dtype)
    drift: dict[str, float] = field(default_factory=dict)  # tensor -> max |copy - rank 0| over the ranks

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if self.dtype is not None and tensor.dtype != self.dtype else tensor

    def replicated_tensor(self, name: str, copies: list[torch.Tensor]) -> torch.Tensor:
        first = copies[0]
        shapes = {tuple(c.shape) for c in copies}
        if len(shapes) > 1:
            raise MegatronCheckpointError(f"the TP copies of {name} have different shapes {sorted(shapes)}.")
        if len(copies) > 1:
            delta = max(float((c.float() - first.float()).abs().max()) for c in copies[1:])
            if delta > 0:
                self.drift[name] = delta
        if self.replicated == "average" and len(copies) > 1:
            return self._cast(torch.stack([c.float() for c in copies]).mean(0).to(first.dtype))
        return self._cast(first).clone()

    def qkv(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """[3, NH, hn, ...] from per-partition tensors: reorder each partition, then join the heads."""
        if self.num_heads % len(shards):
            raise MegatronCheckpointError(f"{self.num_heads} heads cannot be split over {len(shards)} QKV partitions.")
        per_partition = self.num_heads // len(shards)
        return torch.cat([split_qkv_partition(s, self.qkv_layout, per_partition) for s in shards], dim=1)

    def block(self, index: int, shards: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """GPT-2 tensors ``transformer.h.{index}.*`` from one block's shards."""
        prefix = f"transformer.h.{index}."
        expected = set(_BLOCK_NAMES) | {"self_attention.query_key_value.weight", "self_attention.query_key_value.bias"}
        unknown = sorted(set(shards) - expected)
        missing = sorted(expected - set(shards))
        if unknown or missing:
            detail = f"unexpected {unknown[:3]}" if unknown else f"missing {missing[:3]}"
            raise MegatronCheckpointError(f"block {index} does not have GPT-2's tensors ({detail}).")
        out = {}
        weight = self.qkv(shards["self_attention.query_key_value.weight"])  # [3, NH, hn, H]
        out[prefix + "attn.c_attn.weight"] = self._cast(weight.reshape(-1, weight.shape[-1]).t().contiguous())
        out[prefix + "attn.c_attn.bias"] = self._cast(self.qkv(shards["self_attention.query_key_value.bias"])
                                                      .reshape(-1).contiguous())
        for key, (name, transpose) in _BLOCK_NAMES.items():
            copies = shards[key]
            if key in _REPLICATED:
                tensor = self.replicated_tensor(prefix + name, copies)
            elif key in _ROW_PARALLEL:
                tensor = torch.cat(copies, dim=1)
            else:  # column-parallel
                tensor = torch.cat(copies, dim=0)
            out[prefix + name] = self._cast(tensor.t().contiguous() if transpose else tensor)
        return out

    def embedding(self, shards: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {
            "transformer.wte.weight": self._cast(torch.cat(shards["word_embeddings.weight"], dim=0)),
            "transformer.wpe.weight": self.replicated_tensor("transformer.wpe.weight",
                                                             shards["position_embeddings.weight"]),
        }

    def final_norm(self, shards: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {f"transformer.ln_f.{k}": self.replicated_tensor(f"transformer.ln_f.{k}", shards[k])
                for k in ("weight", "bias")}
