"""GPTMeg: transformers' GPT-2 with Megatron-DeepSpeed's fp16 numerics.

Architecture, parameter names and eager semantics are GPT-2's (so GPT-2 checkpoints load unchanged), except for
three sites, marked ``# DIVERGENCE`` below and implemented in :mod:`gptmeg.megatron_ops`:

1. every LayerNorm (``ln_1``, ``ln_2``, ``ln_f``) computes in fp32 and rounds once   -> ``MegatronLayerNorm``
2. ``activation_function="gelu_fast"`` is Megatron's fused GELU (fp32, one rounding)  -> ``MegatronGELU``
3. attention scores come from ``baddbmm(beta=0, alpha=scale)``: scaled before rounding -> ``attention_scores``

Softmax, masking (transformers' eager additive mask, causal + padding), residuals, dropout and the heads follow
GPT-2's eager path. Shapes: B batch, T new tokens, P cached tokens, H heads, D head_dim, E = H * D.

Opt-in (``config.megatron_numerics``, the "megatron-exact" plan), marked ``# MEGATRON-EXACT``: query-key layer
scaling and the fp32 softmax (``megatron_attention_probs``), the bias fused into the GELU (``bias_gelu``) and into
the residual add (``bias_dropout_add``), and the fp32 residual stream. Without it none of these paths runs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.models.gpt2.modeling_gpt2 import GPT2SequenceSummary
from transformers.pytorch_utils import Conv1D
from transformers.utils import ModelOutput, logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ._compat import CACHE_FIELD, deprecated_past_key_values, pick_cache
from .configuration_gptmeg import MEGATRON_GELU, GPTMegConfig, layer_coefficient
from .megatron_ops import (
    MegatronGELU,
    MegatronLayerNorm,
    attention_scores,
    bias_dropout_add,
    bias_gelu,
    is_exporting,
    matmul_skip_bias,
    megatron_attention_probs,
    site_active,
)
from .parallel import DeviceMap, balanced_device_map, check_device_map

logger = logging.get_logger(__name__)

__all__ = [
    "GPTMegPreTrainedModel",
    "GPTMegModel",
    "GPTMegLMHeadModel",
    "GPTMegDoubleHeadsModel",
    "GPTMegDoubleHeadsModelOutput",
    "GPTMegForSequenceClassification",
    "GPTMegForTokenClassification",
]


def build_activation(name: str) -> nn.Module:
    # DIVERGENCE 2: "gelu_fast" is Megatron's GELU; any other name keeps transformers' meaning.
    return MegatronGELU() if name == MEGATRON_GELU else ACT2FN[name]


def _with_cache(output_cls, cache, **fields):
    """Build a transformers output whose cache field is named `cache` or `past_key_values` by version."""
    return output_cls(**fields, **{CACHE_FIELD: cache})


class GPTMegAttention(nn.Module):
    def __init__(self, config: GPTMegConfig, layer_idx: int):
        super().__init__()
        self.embed_dim = config.n_embd
        self.num_heads = config.n_head
        self.head_dim = self.embed_dim // self.num_heads
        self.layer_idx = layer_idx
        # alpha of baddbmm: 1/sqrt(D), further divided by layer_idx + 1 when asked (as GPT-2).
        self.alpha = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.alpha /= float(layer_idx + 1)
        # GPT-2's stability option: Q and K upcast to fp32, scores and softmax in fp32 (no half-precision rounding)
        self.reorder_and_upcast_attn = config.reorder_and_upcast_attn

        self.c_attn = Conv1D(3 * self.embed_dim, self.embed_dim)
        self.c_proj = Conv1D(self.embed_dim, self.embed_dim)
        self.attn_dropout = nn.Dropout(config.attn_pdrop)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        # MEGATRON-EXACT (opt-in): the layer's scaling coefficient, the fp32 softmax, c_proj's bias left to the block
        plan = getattr(config, "megatron_numerics", None) or {}  # a GPT2Config has none
        self.coefficient = layer_coefficient(plan.get("query_key_layer_scaling"), layer_idx)
        self.megatron_softmax = bool(plan.get("query_key_layer_scaling") or plan.get("softmax_in_fp32"))
        self.softmax_in_fp32 = bool(plan.get("softmax_in_fp32"))
        self.skip_bias_add = bool(plan.get("bias_dropout_add_fusion"))

    def _megatron_probs(self, query, key, attention_mask) -> torch.Tensor:
        # MEGATRON-EXACT 4: scores rounded at alpha = 1/(sqrt(D) c), then * c, mask (-10000) and softmax in fp32
        c = self.coefficient if site_active("query_key_layer_scaling") else 1
        scores = attention_scores(query, key, 1.0 / (math.sqrt(self.head_dim) * c))  # (B, H, T, P+T)
        return megatron_attention_probs(scores, attention_mask, c, self.softmax_in_fp32)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)  # (B, T, E) -> (B, H, T, D)

    def forward(
        self,
        hidden_states: torch.Tensor,  # (B, T, E)
        attention_mask: torch.Tensor | None,  # (B, 1, T, P+T) additive
        cache: Cache | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        query, key, value = self.c_attn(hidden_states).split(self.embed_dim, dim=2)
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # (B, H, P+T, D)

        if self.megatron_softmax:
            probs = self._megatron_probs(query, key, attention_mask)
        else:
            # DIVERGENCE 3: scores = baddbmm(0, Q, K^T, beta=0, alpha) - scaled on the accumulator, rounded once.
            if self.reorder_and_upcast_attn:  # as GPT-2: baddbmm on fp32 Q, K, autocast off; the scores stay fp32
                with torch.autocast(query.device.type, enabled=False):
                    scores = attention_scores(query.float(), key.float(), self.alpha)
            else:
                scores = attention_scores(query, key, self.alpha)  # (B, H, T, P+T)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = nn.functional.softmax(scores, dim=-1).type(value.dtype)
        probs = self.attn_dropout(probs)

        context = torch.matmul(probs, value)  # (B, H, T, D)
        context = context.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.embed_dim).contiguous()
        if site_active("bias_dropout_add_fusion", self.skip_bias_add):
            return matmul_skip_bias(context, self.c_proj), probs  # MEGATRON-EXACT 6: bias added by the block
        return self.resid_dropout(self.c_proj(context)), probs


class GPTMegMLP(nn.Module):
    def __init__(self, intermediate_size: int, config: GPTMegConfig):
        super().__init__()
        self.c_fc = Conv1D(intermediate_size, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, intermediate_size)
        self.act = build_activation(config.activation_function)
        self.dropout = nn.Dropout(config.resid_pdrop)
        plan = getattr(config, "megatron_numerics", None) or {}  # a GPT2Config has none
        self.bias_gelu_fusion = bool(plan.get("bias_gelu_fusion"))
        self.skip_bias_add = bool(plan.get("bias_dropout_add_fusion"))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.bias_gelu_fusion or self.skip_bias_add:
            return self._megatron_forward(hidden_states)
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))

    def _megatron_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if site_active("bias_gelu_fusion", self.bias_gelu_fusion):
            # MEGATRON-EXACT 5: c_fc skips its bias; GELU(fp32(x W) + fp32(b)) in fp32, one rounding
            hidden_states = bias_gelu(matmul_skip_bias(hidden_states, self.c_fc), self.c_fc.bias)
        else:
            hidden_states = self.act(self.c_fc(hidden_states))
        if site_active("bias_dropout_add_fusion", self.skip_bias_add):
            return matmul_skip_bias(hidden_states, self.c_proj)  # MEGATRON-EXACT 6: bias added by the block
        return self.dropout(self.c_proj(hidden_states))


class GPTMegBlock(GradientCheckpointingLayer):  # checkpointable: recomputed in backward when enabled
    def __init__(self, config: GPTMegConfig, layer_idx: int):
        super().__init__()
        inner_dim = config.n_inner if config.n_inner is not None else 4 * config.n_embd
        # DIVERGENCE 1: both block LayerNorms compute in fp32.
        self.ln_1 = MegatronLayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPTMegAttention(config, layer_idx=layer_idx)
        self.ln_2 = MegatronLayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPTMegMLP(inner_dim, config)
        plan = getattr(config, "megatron_numerics", None) or {}  # a GPT2Config has none
        self.fused_residual_add = bool(plan.get("bias_dropout_add_fusion"))

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused_residual_add:
            return self._megatron_forward(hidden_states, attention_mask, cache)
        attn_output, attn_probs = self.attn(self.ln_1(hidden_states), attention_mask, cache)
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, attn_probs

    def _megatron_forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, cache: Cache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # MEGATRON-EXACT 6: c_proj outputs come without their bias; residual + dropout(x W + b) in fp32, one rounding
        fused = site_active("bias_dropout_add_fusion")
        attn_output, attn_probs = self.attn(self.ln_1(hidden_states), attention_mask, cache)
        hidden_states = (bias_dropout_add(attn_output, self.attn.c_proj.bias, hidden_states,
                                          self.attn.resid_dropout.p, self.training)
                         if fused else hidden_states + attn_output)
        mlp_output = self.mlp(self.ln_2(hidden_states))
        hidden_states = (bias_dropout_add(mlp_output, self.mlp.c_proj.bias, hidden_states, self.mlp.dropout.p,
                                          self.training)
                         if fused else hidden_states + mlp_output)
        return hidden_states, attn_probs


def _refuse_cross_attention(kwargs: dict) -> None:
    """GPT-2 takes encoder states for cross-attention; GPTMeg has none, so it says so instead of ignoring them."""
    if kwargs.get("encoder_hidden_states") is not None or kwargs.get("encoder_attention_mask") is not None:
        raise ValueError("GPTMeg is a decoder-only model without cross-attention: encoder_hidden_states and "
                         "encoder_attention_mask cannot be used.")


def _unset_output_flags_from_config(forward):
    """`capture_outputs` falls back on the config only when output_attentions / output_hidden_states are absent from
    the keywords; the heads pass None for "not set", so a None is dropped before it gets there."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        for name in ("output_attentions", "output_hidden_states"):
            if name in kwargs and kwargs[name] is None:
                del kwargs[name]
        return forward(self, *args, **kwargs)

    return wrapper


