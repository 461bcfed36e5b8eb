"""Synthetic Megatron-LM / Megatron-DeepSpeed checkpoints and the answers a converter must give for them.

This is a test oracle. It never imports ``gptmeg.megatron`` (the converter under test): every expected tensor is built
straight from one set of canonical weights, and every checkpoint layout is written from those same weights. Neither
Megatron nor DeepSpeed is needed.

The facts used here (file names, key names, QKV layouts per ``checkpoint_version``, TP/PP splits, layer-file numbers,
universal-checkpoint layout, ``args`` fields) come from ``shared/research/megatron-checkpoints.md``; section numbers in
the comments ("§1.2") refer to that note.

Canonical weights (``canonical_weights``) are a plain dict, all fp16::

    "word"  [padded_vocab, H]   word embedding, padding rows included (they are real, trained rows in Megatron)
    "pos"   [max_pos, H]        position embedding
    "ln_f_weight", "ln_f_bias"  [H]
    "layers": list of dicts, one per block, with
        "ln1_weight", "ln1_bias", "ln2_weight", "ln2_bias"   [H]
        "Wq", "Wk", "Wv"  [H, H]   Megatron/torch Linear layout [out, in]; row = head * head_dim + d
        "bq", "bk", "bv"  [H]
        "Wo" [H, H], "bo" [H]      attention output projection
        "W1" [F, H], "b1" [F]      dense_h_to_4h
        "W2" [H, F], "b2" [H]      dense_4h_to_h
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import math
import random
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# --- dimensions ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dims:
    """Model and parallel sizes of a synthetic checkpoint.

    The defaults give: head_dim 12 (1/sqrt(12) is not a power of two), two heads per TP partition (so the version-0
    per-partition QKV merge differs from the naive one), vocab 250 padded to 256 with all 6 padding rows on TP rank 1,
    and 4 layers over 2 pipeline stages.
    """

    hidden: int = 48
    heads: int = 4
    ffn: int = 96
    layers: int = 4
    max_pos: int = 16
    orig_vocab: int = 250
    divisible_by: int = 8
    tp: int = 2
    pp: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def heads_per_partition(self) -> int:
        return self.heads // self.tp

    @property
    def padded_vocab(self) -> int:
        """Megatron's ``_vocab_size_with_padding`` (§4): round up to a multiple of divisible_by * tp."""
        multiple = self.divisible_by * self.tp
        return -(-self.orig_vocab // multiple) * multiple

    @property
    def layers_per_stage(self) -> int:
        return self.layers // self.pp


def _check_dims(dims: Dims) -> None:
    """The splits below need exact divisions; fail loudly on a Dims that Megatron itself would reject."""
    assert dims.hidden % dims.heads == 0, "hidden must be a multiple of heads"
    assert dims.heads % dims.tp == 0, "heads must be a multiple of tp"
    assert dims.ffn % dims.tp == 0, "ffn must be a multiple of tp"
    assert dims.layers % dims.pp == 0, "layers must be a multiple of pp"
    assert dims.padded_vocab % dims.tp == 0


# --- canonical weights and the expected GPT-2 state dict ---------------------------------------------------------


def _draw(gen: torch.Generator, shape: tuple[int, ...], scale: float, center: float = 0.0) -> torch.Tensor:
    """center + scale * N(0, 1), drawn in fp32 from ``gen`` and stored as fp16 (Megatron's fp16 model weights)."""
    return (center + scale * torch.randn(*shape, generator=gen)).half()


def _canonical_layer(gen: torch.Generator, dims: Dims) -> dict[str, torch.Tensor]:
    H, F = dims.hidden, dims.ffn
    return {
        # LayerNorm gains near 1, small biases
        "ln1_weight": _draw(gen, (H,), 0.1, 1.0),
        "ln1_bias": _draw(gen, (H,), 0.1),
        # Scores reach about +-2.5: attention is clearly position-dependent, so a misordered head changes the logits
        # by O(1), while the fp32 rounding noise of two independent forwards stays near 2e-6 (logits about +-4).
        "Wq": _draw(gen, (H, H), 0.12),
        "Wk": _draw(gen, (H, H), 0.12),
        "Wv": _draw(gen, (H, H), 0.15),
        "bq": _draw(gen, (H,), 0.1),
        "bk": _draw(gen, (H,), 0.1),
        "bv": _draw(gen, (H,), 0.1),
        "Wo": _draw(gen, (H, H), 0.15),
        "bo": _draw(gen, (H,), 0.05),
        "ln2_weight": _draw(gen, (H,), 0.1, 1.0),
        "ln2_bias": _draw(gen, (H,), 0.1),
        "W1": _draw(gen, (F, H), 0.15),
        "b1": _draw(gen, (F,), 0.1),
        "W2": _draw(gen, (H, F), 0.1),
        "b2": _draw(gen, (H,), 0.05),
    }


def canonical_weights(dims: Dims, seed: int = 0) -> dict:
    """All weights of one model, fp16 and deterministic for a given (dims, seed); layout in the module docstring."""
    _check_dims(dims)
    gen = torch.Generator().manual_seed(seed)
    H = dims.hidden
    word = _draw(gen, (dims.padded_vocab, H), 0.15)  # also the tied output head: keeps logits about +-4
    pos = _draw(gen, (dims.max_pos, H), 0.2)
    layers = [_canonical_layer(gen, dims) for _ in range(dims.layers)]
    return {
        "word": word,
        "pos": pos,
        "layers": layers,
        "ln_f_weight": _draw(gen, (H,), 0.1, 1.0),
        "ln_f_bias": _draw(gen, (H,), 0.1),
    }


def _expected_block(lw: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One GPT-2 block from the canonical layer: Conv1D weights are [in, out], the torch Linear weight transposed."""
    return {
        f"{prefix}.ln_1.weight": lw["ln1_weight"],
        f"{prefix}.ln_1.bias": lw["ln1_bias"],
        f"{prefix}.attn.c_attn.weight": torch.cat([lw["Wq"], lw["Wk"], lw["Wv"]], dim=0).t(),
        f"{prefix}.attn.c_attn.bias": torch.cat([lw["bq"], lw["bk"], lw["bv"]], dim=0),
        f"{prefix}.attn.c_proj.weight": lw["Wo"].t(),
        f"{prefix}.attn.c_proj.bias": lw["bo"],
        f"{prefix}.ln_2.weight": lw["ln2_weight"],
        f"{prefix}.ln_2.bias": lw["ln2_bias"],
        f"{prefix}.mlp.c_fc.weight": lw["W1"].t(),
        f"{prefix}.mlp.c_fc.bias": lw["b1"],
        f"{prefix}.mlp.c_proj.weight": lw["W2"].t(),
        f"{prefix}.mlp.c_proj.bias": lw["b2"],
    }


def expected_state_dict(weights: dict, dims: Dims, trim_vocab: bool = False) -> dict[str, torch.Tensor]:
    """The GPT-2 / GPTMeg state dict a correct converter produces (fp16, contiguous, no lm_head: it is tied to wte)."""
    rows = dims.orig_vocab if trim_vocab else dims.padded_vocab
    out = {
        "transformer.wte.weight": weights["word"][:rows],
        "transformer.wpe.weight": weights["pos"],
    }
    for i, lw in enumerate(weights["layers"]):
        out.update(_expected_block(lw, f"transformer.h.{i}"))
    out["transformer.ln_f.weight"] = weights["ln_f_weight"]
    out["transformer.ln_f.bias"] = weights["ln_f_bias"]
    return {k: v.contiguous().clone() for k, v in out.items()}


# --- args -----------------------------------------------------------------------------------------------------------


class _Delete:
    """Sentinel type: an override value of DELETE removes the field from ``args``."""

    def __repr__(self) -> str:
        return "DELETE"


DELETE = _Delete()


def make_args(dims: Dims, **overrides) -> argparse.Namespace:
    """A Megatron-style ``args`` Namespace with the §1.5 fields; ``overrides`` replace or add fields, DELETE removes."""
    fields = {
        "num_layers": dims.layers,
        "hidden_size": dims.hidden,
        "num_attention_heads": dims.heads,
        "ffn_hidden_size": dims.ffn,
        "kv_channels": dims.head_dim,
        "max_position_embeddings": dims.max_pos,
        "seq_length": dims.max_pos,
        "padded_vocab_size": dims.padded_vocab,
        "make_vocab_size_divisible_by": dims.divisible_by,
        "tokenizer_type": "GPT2BPETokenizer",
        "layernorm_epsilon": 1e-5,
        "apply_query_key_layer_scaling": True,
        "attention_softmax_in_fp32": False,
        "bias_gelu_fusion": True,
        "openai_gelu": False,
        "fp16": True,
        "bf16": False,
        "params_dtype": torch.float16,
        "tensor_model_parallel_size": dims.tp,
        "pipeline_model_parallel_size": dims.pp,
        "virtual_pipeline_model_parallel_size": None,
        "apply_residual_connection_post_layernorm": False,
        "fp32_residual_connection": False,
        "masked_softmax_fusion": True,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    }
    for name, value in overrides.items():
        if value is DELETE:
            fields.pop(name, None)
        else:
            fields[name] = value
    return argparse.Namespace(**fields)


def legacy_args_overrides(dims: Dims) -> dict:
    """Overrides that make ``args`` look like a pre-3.0 (2020) Megatron-LM run (§1.1, §1.5).

    Version < 3.0 args carry ``model_parallel_size`` instead of tensor/pipeline sizes, and v1.0 args have neither
    ``ffn_hidden_size`` nor ``bias_gelu_fusion``. Not applied by any writer unless passed as ``args_overrides``.
    """
    return {
        "model_parallel_size": dims.tp,
        "tensor_model_parallel_size": DELETE,
        "pipeline_model_parallel_size": DELETE,
        "virtual_pipeline_model_parallel_size": DELETE,
        "ffn_hidden_size": DELETE,
        "bias_gelu_fusion": DELETE,
    }


# --- the bigscience enum that needs a stub unpickler ---------------------------------------------------------------

# bigscience megatron/enums.py: class PositionEmbeddingType(enum.Enum): rotary = 1; absolute = 2; alibi = 3.
# The class claims to live in "megatron.enums", so a pickle of one of its members refers to that module by name.
# Every writer saves with megatron_enums_module() active when an args value is a member of this enum.
PositionEmbeddingType = enum.Enum(
    "PositionEmbeddingType",
    [("rotary", 1), ("absolute", 2), ("alibi", 3)],
    module="megatron.enums",
    qualname="PositionEmbeddingType",
)

_ABSENT = object()


@contextlib.contextmanager
def megatron_enums_module():
    """Temporarily register throwaway ``megatron`` and ``megatron.enums`` modules holding PositionEmbeddingType.

    Used while saving (pickle must find the class by name) and by tests that want a plain ``torch.load`` to work.
    Whatever was in ``sys.modules`` under those names before is put back on exit.
    """
    names = ("megatron", "megatron.enums")
    saved = {name: sys.modules.get(name, _ABSENT) for name in names}
    package = types.ModuleType("megatron")
    package.__path__ = []  # a package, so "megatron.enums" resolves
    enums_module = types.ModuleType("megatron.enums")
    enums_module.PositionEmbeddingType = PositionEmbeddingType
    package.enums = enums_module
    sys.modules["megatron"] = package
    sys.modules["megatron.enums"] = enums_module
    try:
        yield enums_module
    finally:
        for name, previous in saved.items():
            if previous is _ABSENT:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def _pickling_context(args: argparse.Namespace, force: bool = False):
    """megatron_enums_module() while saving when ``args`` holds a PositionEmbeddingType member (or when forced)."""
    uses_enum = force or any(isinstance(value, PositionEmbeddingType) for value in vars(args).values())
    return megatron_enums_module() if uses_enum else contextlib.nullcontext()


# --- per-rank tensors -----------------------------------------------------------------------------------------------


def _qkv_layout(version: float | None) -> str:
    """Which per-partition QKV row order a checkpoint_version uses (§1.1, §2.1)."""
    if version is None or version == 0:
        return "3,np,hn"
    if version == 1.0:
        return "np,hn,3"
    if version in (2.0, 3.0):
        return "np,3,hn"
    raise ValueError(f"unknown checkpoint_version {version!r}")


def _qkv_partition(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: Dims, rank: int,
                   version: float | None) -> torch.Tensor:
    """Rank ``rank``'s rows of the QKV weight ([H, H] each) or bias ([H] each), in the layout of ``version``.

    Heads rank*npl ... (rank+1)*npl - 1 of each of Q, K, V are stacked as [3, npl, hn, *rest] (the version-0 layout),
    then permuted to [npl, hn, 3, *rest] (1.0) or [npl, 3, hn, *rest] (2.0/3.0), then flattened to [3*npl*hn, *rest].
    """
    npl, hn = dims.heads_per_partition, dims.head_dim
    rest = q.shape[1:]
    heads = slice(rank * npl, (rank + 1) * npl)
    stacked = torch.stack([t.reshape(dims.heads, hn, *rest)[heads] for t in (q, k, v)])  # [3, npl, hn, *rest]
    tail = tuple(range(3, stacked.dim()))
    layout = _qkv_layout(version)
    if layout == "np,hn,3":
        stacked = stacked.permute(1, 2, 0, *tail)
    elif layout == "np,3,hn":
        stacked = stacked.transpose(0, 1)
    return stacked.reshape(3 * npl * hn, *rest).contiguous()


def tp_partitions(weights: dict, dims: Dims, layer: int, rank: int, version: float | None) -> dict[str, torch.Tensor]:
    """One block's tensors as TP rank ``rank`` stores them (§3.1), with the current ``self_attention.`` names.

    Column-parallel (QKV, dense_h_to_4h) are split on dim 0, row-parallel weights (dense, dense_4h_to_h) on dim 1,
    LayerNorms and the row-parallel biases are replicated. Keys are in Megatron's state_dict order.
    """
    _check_dims(dims)
    lw = weights["layers"][layer]
    tp = dims.tp
    out = OrderedDict()
    out["input_layernorm.weight"] = lw["ln1_weight"]
    out["input_layernorm.bias"] = lw["ln1_bias"]
    out["self_attention.query_key_value.weight"] = _qkv_partition(lw["Wq"], lw["Wk"], lw["Wv"], dims, rank, version)
    out["self_attention.query_key_value.bias"] = _qkv_partition(lw["bq"], lw["bk"], lw["bv"], dims, rank, version)
    out["self_attention.dense.weight"] = lw["Wo"].chunk(tp, dim=1)[rank]
    out["self_attention.dense.bias"] = lw["bo"]
    out["post_attention_layernorm.weight"] = lw["ln2_weight"]
    out["post_attention_layernorm.bias"] = lw["ln2_bias"]
    out["mlp.dense_h_to_4h.weight"] = lw["W1"].chunk(tp, dim=0)[rank]
    out["mlp.dense_h_to_4h.bias"] = lw["b1"].chunk(tp, dim=0)[rank]
    out["mlp.dense_4h_to_h.weight"] = lw["W2"].chunk(tp, dim=1)[rank]
    out["mlp.dense_4h_to_h.bias"] = lw["b2"]
    # own storage per tensor: torch.save of a view would write (and share) the whole parent storage
    return OrderedDict((k, v.contiguous().clone()) for k, v in out.items())


def _word_shard(weights: dict, dims: Dims, rank: int) -> torch.Tensor:
    """Vocab-parallel word-embedding rows of TP rank ``rank`` (contiguous blocks; the padding ends up on the last)."""
    return weights["word"].chunk(dims.tp, dim=0)[rank].contiguous().clone()


def _apply_drift(block: dict[str, torch.Tensor], drift: float) -> None:
    """Shift a replicated tensor on one rank, as BigScience's drifting TP copies did (§3.1); rounded to fp16."""
    weight = block["input_layernorm.weight"]
    block["input_layernorm.weight"] = (weight.float() + drift).to(weight.dtype)


def _block_for_rank(weights: dict, dims: Dims, layer: int, rank: int, version: float | None,
                    drift: float) -> dict[str, torch.Tensor]:
    """tp_partitions, plus the optional drift on TP rank 1's copy of layer 0's input_layernorm.weight."""
    block = tp_partitions(weights, dims, layer, rank, version)
    if drift and layer == 0 and rank == 1:
        _apply_drift(block, drift)
    return block


def _check_drift(dims: Dims, drift: float) -> None:
    if drift and dims.tp < 2:
        raise ValueError("drift needs tp >= 2: it changes TP rank 1's copy of a replicated tensor")


# --- shared file helpers --------------------------------------------------------------------------------------------


def _save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def _rng_states() -> dict:
    """Megatron's RNG entries (v2.5 save_checkpoint). np_rng_state holds a numpy array: weights_only=True refuses it."""
    torch_state = torch.get_rng_state()
    return {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch_state,
        "cuda_rng_state": torch_state.clone(),  # a ByteTensor like torch.cuda.get_rng_state(); no GPU needed
        "rng_tracker_states": {"model-parallel-rng": torch_state.clone()},
    }


# --- Megatron-LM legacy layout (§1.1, §3.2) -------------------------------------------------------------------------


def _megatron_optimizer_state(iteration: int) -> tuple[dict, dict]:
    """A small FP16 optimizer + scheduler state in Megatron's shape (contents are not used by any converter)."""
    optimizer = {
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8,
                                                     "weight_decay": 0.1, "params": []}]},
        "grad_scaler": {"scale": 4096.0, "growth_tracker": 0},
        "fp32_from_fp16_params": [[]],
    }
    lr_scheduler = {"max_lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 0, "num_steps": iteration,
                    "decay_style": "cosine", "decay_steps": 1000}
    return optimizer, lr_scheduler


