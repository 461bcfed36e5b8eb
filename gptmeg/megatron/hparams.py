"""Megatron's ``args`` (an ``argparse.Namespace`` in every checkpoint) -> GPTMeg config fields, with the refusals.

Old ``args`` lack fields (Megatron-LM v1.0 has no ``ffn_hidden_size`` nor ``bias_gelu_fusion``), so every field is
read with a documented default. Features GPT-2's architecture does not have are refused, one sentence each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import MegatronCheckpointError
from .unpickle import Stub

__all__ = ["ModelShape", "model_shape", "numerics_flags", "megatron_exact_plan", "activation_of",
           "unsupported_features", "NUMERICS_CHOICES"]

NUMERICS_CHOICES = ("gptmeg", "megatron-exact")

# bigscience megatron.enums.PositionEmbeddingType: rotary = 1, absolute = 2, alibi = 3
_POSITION_TYPES = {1: "rotary", 2: "absolute", 3: "alibi"}


def _get(args, name: str, default: Any = None) -> Any:
    return getattr(args, name, default)


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    max_positions: int
    padded_vocab_size: int | None  # None: not in args (then the embedding's rows decide)
    layernorm_epsilon: float
    tp: int
    pp: int
    vpp: int | None
    dtype: str  # "float16" | "bfloat16" | "float32": what the weights were trained in
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _position_type(args) -> str:
    value = _get(args, "position_embedding_type", None)
    if value is None:
        return "absolute"
    if isinstance(value, Stub):
        value = value.value
    if isinstance(value, str):
        return value.split(".")[-1].lower()
    return _POSITION_TYPES.get(getattr(value, "value", value), str(value))


def unsupported_features(args) -> list[str]:
    """What in ``args`` GPT-2's architecture cannot represent (empty when the model converts)."""
    found = []
    position = _position_type(args)
    if position not in ("absolute", "learned_absolute"):
        found.append(f"{position} position embeddings (GPT-2 learns absolute positions)")
    if _get(args, "use_rotary_position_embeddings", False):
        found.append("rotary position embeddings (use_rotary_position_embeddings)")
    if _get(args, "glu_activation", None):
        found.append(f"a GLU activation ({_get(args, 'glu_activation')})")
    if _get(args, "swiglu", False):
        found.append("SwiGLU")
    if str(_get(args, "normalization", "LayerNorm")).lower() not in ("layernorm", "layer_norm"):
        found.append(f"{_get(args, 'normalization')} normalisation (GPT-2 uses LayerNorm)")
    if _get(args, "apply_residual_connection_post_layernorm", False):
        found.append("post-LayerNorm residuals (apply_residual_connection_post_layernorm)")
    if _get(args, "apply_layernorm_1p", False):
        found.append("LayerNorm weights stored as gamma - 1 (apply_layernorm_1p)")
    if _get(args, "embed_layernorm", False) or _get(args, "use_bnb_optimizer", False):
        found.append("a LayerNorm after the word embedding (embed_layernorm / use_bnb_optimizer)")
    if _get(args, "untie_embeddings_and_output_weights", False):
        found.append("an output layer untied from the word embedding")
    if _get(args, "add_bias_linear", True) is False or _get(args, "disable_bias_linear", False):
        found.append("linear layers without biases")
    heads = _get(args, "num_attention_heads")
    kv_heads = _get(args, "num_key_value_heads", None)
    if kv_heads and kv_heads != heads:
        found.append(f"grouped-query attention (num_key_value_heads={kv_heads}, {heads} heads)")
    if _get(args, "group_query_attention", False) and _get(args, "num_query_groups", heads) != heads:
        found.append(f"grouped-query attention (num_query_groups={_get(args, 'num_query_groups')}, {heads} heads)")
    experts = _get(args, "num_experts", None)
    experts = max(experts) if isinstance(experts, (list, tuple)) and experts else experts
    if experts and experts > 1:
        found.append(f"a mixture of experts (num_experts={experts})")
    hidden, kv = _get(args, "hidden_size"), _get(args, "kv_channels", None)
    if kv and heads and hidden and kv * heads != hidden:
        found.append(f"kv_channels x heads ({kv} x {heads}) != hidden_size ({hidden})")
    return found


def model_shape(args, *, tp: int | None = None, pp: int | None = None) -> ModelShape:
    """The model's dimensions and parallel layout from ``args``; refuses what GPTMeg cannot hold."""
    if args is None:
        raise MegatronCheckpointError("the checkpoint has no `args`, so its dimensions are unknown; it was not saved "
                                      "by Megatron-LM / Megatron-DeepSpeed's save_checkpoint.")
    missing = [name for name in ("num_layers", "hidden_size", "num_attention_heads") if _get(args, name) is None]
    if missing:
        raise MegatronCheckpointError(f"the checkpoint's args lack {', '.join(missing)}; cannot size the model.")
    features = unsupported_features(args)
    if features:
        raise MegatronCheckpointError("this model has " + "; ".join(features) + ", which GPT-2's architecture (and so "
                                      "GPTMeg) does not have: it cannot be converted.")
    hidden, heads = int(args.hidden_size), int(args.num_attention_heads)
    if hidden % heads:
        raise MegatronCheckpointError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}.")
    # checkpoint versions < 3.0 name the tensor-parallel degree model_parallel_size
    tp = tp or int(_get(args, "tensor_model_parallel_size", None) or _get(args, "model_parallel_size", None) or 1)
    pp = pp or int(_get(args, "pipeline_model_parallel_size", None) or 1)
    vpp = _get(args, "virtual_pipeline_model_parallel_size", None)
    if _get(args, "bf16", False):
        dtype = "bfloat16"
    elif _get(args, "fp16", False):
        dtype = "float16"
    else:
        dtype = "float32"
    return ModelShape(
        num_layers=int(args.num_layers),
        hidden_size=hidden,
        num_heads=heads,
        ffn_hidden_size=int(_get(args, "ffn_hidden_size", None) or 4 * hidden),  # Megatron's default
        max_positions=int(_get(args, "max_position_embeddings", None) or _get(args, "seq_length", None) or 0),
        padded_vocab_size=_get(args, "padded_vocab_size", None),
        layernorm_epsilon=float(_get(args, "layernorm_epsilon", 1e-5)),
        tp=tp,
        pp=pp,
        vpp=int(vpp) if vpp else None,
        dtype=dtype,
        hidden_dropout=float(_get(args, "hidden_dropout", 0.0) or 0.0),
        attention_dropout=float(_get(args, "attention_dropout", 0.0) or 0.0),
    )