# from_pretrained's own keyword arguments: never taken for config overrides (dtype is also a config field)
_FROM_PRETRAINED_KWARGS = {
    "dtype", "torch_dtype", "device_map", "attn_implementation", "output_loading_info", "ignore_mismatched_sizes",
    "state_dict", "cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
    "use_safetensors", "weights_only", "low_cpu_mem_usage", "quantization_config", "key_mapping", "tp_plan",
    "tp_size", "max_memory", "offload_folder", "offload_state_dict", "trust_remote_code", "variant", "from_tf",
    "from_flax", "adapter_name", "adapter_kwargs", "generation_config", "use_kernels", "distributed_config",
    "device_mesh", "proxies", "mirror", "_from_auto", "_from_pipeline", "_commit_hash",
}
_LABEL_KWARGS = {"num_labels", "id2label", "label2id"}


class GPTMegPreTrainedModel(PreTrainedModel):
    config_class = GPTMegConfig
    config: GPTMegConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GPTMegBlock"]
    supports_gradient_checkpointing = True
    # forward has no data-dependent branch under torch.compile (the length guard is eager-only): static cache and
    # compiled generation work
    _can_compile_fullgraph = True
    # output_hidden_states / output_attentions are recorded by hooks, as GPT-2's (layer selection included)
    _can_record_outputs = {
        "hidden_states": GPTMegBlock,
        "attentions": OutputRecorder(GPTMegAttention, index=1),
    }
    # Attention is always the eager baddbmm path: SDPA / flash kernels would change the fp16 numerics.
    _supports_sdpa = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _keys_to_ignore_on_load_unexpected = [r"attn\.bias", r"attn\.masked_bias"]  # buffers of old GPT-2 files

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Conv1D):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        if isinstance(module, (GPTMegAttention, GPTMegMLP)):
            # GPT-2 / Megatron scaled init of the two residual projections per block.
            std = self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.c_proj.weight, mean=0.0, std=std)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a GPTMeg directory, or a GPT-2 one (``model_type`` "gpt2": same parameter names, converted config)."""
        if kwargs.get("config") is None and not args:
            from .checkpoint import load_config  # local import: checkpoint imports this module's config

            config = load_config(pretrained_model_name_or_path)
            # config overrides (num_labels=3, use_cache=False, ...) change the config, as for transformers' Auto
            # classes; keyword arguments of from_pretrained itself are left to it
            overrides = {k: kwargs.pop(k) for k in list(kwargs)
                         if k not in _FROM_PRETRAINED_KWARGS and (hasattr(config, k) or k in _LABEL_KWARGS)}
            if overrides:
                config = type(config).from_dict({**config.to_dict(), **overrides})
            kwargs["config"] = config
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:  # a truncated or corrupt model.safetensors: say which file, not the parser
            from .checkpoint import CheckpointError

            raise CheckpointError(
                f"the weights in {pretrained_model_name_or_path} cannot be read ({error}): the safetensors file is "
                "truncated or corrupt. Save the checkpoint again."
            ) from error


class GPTMegModel(GPTMegPreTrainedModel):
    def __init__(self, config: GPTMegConfig):
        super().__init__(config)
        self.embed_dim = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, self.embed_dim)
        self.wpe = nn.Embedding(config.n_positions, self.embed_dim)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPTMegBlock(config, layer_idx=i) for i in range(config.n_layer)])
        self.ln_f = MegatronLayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)  # DIVERGENCE 1
        self.fp32_residual = bool((config.megatron_numerics or {}).get("fp32_residual_connection"))

        self.model_parallel = False
        self.device_map: DeviceMap | None = None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    # --- model parallelism ----------------------------------------------------------------------------------

    def parallelize(self, device_map: DeviceMap | None = None) -> None:
        """Split the blocks over devices: ``device_map`` maps a device to the block indices it holds (every block
        exactly once, contiguous order). Default: balanced over all CUDA devices. Embeddings go to the first
        device, the final LayerNorm to the last."""
        if device_map is None:
            devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
            if not devices:
                raise ValueError(
                    "parallelize() without a device_map splits over CUDA devices, and none is visible. "
                    "Pass device_map={device: [block indices], ...} to use other devices."
                )
            device_map = balanced_device_map(len(self.h), devices)
        self.device_map = check_device_map(device_map, len(self.h))
        devices = list(self.device_map)
        self.wte.to(devices[0])
        self.wpe.to(devices[0])
        for device, blocks in self.device_map.items():
            for index in blocks:
                self.h[index].to(device)
        self.ln_f.to(devices[-1])
        self.model_parallel = True

    def deparallelize(self, device: str | torch.device = "cpu") -> None:
        """Undo :meth:`parallelize`: everything back on one device (CPU by default)."""
        self.model_parallel = False
        self.device_map = None
        self.to(device)

    def _block_device(self, index: int) -> torch.device:
        return self.h[index].ln_1.weight.device

    # --- forward --------------------------------------------------------------------------------------------

    @_unset_output_flags_from_config
    @capture_outputs
    @deprecated_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # (B, T)
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,  # (B, P+T) of 1/0, or a prepared (B, 1, T, P+T) additive mask
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,  # (B or 1, T)
        inputs_embeds: torch.Tensor | None = None,  # (B, T, E)
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,  # the name transformers < 5.2x uses for `cache`
        **kwargs,
    ):
        _refuse_cross_attention(kwargs)
        cache = pick_cache(cache, past_key_values)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            logger.warning_once(
                "`use_cache=True` is incompatible with gradient checkpointing. Setting `use_cache=False`."
            )
            use_cache = False
        # output_attentions / output_hidden_states: recorded by `capture_outputs` (hooks on the blocks)

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if input_ids is not None:
            input_shape = input_ids.shape
            input_ids = input_ids.view(-1, input_shape[-1])
            inputs_embeds = self.wte(input_ids)
        else:
            input_shape = inputs_embeds.shape[:-1]
            inputs_embeds = inputs_embeds.view(-1, *inputs_embeds.shape[-2:])
        batch_size, seq_len = inputs_embeds.shape[:2]

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_len = cache.get_seq_length() if cache is not None else 0  # a tensor for a static cache
        if not (is_exporting() or torch.compiler.is_compiling()):  # eager guard; compiled: no data-dependent branch
            # the limit is the position table: with explicit position_ids (packed sequences restart at 0) a row may
            # be longer than n_positions as long as no position reaches it
            if position_ids is not None and position_ids.numel():
                highest = int(position_ids.max())
                if highest >= self.config.n_positions or int(position_ids.min()) < 0:
                    raise ValueError(
                        f"position_ids reach {highest}, but this model has n_positions={self.config.n_positions} "
                        "position embeddings (positions 0 to n_positions - 1). Shorten the input."
                    )
            elif past_len + seq_len > self.config.n_positions:
                raise ValueError(
                    f"Sequence too long: {int(past_len)} cached + {seq_len} new tokens = {int(past_len) + seq_len}, but this "
                    f"model has n_positions={self.config.n_positions} position embeddings. Shorten the input."
                )
        if position_ids is None:
            position_ids = (torch.arange(seq_len, device=inputs_embeds.device) + past_len).unsqueeze(0)
        else:
            position_ids = position_ids.view(-1, seq_len)

        hidden_states = inputs_embeds + self.wpe(position_ids)
        if token_type_ids is not None:
            hidden_states = hidden_states + self.wte(token_type_ids.view(-1, seq_len))
        hidden_states = self.drop(hidden_states)
        if site_active("fp32_residual_connection", self.fp32_residual):
            hidden_states = hidden_states.float()  # MEGATRON-EXACT: the residual stream stays fp32 (LayerNorms round)

        if attention_mask is not None and attention_mask.ndim < 4:
            attention_mask = attention_mask.view(batch_size, -1)
        # transformers' eager mask: 0 where attended, finfo(dtype).min where causal or padding masks a key.
        mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)

        for index, block in enumerate(self.h):
            if self.model_parallel:
                device = self._block_device(index)
                hidden_states = hidden_states.to(device)
                mask = mask.to(device) if mask is not None else None
            # hidden states positional, cache by keyword: a checkpointed block gets cache=None (it would be updated
            # twice when the backward pass recomputes the block)
            hidden_states = block(hidden_states, mask, cache=cache)[0]

        hidden_states = self.ln_f(hidden_states.to(self.ln_f.weight.device))
        hidden_states = hidden_states.view(*input_shape, hidden_states.shape[-1])

        # hidden_states / attentions are added by `capture_outputs`, which also makes the tuple for return_dict=False
        return _with_cache(
            BaseModelOutputWithPastAndCrossAttentions,
            cache if use_cache else None,
            last_hidden_state=hidden_states,
        )


def _keep_last(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Slice (B, T, E) to the positions whose logits are wanted: the last k (0 = all), or explicit indices."""
    if isinstance(logits_to_keep, int):
        return hidden_states if logits_to_keep == 0 else hidden_states[:, -logits_to_keep:, :]
    return hidden_states[:, logits_to_keep, :]