def _global_layers(dims: Dims, stage: int, chunk: int | None, vpp: int | None) -> list[int]:
    """Global layer indices held by a pipeline stage (and virtual chunk), in local order (§3.2).

    No VPP: global = stage * (L // PP) + j. Interleaved: global = v * (L // VPP) + stage * (L // PP // VPP) + j.
    """
    if vpp is None:
        per = dims.layers_per_stage
        return [stage * per + j for j in range(per)]
    per = dims.layers // dims.pp // vpp
    return [chunk * (dims.layers // vpp) + stage * per + j for j in range(per)]


def _encoder_dict(weights: dict, dims: Dims, layers: list[int], rank: int, version: float | None,
                  old_names: bool, drift: float, final_norm: bool) -> OrderedDict:
    """The flat ``encoder`` (or old ``transformer``) dict: layers.{local j}.*, then final_layernorm.* if last stage."""
    out = OrderedDict()
    for j, layer in enumerate(layers):
        for key, value in _block_for_rank(weights, dims, layer, rank, version, drift).items():
            if old_names:
                key = key.replace("self_attention.", "attention.")
            out[f"layers.{j}.{key}"] = value
    if final_norm:
        out["final_layernorm.weight"] = weights["ln_f_weight"].clone()
        out["final_layernorm.bias"] = weights["ln_f_bias"].clone()
    return out


def _megatron_model_dict(weights: dict, dims: Dims, rank: int, layers: list[int], *, first: bool, last: bool,
                         version: float | None, old_names: bool, drift: float) -> dict:
    """One model (chunk) tree: embedding on the first stage, final_layernorm and the tied head copy on the last."""
    language_model = OrderedDict()
    if first:
        language_model["embedding"] = OrderedDict(
            word_embeddings=OrderedDict(weight=_word_shard(weights, dims, rank)),
            position_embeddings=OrderedDict(weight=weights["pos"].clone()),
        )
    encoder_key = "transformer" if old_names else "encoder"
    language_model[encoder_key] = _encoder_dict(weights, dims, layers, rank, version, old_names, drift, last)
    model = OrderedDict(language_model=language_model)
    if last and not first:  # GPTModel: post_process and not pre_process (only when PP > 1, or VPP chunks)
        model["word_embeddings_for_head"] = OrderedDict(weight=_word_shard(weights, dims, rank))
    return model


def _megatron_models(weights: dict, dims: Dims, rank: int, stage: int, vpp: int | None, version: float | None,
                     old_names: bool, drift: float) -> dict:
    """{"model": ...} or, with an interleaved pipeline, {"model0": ..., "model1": ...} for one (TP, PP) rank."""
    last_stage = stage == dims.pp - 1
    if vpp is None:
        layers = _global_layers(dims, stage, None, None)
        model = _megatron_model_dict(weights, dims, rank, layers, first=stage == 0, last=last_stage,
                                     version=version, old_names=old_names, drift=drift)
        return {"model": model}
    models = {}
    for chunk in range(vpp):
        layers = _global_layers(dims, stage, chunk, vpp)
        models[f"model{chunk}"] = _megatron_model_dict(
            weights, dims, rank, layers, first=stage == 0 and chunk == 0, last=last_stage and chunk == vpp - 1,
            version=version, old_names=old_names, drift=drift)
    return models


def _megatron_rank_dir(dims: Dims, tp_rank: int, pp_rank: int) -> str:
    """mp_rank_{tp:02d} when PP == 1, else mp_rank_{tp:02d}_{pp:03d} (get_checkpoint_name)."""
    return f"mp_rank_{tp_rank:02d}" if dims.pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _megatron_lm_args(dims: Dims, vpp: int | None, args_overrides: dict | None) -> argparse.Namespace:
    extra = {}
    if vpp is not None:
        extra = {"virtual_pipeline_model_parallel_size": vpp,
                 "num_layers_per_virtual_pipeline_stage": dims.layers // dims.pp // vpp}
    return make_args(dims, **{**extra, **(args_overrides or {})})


def write_megatron_lm(root: Path, weights: dict, dims: Dims, *, version: float | None = 3.0, release: bool = False,
                      old_names: bool = False, vpp: int | None = None, iteration: int = 10,
                      args_overrides: dict | None = None, drift: float = 0.0) -> Path:
    """Write a Megatron-LM legacy checkpoint (one model_optim_rng.pt per TP x PP rank) under ``root``; return root.

    version None omits ``checkpoint_version`` (read as 0). old_names uses the v1.0/v2.0 ``transformer`` key and
    ``attention.`` prefix. vpp writes model0..model{vpp-1} per rank. drift shifts TP rank 1's copy of layer 0's
    input_layernorm.weight by that amount (rounded to fp16; about 1e-3 is one ulp near 1).
    """
    root = Path(root)
    _check_dims(dims)
    _check_drift(dims, drift)
    if vpp is not None:
        assert dims.layers % (dims.pp * vpp) == 0, "layers must be a multiple of pp * vpp"
    step_dir = root / ("release" if release else f"iter_{iteration:07d}")
    args = _megatron_lm_args(dims, vpp, args_overrides)
    with _pickling_context(args):
        _write_megatron_lm_ranks(step_dir, weights, dims, args, version, old_names, vpp, iteration, drift)
    root.mkdir(parents=True, exist_ok=True)
    (root / "latest_checkpointed_iteration.txt").write_text("release" if release else str(iteration))
    return root


def _write_megatron_lm_ranks(step_dir: Path, weights: dict, dims: Dims, args: argparse.Namespace,
                             version: float | None, old_names: bool, vpp: int | None, iteration: int,
                             drift: float) -> None:
    """One model_optim_rng.pt per (TP, PP) rank, keys in save_checkpoint's order."""
    optimizer, lr_scheduler = _megatron_optimizer_state(iteration)
    for stage in range(dims.pp):
        for rank in range(dims.tp):
            state = {"args": args}
            if version is not None:
                state["checkpoint_version"] = version
            state["iteration"] = iteration
            state.update(_megatron_models(weights, dims, rank, stage, vpp, version, old_names, drift))
            state.update(optimizer=optimizer, lr_scheduler=lr_scheduler, **_rng_states())
            _save(state, step_dir / _megatron_rank_dir(dims, rank, stage) / "model_optim_rng.pt")


# --- Megatron-DeepSpeed pipeline layout (§1.2) ----------------------------------------------------------------------

# Spec-list offsets of GPTModelPipe (§1.2): block i is in layer file i + first_block; the final norm is at L + final.
_NUMBERINGS = {
    "bigscience": {"embed": 1, "first_block": 3, "final": 4},  # also microsoft before 53db2b14 (2023-07)
    "microsoft": {"embed": 1, "first_block": 2, "final": 2},   # microsoft after 53db2b14: transposes removed
}


def layer_file_indices(dims: Dims, numbering: str = "bigscience") -> dict:
    """{"embed": idx, "blocks": [idx per layer], "final_norm": idx} for a pipe checkpoint's layer_{idx:02d} files."""
    spec = _NUMBERINGS[numbering]
    return {
        "embed": spec["embed"],
        "blocks": [i + spec["first_block"] for i in range(dims.layers)],
        "final_norm": dims.layers + spec["final"],
    }


def _layer_file(step_dir: Path, idx: int, tp_rank: int) -> Path:
    """DeepSpeed ckpt_layer_path: layer_{idx:02d}-model_{tp:02d}-model_states.pt (no pipe or data rank in the name)."""
    return step_dir / f"layer_{idx:02d}-model_{tp_rank:02d}-model_states.pt"


def _embedding_layer(weights: dict, dims: Dims, rank: int, embed_norm: bool) -> OrderedDict:
    """EmbeddingPipe.state_dict(): word_embeddings(.norm when --embed-layernorm) then position_embeddings."""
    out = OrderedDict()
    out["word_embeddings.weight"] = _word_shard(weights, dims, rank)
    if embed_norm:  # a child of word_embeddings, so its keys follow word_embeddings.weight
        out["word_embeddings.norm.weight"] = torch.ones(dims.hidden, dtype=torch.float16)
        out["word_embeddings.norm.bias"] = torch.zeros(dims.hidden, dtype=torch.float16)
    out["position_embeddings.weight"] = weights["pos"].clone()
    return out


def _untied_head_layer(weights: dict, dims: Dims, rank: int) -> OrderedDict:
    """microsoft LMHeadPipe (--untie-embeddings-and-output-weights): its own [V/TP, H] matrix, here half of wte."""
    return OrderedDict({"lm_head.weight": (_word_shard(weights, dims, rank).float() * 0.5).half()})


def _write_pipe_layer_files(step_dir: Path, weights: dict, dims: Dims, numbering: str, untied_head: bool,
                            embed_norm: bool, drift: float) -> None:
    idx = layer_file_indices(dims, numbering)
    for rank in range(dims.tp):
        _save(_embedding_layer(weights, dims, rank, embed_norm), _layer_file(step_dir, idx["embed"], rank))
        for layer, file_idx in enumerate(idx["blocks"]):
            _save(_block_for_rank(weights, dims, layer, rank, 3.0, drift), _layer_file(step_dir, file_idx, rank))
        final = OrderedDict(weight=weights["ln_f_weight"].clone(), bias=weights["ln_f_bias"].clone())
        _save(final, _layer_file(step_dir, idx["final_norm"], rank))
        if untied_head:
            _save(_untied_head_layer(weights, dims, rank), _layer_file(step_dir, idx["final_norm"] + 1, rank))


def _pipe_param_shapes(dims: Dims, numbering: str, stage: int) -> list[OrderedDict]:
    """DeepSpeed param_shapes for one pipeline stage (one param group), assuming equal layers per stage.

    Approximate bookkeeping only (ds_to_universal reads it); a converter must not rely on it.
    """
    idx = layer_file_indices(dims, numbering)
    shapes = OrderedDict()
    vocab_rows = dims.padded_vocab // dims.tp
    if stage in (0, dims.pp - 1):  # the tied embedding lives on the first and the last stage
        shapes["tied_modules.embed.word_embeddings.weight"] = torch.Size([vocab_rows, dims.hidden])
        shapes["tied_modules.embed.position_embeddings.weight"] = torch.Size([dims.max_pos, dims.hidden])
    for layer in _global_layers(dims, stage, None, None):
        for key, shape in _block_shard_shapes(dims).items():
            shapes[f"{idx['blocks'][layer]}.{key}"] = shape
    if stage == dims.pp - 1:
        shapes[f"{idx['final_norm']}.weight"] = torch.Size([dims.hidden])
        shapes[f"{idx['final_norm']}.bias"] = torch.Size([dims.hidden])
    return [shapes]


def _block_shard_shapes(dims: Dims) -> dict[str, torch.Size]:
    """Per-TP-rank shapes of one block's tensors (keys as in tp_partitions)."""
    H, F, tp = dims.hidden, dims.ffn, dims.tp
    return {
        "input_layernorm.weight": torch.Size([H]),
        "input_layernorm.bias": torch.Size([H]),
        "self_attention.query_key_value.weight": torch.Size([3 * H // tp, H]),
        "self_attention.query_key_value.bias": torch.Size([3 * H // tp]),
        "self_attention.dense.weight": torch.Size([H, H // tp]),
        "self_attention.dense.bias": torch.Size([H]),
        "post_attention_layernorm.weight": torch.Size([H]),
        "post_attention_layernorm.bias": torch.Size([H]),
        "mlp.dense_h_to_4h.weight": torch.Size([F // tp, H]),
        "mlp.dense_h_to_4h.bias": torch.Size([F // tp]),
        "mlp.dense_4h_to_h.weight": torch.Size([H, F // tp]),
        "mlp.dense_4h_to_h.bias": torch.Size([H]),
    }


def _ds_config() -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 8, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": 1}, "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 12},
            "steps_per_print": 10, "wall_clock_breakdown": False}


def _deepspeed_state(dims: Dims, args: argparse.Namespace, iteration: int, module, param_shapes) -> dict:
    """engine._save_checkpoint's dict plus Megatron-DeepSpeed's client state (§1.2)."""
    state = {
        "module": module,
        "buffer_names": [],
        "optimizer": None,  # ZeRO-1/2 keeps the optimizer in zero_pp_rank_* files
        "param_shapes": param_shapes,
        "lr_scheduler": {"max_lr": 1e-4, "num_steps": iteration},
        "sparse_tensor_module_names": set(),
        "skipped_steps": 0,
        "global_steps": iteration,
        "global_samples": iteration * 8,
        "dp_world_size": 1,
        "mp_world_size": dims.tp * dims.pp,
        "ds_config": _ds_config(),
        "ds_version": "0.5.5",
    }
    state.update(
        args=args,
        checkpoint_version=3.0,
        iteration=iteration,
        tokens=iteration * 8 * dims.max_pos,
        checkpoint_info={"padded_vocab_size": dims.padded_vocab, "original_vocab_size": dims.orig_vocab},
        **_rng_states(),
    )
    return state


def _pipe_args(dims: Dims, enum_module: bool, args_overrides: dict | None) -> argparse.Namespace:
    extra: dict = {"deepspeed": True}
    if enum_module:
        extra["position_embedding_type"] = PositionEmbeddingType.absolute
    return make_args(dims, **{**extra, **(args_overrides or {})})


def _write_pipe_mp_rank_files(step_dir: Path, dims: Dims, args: argparse.Namespace, iteration: int,
                              numbering: str, enum_module: bool, extra: dict | None = None) -> None:
    """mp_rank_{r:02d}_model_states.pt for r < TP*PP (r = stage * TP + tp_rank) with module=None."""
    with _pickling_context(args, force=enum_module):
        for r in range(dims.tp * dims.pp):
            shapes = _pipe_param_shapes(dims, numbering, r // dims.tp)
            state = _deepspeed_state(dims, args, iteration, None, shapes)
            state.update(extra or {})
            _save(state, step_dir / f"mp_rank_{r:02d}_model_states.pt")


def _write_zero_files(step_dir: Path, dims: Dims) -> None:
    """Minimal ZeRO optimizer files; DeepSpeed's DeepSpeedCheckpoint asserts that they exist (§7 step 5)."""
    for r in range(dims.tp * dims.pp):
        _save({"optimizer_state_dict": {}, "ds_config": _ds_config(), "ds_version": "0.5.5"},
              step_dir / f"zero_pp_rank_0_mp_rank_{r:02d}_optim_states.pt")


def write_deepspeed_pipe(root: Path, weights: dict, dims: Dims, *, numbering: str = "bigscience", iteration: int = 10,
                         args_overrides: dict | None = None, enum_module: bool = False, untied_head: bool = False,
                         embed_norm: bool = False, drift: float = 0.0) -> Path:
    """Write a Megatron-DeepSpeed GPTModelPipe checkpoint (layer files + mp_rank files + latest); return root.

    numbering "bigscience" (embedding 01, blocks 03.., final norm L+4) or "microsoft" (01, 02.., L+2).
    enum_module stores args.position_embedding_type as megatron.enums.PositionEmbeddingType.absolute, so the
    mp_rank files need ``megatron_enums_module()`` or a stub unpickler to load (an args_overrides value
    position_embedding_type=PositionEmbeddingType.rotary/alibi replaces it). untied_head adds an lm_head.weight file
    after the final norm; embed_norm adds word_embeddings.norm.* to the embedding files. Neither touches ``args``
    (pass e.g. untie_embeddings_and_output_weights=True in args_overrides for that), so a converter is tested on
    the file contents alone. drift works as in write_megatron_lm.
    """
    root = Path(root)
    _check_dims(dims)
    _check_drift(dims, drift)
    step_dir = root / f"global_step{iteration}"
    _write_pipe_layer_files(step_dir, weights, dims, numbering, untied_head, embed_norm, drift)
    args = _pipe_args(dims, enum_module, args_overrides)
    _write_pipe_mp_rank_files(step_dir, dims, args, iteration, numbering, enum_module)
    _write_zero_files(step_dir, dims)
    (root / "latest").write_text(f"global_step{iteration}")
    return root


# --- Megatron-DeepSpeed without pipeline (§1.2, microsoft --no-pipeline-parallel) -----------------------------------


def _flat_gpt_module(weights: dict, dims: Dims, rank: int) -> OrderedDict:
    """GPTModel.state_dict() of one TP rank.

    Keys: language_model.embedding.{word,position}_embeddings.weight, language_model.encoder.layers.{i}.*,
    language_model.encoder.final_layernorm.*.
    """
    out = OrderedDict()
    out["language_model.embedding.word_embeddings.weight"] = _word_shard(weights, dims, rank)
    out["language_model.embedding.position_embeddings.weight"] = weights["pos"].clone()
    for layer in range(dims.layers):
        for key, value in tp_partitions(weights, dims, layer, rank, 3.0).items():
            out[f"language_model.encoder.layers.{layer}.{key}"] = value
    out["language_model.encoder.final_layernorm.weight"] = weights["ln_f_weight"].clone()
    out["language_model.encoder.final_layernorm.bias"] = weights["ln_f_bias"].clone()
    return out


def write_deepspeed_nopipe(root: Path, weights: dict, dims: Dims, *, iteration: int = 10) -> Path:
    """Write a non-pipe Megatron-DeepSpeed checkpoint: one mp_rank_{t:02d}_model_states.pt per TP rank; return root.

    Always PP = 1 (a dims with pp > 1 is used with pp replaced by 1).
    """
    root = Path(root)
    dims = dataclasses.replace(dims, pp=1)
    _check_dims(dims)
    step_dir = root / f"global_step{iteration}"
    args = make_args(dims, deepspeed=True, no_pipeline_parallel=True)
    for rank in range(dims.tp):
        module = _flat_gpt_module(weights, dims, rank)
        shapes = [OrderedDict((k, v.shape) for k, v in module.items())]
        _save(_deepspeed_state(dims, args, iteration, module, shapes), step_dir / f"mp_rank_{rank:02d}_model_states.pt")
    _write_zero_files(step_dir, dims)
    (root / "latest").write_text(f"global_step{iteration}")
    return root


# --- DeepSpeed universal checkpoint (§1.3) --------------------------------------------------------------------------

# How ds_to_universal merged each block tensor over TP: a cat dim, or None for replicated ones (which carry no cat_dim).
_UNIVERSAL_CAT_DIM = {
    "input_layernorm.weight": None,
    "input_layernorm.bias": None,
    "self_attention.query_key_value.weight": 0,
    "self_attention.query_key_value.bias": 0,
    "self_attention.dense.weight": 1,
    "self_attention.dense.bias": None,
    "post_attention_layernorm.weight": None,
    "post_attention_layernorm.bias": None,
    "mlp.dense_h_to_4h.weight": 0,
    "mlp.dense_h_to_4h.bias": 0,
    "mlp.dense_4h_to_h.weight": 1,
    "mlp.dense_4h_to_h.bias": None,
}


def _merged_block(weights: dict, dims: Dims, layer: int) -> dict[str, tuple[torch.Tensor, int | None]]:
    """{block key: (full tensor, cat_dim)}: v3 per-rank slices concatenated as ds_to_universal does (QKV on dim 0)."""
    ranks = [tp_partitions(weights, dims, layer, r, 3.0) for r in range(dims.tp)]
    out = {}
    for key, cat_dim in _UNIVERSAL_CAT_DIM.items():
        full = ranks[0][key] if cat_dim is None else torch.cat([rank[key] for rank in ranks], dim=cat_dim)
        out[key] = (full, cat_dim)
    return out


def _fp32_master(t: torch.Tensor, jitter: bool) -> torch.Tensor:
    """The fp32 optimizer master of an fp16 weight. jitter moves it a quarter fp16 ulp up: it still rounds back."""
    if not jitter:
        return t.float()
    up = torch.nextafter(t, torch.full_like(t, math.inf))
    up = torch.where(torch.isinf(up), torch.nextafter(t, torch.zeros_like(t)), up)  # at the fp16 maximum: step down
    return t.float() + 0.25 * (up.float() - t.float())


def _universal_entries(weights: dict, dims: Dims, numbering: str, trimmed: bool,
                       jitter: bool) -> dict[str, dict]:
    """{param name: fp32.pt contents} for every model parameter of a pipe model (§1.3)."""
    idx = layer_file_indices(dims, numbering)
    word = _fp32_master(weights["word"], jitter)
    if trimmed:  # current DeepSpeed: vocab rows stripped to original_vocab_size, flagged vocab_tensor
        word_entry = {"cat_dim": 0, "vocab_tensor": True, "param": word[: dims.orig_vocab].clone()}
    else:  # bigscience: padded rows kept, plus the last padded row as vocab_divisibility_padding_tensor
        word_entry = {"cat_dim": 0, "vocab_divisibility_padding_tensor": word[-1].clone(), "param": word}
    entries = {
        "tied_modules.embed.word_embeddings.weight": word_entry,
        "tied_modules.embed.position_embeddings.weight": {"param": _fp32_master(weights["pos"], jitter)},
    }
    for layer, file_idx in enumerate(idx["blocks"]):
        for key, (full, cat_dim) in _merged_block(weights, dims, layer).items():
            entry = {} if cat_dim is None else {"cat_dim": cat_dim}
            entry["param"] = _fp32_master(full, jitter)
            entries[f"{file_idx}.{key}"] = entry
    entries[f"{idx['final_norm']}.weight"] = {"param": _fp32_master(weights["ln_f_weight"], jitter)}
    entries[f"{idx['final_norm']}.bias"] = {"param": _fp32_master(weights["ln_f_bias"], jitter)}
    return entries


def _write_universal_params(zero_dir: Path, entries: dict[str, dict]) -> None:
    """zero/<name>/fp32.pt, plus exp_avg.pt / exp_avg_sq.pt (zeros, same format) and zero/optimizer_state.pt."""
    for name, entry in entries.items():
        _save(entry, zero_dir / name / "fp32.pt")
        for state in ("exp_avg", "exp_avg_sq"):
            _save({**entry, "param": torch.zeros_like(entry["param"])}, zero_dir / name / f"{state}.pt")
        _save(torch.tensor(10.0), zero_dir / name / "step.pt")
    _save({"param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}]},
          zero_dir / "optimizer_state.pt")


def write_universal(root: Path, weights: dict, dims: Dims, *, trimmed: bool = True, iteration: int = 10,
                    numbering: str = "bigscience", jitter: bool = False, args_overrides: dict | None = None) -> Path:
    """Write a DeepSpeed universal checkpoint (zero/<param>/fp32.pt + copied mp_rank files); return root.

    trimmed=True: word embedding cut to orig_vocab rows with vocab_tensor=True (current DeepSpeed); False: padded,
    bigscience style. Replicated tensors carry no cat_dim, as in both ds_to_universal versions. jitter=True stores
    fp32 masters a quarter ulp above the fp16 weights (they round back to exactly the fp16 weights).
    """
    root = Path(root)
    _check_dims(dims)
    step_name = f"global_step{iteration}_universal"
    step_dir = root / step_name
    _write_universal_params(step_dir / "zero", _universal_entries(weights, dims, numbering, trimmed, jitter))
    args = make_args(dims, **{"deepspeed": True, **(args_overrides or {})})
    extra = {}
    if trimmed:  # microsoft writes universal_checkpoint_info; DeepSpeed's trimming reads original_vocab_size from it
        extra["universal_checkpoint_info"] = {"original_vocab_size": dims.orig_vocab,
                                              "padded_vocab_size": dims.padded_vocab}
    _write_pipe_mp_rank_files(step_dir, dims, args, iteration, numbering, enum_module=False, extra=extra)
    (root / "latest_universal").write_text(step_name)
    return root


# --- independent Megatron-style forward (§7 step 7) -----------------------------------------------------------------


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim with the biased variance (layernorm_epsilon 1e-5), written out."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.float() + bias.float()


def _megatron_gelu(x: torch.Tensor) -> torch.Tensor:
    """Megatron's tanh GELU (openai_gelu / fused bias_gelu formula)."""
    return x * 0.5 * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def _vocab_parallel_embedding(weights: dict, dims: Dims, input_ids: torch.Tensor) -> torch.Tensor:
    """VocabParallelEmbedding: each rank looks up the ids in its row range, zeros the others; the sum is all-reduced."""
    per = dims.padded_vocab // dims.tp
    total = 0
    for rank in range(dims.tp):
        local = input_ids - rank * per
        outside = (local < 0) | (local >= per)
        rows = _word_shard(weights, dims, rank).float()[local.masked_fill(outside, 0)]
        total = total + rows.masked_fill(outside.unsqueeze(-1), 0.0)
    return total


def _attention_partition(h: torch.Tensor, block: dict, dims: Dims) -> torch.Tensor:
    """One TP rank's attention: v3 QKV viewed [b, s, npl, 3*hn] and split, causal softmax; returns the dense partial."""
    b, s, _ = h.shape
    npl, hn = dims.heads_per_partition, dims.head_dim
    qkv_weight = block["self_attention.query_key_value.weight"].float()
    mixed = h @ qkv_weight.t() + block["self_attention.query_key_value.bias"].float()
    q, k, v = mixed.view(b, s, npl, 3 * hn).split(hn, dim=-1)  # each [b, s, npl, hn]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))          # [b, npl, s, hn]
    scores = q @ k.transpose(-1, -2) / math.sqrt(hn)
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = torch.softmax(scores.masked_fill(future, -math.inf), dim=-1)
    context = (probs @ v).transpose(1, 2).reshape(b, s, npl * hn)
    return context @ block["self_attention.dense.weight"].float().t()  # row-parallel: no bias here


def _mlp_partition(h: torch.Tensor, block: dict) -> torch.Tensor:
    """One TP rank's MLP: column-parallel h_to_4h (+ its bias shard), GELU, row-parallel 4h_to_h partial."""
    up = h @ block["mlp.dense_h_to_4h.weight"].float().t() + block["mlp.dense_h_to_4h.bias"].float()
    return _megatron_gelu(up) @ block["mlp.dense_4h_to_h.weight"].float().t()


def _transformer_layer(x: torch.Tensor, blocks: list[dict], dims: Dims) -> torch.Tensor:
    """Pre-LN block from the per-rank shards; row-parallel partials summed over ranks, replicated bias added once."""
    ref = blocks[0]  # replicated tensors are read from rank 0
    h = _layer_norm(x, ref["input_layernorm.weight"], ref["input_layernorm.bias"])
    attn = sum(_attention_partition(h, block, dims) for block in blocks) + ref["self_attention.dense.bias"].float()
    x = x + attn
    h = _layer_norm(x, ref["post_attention_layernorm.weight"], ref["post_attention_layernorm.bias"])
    mlp = sum(_mlp_partition(h, block) for block in blocks) + ref["mlp.dense_4h_to_h.bias"].float()
    return x + mlp


def megatron_forward(weights: dict, dims: Dims, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits [B, T, padded_vocab] computed the way tensor-parallel Megatron does, from the v3 TP shards."""
    _check_dims(dims)
    positions = torch.arange(input_ids.shape[-1])
    x = _vocab_parallel_embedding(weights, dims, input_ids) + weights["pos"].float()[positions]
    for layer in range(dims.layers):
        blocks = [tp_partitions(weights, dims, layer, rank, 3.0) for rank in range(dims.tp)]
        x = _transformer_layer(x, blocks, dims)
    x = _layer_norm(x, weights["ln_f_weight"], weights["ln_f_bias"])
    # parallel_lm_logits: each rank multiplies by its vocab shard; gather concatenates along the vocab
    return torch.cat([x @ _word_shard(weights, dims, rank).float().t() for rank in range(dims.tp)], dim=-1)