def activation_of(args) -> str:
    """Megatron's GELU choice as a GPTMeg activation name: the fused tanh GELU (``bias_gelu_fusion``, on by default)
    is GPTMeg's Megatron GELU ("gelu_fast"); ``openai_gelu`` is the same tanh formula unfused ("gelu_new");
    otherwise Megatron called ``F.gelu`` (erf, "gelu")."""
    if _get(args, "bias_gelu_fusion", True):
        return "gelu_fast"
    if _get(args, "openai_gelu", False):
        return "gelu_new"
    return "gelu"


def megatron_exact_plan(flags: dict) -> dict:
    """The ``megatron_numerics`` plan (gptmeg.configuration_gptmeg) that reproduces the recorded flags: the layer
    scaling's coefficient scheme from the model class (pipeline: max(1, i); sequential: i + 1), the fp32 softmax
    (forced by layer scaling), the GELU bias fusion, the fused bias-dropout-add, the fp32 residual stream."""
    scaling = flags["apply_query_key_layer_scaling"]
    scheme = "max(1,layer)" if flags["query_key_layer_scaling_coefficients"] == "max(1, i)" else "layer+1"
    return {
        "query_key_layer_scaling": scheme if scaling else None,
        "softmax_in_fp32": bool(flags["attention_softmax_in_fp32"] or scaling),
        "bias_gelu_fusion": bool(flags["bias_gelu_fusion"]),
        "bias_dropout_add_fusion": bool(flags["bias_dropout_fusion"]),
        "fp32_residual_connection": bool(flags["fp32_residual_connection"]),
    }


def numerics_flags(args, pipe_model: bool, tp: int, numerics: str = "gptmeg") -> tuple[dict, list[str]]:
    """Megatron's fp16 attention/residual settings (recorded in the config) and a sentence for each one that the
    chosen numerics plan does not reproduce: GPTMeg's three divergences ("gptmeg"), or those plus the opt-in
    megatron-exact sites ("megatron-exact", see :func:`megatron_exact_plan`)."""
    scaling = bool(_get(args, "apply_query_key_layer_scaling", False))
    flags = {
        "apply_query_key_layer_scaling": scaling,
        # GPTModelPipe numbers attention layers from 0 and takes max(1, i): 1, 1, 2, 3, ...; the sequential model
        # uses i + 1
        "query_key_layer_scaling_coefficients": "max(1, i)" if pipe_model else "i + 1",
        "attention_softmax_in_fp32": bool(_get(args, "attention_softmax_in_fp32", False)) or scaling,
        "masked_softmax_fusion": bool(_get(args, "masked_softmax_fusion", True)),
        "fp32_residual_connection": bool(_get(args, "fp32_residual_connection", False)),
        "bias_gelu_fusion": bool(_get(args, "bias_gelu_fusion", True)),
        "bias_dropout_fusion": bool(_get(args, "bias_dropout_fusion", True)),
        "openai_gelu": bool(_get(args, "openai_gelu", False)),
        "tensor_model_parallel_size": tp,
    }
    notes = []
    if numerics == "megatron-exact":
        if not flags["bias_dropout_fusion"]:
            notes.append("bias_dropout_fusion off: Megatron rounds x W + b to fp16 before adding the residual (two "
                         "roundings); GPTMeg rounds x W + b once in the GEMM, then adds")
        if not flags["attention_softmax_in_fp32"] and flags["masked_softmax_fusion"]:
            notes.append("masked_softmax_fusion without attention_softmax_in_fp32: Megatron's fused kernel computes "
                         "the softmax in fp32 but its torch path (decoding) in fp16; the plan keeps GPTMeg's softmax")
        return flags, notes + _parallelism_notes(tp)
    if scaling:
        notes.append("apply_query_key_layer_scaling: Megatron computes round16(QK^T/(sqrt(d)*c))*c with a per-layer "
                     f"coefficient c ({flags['query_key_layer_scaling_coefficients']}); where c is not a power of two "
                     "some fp16 scores differ from GPTMeg's by up to one ulp")
    if flags["fp32_residual_connection"]:
        notes.append("fp32_residual_connection: Megatron keeps the residual stream in fp32; GPTMeg keeps it in the "
                     "model's dtype")
    return flags, notes + _parallelism_notes(tp)


def _parallelism_notes(tp: int) -> list[str]:
    """What GPTMeg's one full GEMM does not reproduce of a tensor-parallel run's fp16 sums."""
    if tp <= 1:
        return []
    return [f"tensor parallelism {tp}: Megatron's row-parallel layers sum {tp} fp16 partial products; GPTMeg "
            "computes one full GEMM (compare fp16 numerics with a TP=1 run)"]