class _ParallelHeadMixin:
    """parallelize/deparallelize for models with ``self.transformer`` and heads that live on its first device."""

    def parallelize(self, device_map: DeviceMap | None = None) -> None:
        self.transformer.parallelize(device_map)
        first_device = next(iter(self.transformer.device_map))
        for head in self._head_modules():
            head.to(first_device)
        self.model_parallel = True

    def deparallelize(self, device: str | torch.device = "cpu") -> None:
        self.transformer.deparallelize(device)
        self.to(device)
        self.model_parallel = False

    def _head_device(self) -> torch.device:
        return next(self._head_modules()[0].parameters()).device


class GPTMegLMHeadModel(_ParallelHeadMixin, GPTMegPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTMegConfig):
        super().__init__(config)
        self.transformer = GPTMegModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.model_parallel = False
        self.post_init()

    def _head_modules(self):
        return [self.lm_head]  # tied to wte, so it is on the first device anyway

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @deprecated_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ):
        _refuse_cross_attention(kwargs)
        outputs = self.transformer(
            input_ids,
            cache=pick_cache(cache, past_key_values),
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = _keep_last(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.device))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels.to(logits.device), vocab_size=self.config.vocab_size, **kwargs)

        output = _with_cache(
            CausalLMOutputWithCrossAttentions,
            getattr(outputs, CACHE_FIELD),
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict is not False else output.to_tuple()


@dataclass
class GPTMegDoubleHeadsModelOutput(ModelOutput):
    """Output of :class:`GPTMegDoubleHeadsModel` (the fields of GPT-2's, with the cache under the version's name).

    logits: (B, C, T, vocab) language-model scores; mc_logits: (B, C) multiple-choice scores.
    """

    loss: torch.Tensor | None = None
    mc_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mc_logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    @property
    def past_key_values(self) -> Cache | None:
        return self.cache


class GPTMegDoubleHeadsModel(_ParallelHeadMixin, GPTMegPreTrainedModel, GenerationMixin):
    """Language-model head plus a multiple-choice head over ``mc_token_ids`` (GPT-2's double-heads model)."""

    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTMegConfig):
        super().__init__(config)
        config.num_labels = 1
        self.transformer = GPTMegModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.multiple_choice_head = GPT2SequenceSummary(config)
        self.model_parallel = False
        self.post_init()

    def _head_modules(self):
        return [self.lm_head, self.multiple_choice_head]

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @deprecated_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,  # (B, C, T)
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        mc_token_ids: torch.LongTensor | None = None,  # (B, C): index of the classification token per choice
        labels: torch.LongTensor | None = None,
        mc_labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ):
        _refuse_cross_attention(kwargs)
        outputs = self.transformer(
            input_ids,
            cache=pick_cache(cache, past_key_values),
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state.to(self._head_device())
        lm_logits = self.lm_head(hidden_states)
        mc_logits = self.multiple_choice_head(hidden_states, mc_token_ids).squeeze(-1)

        mc_loss = None
        if mc_labels is not None:
            mc_loss = nn.functional.cross_entropy(
                mc_logits.view(-1, mc_logits.size(-1)), mc_labels.to(mc_logits.device).view(-1)
            )
        lm_loss = None
        if labels is not None:
            labels = labels.to(lm_logits.device)
            shift_logits = lm_logits[..., :-1, :].contiguous()
            shift_labels = labels[..., 1:].contiguous()
            lm_loss = nn.functional.cross_entropy(
                shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1)
            )

        output = GPTMegDoubleHeadsModelOutput(
            loss=lm_loss,
            mc_loss=mc_loss,
            logits=lm_logits,
            mc_logits=mc_logits,
            cache=getattr(outputs, CACHE_FIELD),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict is not False else output.to_tuple()


def _last_token_index(input_ids: torch.Tensor | None, pad_token_id: int | None, batch_size: int, device):
    """Index of the rightmost non-pad token of each row (handles left and right padding), as GPT-2 does."""
    if pad_token_id is None:
        if batch_size != 1:
            raise ValueError(
                "Cannot pool a batch of more than one sequence without config.pad_token_id: set it to the "
                "tokenizer's pad token id."
            )
        return torch.full((batch_size,), -1, device=device, dtype=torch.long)
    if input_ids is None:
        return torch.full((batch_size,), -1, device=device, dtype=torch.long)
    not_pad = (input_ids != pad_token_id).to(device, torch.int32)
    positions = torch.arange(input_ids.shape[-1], device=device, dtype=torch.int32)
    return (positions * not_pad).argmax(-1)


class GPTMegForSequenceClassification(GPTMegPreTrainedModel):
    """Classifies a sequence from the hidden state of its last non-pad token."""

    def __init__(self, config: GPTMegConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPTMegModel(config)
        self.score = nn.Linear(config.n_embd, self.num_labels, bias=False)
        self.post_init()

    @deprecated_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ):
        _refuse_cross_attention(kwargs)
        outputs = self.transformer(
            input_ids,
            cache=pick_cache(cache, past_key_values),
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.score(hidden_states.to(self.score.weight.device))  # (B, T, num_labels)
        batch_size = logits.shape[0]
        last = _last_token_index(input_ids, self.config.pad_token_id, batch_size, logits.device)
        pooled_logits = logits[torch.arange(batch_size, device=logits.device), last]

        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits, labels=labels.to(logits.device), pooled_logits=pooled_logits, config=self.config
            )
        output = _with_cache(
            SequenceClassifierOutputWithPast,
            getattr(outputs, CACHE_FIELD),
            loss=loss,
            logits=pooled_logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict is not False else output.to_tuple()


class GPTMegForTokenClassification(GPTMegPreTrainedModel):
    """A label per token from its hidden state."""

    def __init__(self, config: GPTMegConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPTMegModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        if dropout is None:
            dropout = getattr(config, "hidden_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.classifier = nn.Linear(config.n_embd, config.num_labels)
        self.post_init()

    @deprecated_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ):
        _refuse_cross_attention(kwargs)
        outputs = self.transformer(
            input_ids,
            cache=pick_cache(cache, past_key_values),
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = self.dropout(outputs.last_hidden_state)
        logits = self.classifier(hidden_states.to(self.classifier.weight.device))

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels.to(logits.device), self.config)
        output = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict is not False else output.to_tuple()


class GPTMegForQuestionAnswering(GPTMegPreTrainedModel):
    """Extractive question answering: a start and an end logit per token (GPT-2's ``GPT2ForQuestionAnswering``)."""

    def __init__(self, config: GPTMegConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GPTMegModel(config)
        self.qa_outputs = nn.Linear(config.n_embd, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        _refuse_cross_attention(kwargs)
        outputs = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        logits = self.qa_outputs(outputs.last_hidden_state.to(self.qa_outputs.weight.device))  # (B, T, 2)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions)
        output = QuestionAnsweringModelOutput(loss=loss, start_logits=start_logits, end_logits=end_logits,
                                              hidden_states=outputs.hidden_states, attentions=outputs.attentions)
        return output if return_dict is not False else output.to_tuple()
