"""GPTMeg configuration: GPT-2's config with Megatron's GELU as the default activation, and the opt-in
"megatron-exact" numerics plan (``megatron_numerics``)."""

from __future__ import annotations

from typing import Any

from transformers import GPT2Config
from transformers.activations import ACT2CLS

__all__ = ["GPTMegConfig", "MEGATRON_GELU", "MEGATRON_NUMERICS_SITES", "NUMERICS_PLANS", "COEFFICIENT_SCHEMES",
           "layer_coefficient", "normalize_megatron_numerics"]

MEGATRON_GELU = "gelu_fast"
"""Activation name that means Megatron's GELU in GPTMeg (converted Megatron checkpoints use it)."""

# --- the "megatron-exact" numerics plan ------------------------------------------------------------------------
# Roundings Megatron-DeepSpeed applies beyond GPTMeg's three divergences (research/megatron-checkpoints.md §6),
# each one opt-in. The keys are also the site names of gptmeg.megatron_ops.gpt2_numerics and of the precision plan.
MEGATRON_NUMERICS_SITES = (
    "query_key_layer_scaling",  # scores round16(QK^T / (sqrt(d) * c)), then fp32 * c; value: a coefficient scheme
    "softmax_in_fp32",  # fp32 mask (-10000) and softmax of the fp16 scores, one rounding
    "bias_gelu_fusion",  # c_fc skips its bias; GELU(fp32(round16(x W)) + fp32(b)) in fp32, one rounding
    "bias_dropout_add_fusion",  # round16(fp32(residual) + dropout(fp32(round16(x W)) + fp32(b))) after each c_proj
    "fp32_residual_connection",  # the residual stream stays fp32 (LayerNorms read it, round their output once)
)
# The coefficient c of block i (0-based): Megatron-LM and non-pipeline Megatron-DeepSpeed build layer i + 1;
# Megatron-DeepSpeed's GPTModelPipe passes the 0-based index and ParallelAttention takes max(1, i).
COEFFICIENT_SCHEMES = ("layer+1", "max(1,layer)")
_ALL_ON = {"softmax_in_fp32": True, "bias_gelu_fusion": True, "bias_dropout_add_fusion": True,
           "fp32_residual_connection": False}
NUMERICS_PLANS: dict[str, dict[str, Any]] = {
    # Megatron-LM (and non-pipeline Megatron-DeepSpeed) fp16 defaults 2021-01 ... 2023-11
    "megatron-lm": {"query_key_layer_scaling": "layer+1", **_ALL_ON},
    # Megatron-DeepSpeed pipeline models (GPTModelPipe: every BigScience --deepspeed run)
    "megatron-deepspeed-pipe": {"query_key_layer_scaling": "max(1,layer)", **_ALL_ON},
}


def layer_coefficient(scheme: str | None, layer_idx: int) -> int:
    """Megatron's query-key layer-scaling coefficient of block ``layer_idx`` (0-based); 1 without a scheme."""
    if scheme is None:
        return 1
    if scheme == "layer+1":
        return layer_idx + 1
    if scheme == "max(1,layer)":
        return max(1, layer_idx)
    raise ValueError(f"unknown query_key_layer_scaling scheme {scheme!r}; choose one of {COEFFICIENT_SCHEMES}.")


def normalize_megatron_numerics(value: Any, activation_function: str = MEGATRON_GELU) -> dict[str, Any] | None:
    """The canonical form of a ``megatron_numerics`` setting: None (GPTMeg's plan: the three divergences only), or
    a dict with every site of :data:`MEGATRON_NUMERICS_SITES` (``query_key_layer_scaling``: a scheme of
    :data:`COEFFICIENT_SCHEMES` or None; the others booleans). Accepts a plan name of :data:`NUMERICS_PLANS`,
    "gptmeg" (None), or a dict naming some sites (the rest off). Raises ValueError, saying what to change."""
    if value is None or value == "gptmeg":
        return None
    if isinstance(value, str):
        if value not in NUMERICS_PLANS:
            raise ValueError(f"unknown megatron_numerics plan {value!r}: use one of {', '.join(NUMERICS_PLANS)}, "
                             f"\"gptmeg\" (the default), or a dict of the sites {', '.join(MEGATRON_NUMERICS_SITES)}.")
        value = NUMERICS_PLANS[value]
    if not isinstance(value, dict):
        raise ValueError(f"megatron_numerics must be None, a plan name ({', '.join(NUMERICS_PLANS)}) or a dict of "
                         f"sites, not {type(value).__name__}.")
    unknown = sorted(set(value) - set(MEGATRON_NUMERICS_SITES))
    if unknown:
        raise ValueError(f"megatron_numerics has unknown site(s) {unknown}; the sites are "
                         f"{', '.join(MEGATRON_NUMERICS_SITES)}.")
    scheme = value.get("query_key_layer_scaling")
    if scheme is False:
        scheme = None
    if scheme is not None and scheme not in COEFFICIENT_SCHEMES:
        raise ValueError(f"megatron_numerics query_key_layer_scaling is {scheme!r}: use \"layer+1\" (Megatron-LM, "
                         "non-pipeline Megatron-DeepSpeed), \"max(1,layer)\" (Megatron-DeepSpeed pipeline models) or "
                         "None (no layer scaling).")
    plan: dict[str, Any] = {"query_key_layer_scaling": scheme}
    for site in MEGATRON_NUMERICS_SITES[1:]:
        flag = value.get(site, scheme is not None if site == "softmax_in_fp32" else False)
        if not isinstance(flag, bool):
            raise ValueError(f"megatron_numerics {site} must be true or false, not {flag!r}.")
        plan[site] = flag
    if scheme is not None and not plan["softmax_in_fp32"]:
        raise ValueError("megatron_numerics: query_key_layer_scaling multiplies the fp16 scores back by the "
                         "coefficient in fp32, so it needs softmax_in_fp32 (Megatron forces it on): set "
                         "softmax_in_fp32 to true.")
    if plan["bias_gelu_fusion"] and activation_function != MEGATRON_GELU:
        raise ValueError(f"megatron_numerics bias_gelu_fusion fuses the bias into Megatron's GELU, but "
                         f"activation_function is {activation_function!r}: use {MEGATRON_GELU!r} or set "
                         "bias_gelu_fusion to false.")
    return plan


class GPTMegConfig(GPT2Config):
    """Configuration of a GPTMeg model. Same fields and meaning as ``GPT2Config`` except:

    - ``model_type`` is ``"gptmeg"``;
    - ``activation_function`` defaults to ``"gelu_fast"``, which GPTMeg computes as Megatron's fused GELU
      (fp32, one rounding); every other name keeps transformers' meaning;
    - ``megatron_numerics`` (absent/None by default) opts into Megatron's further fp16 roundings: a plan name
      ("megatron-lm", "megatron-deepspeed-pipe") or a dict of the sites in ``MEGATRON_NUMERICS_SITES``; it is
      stored expanded, with every site named.
    """

    model_type = "gptmeg"
    activation_function: str = MEGATRON_GELU
    # None: GPTMeg's numerics (the three divergences). A plan name or dict: see normalize_megatron_numerics.
    megatron_numerics: dict | str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_gptmeg()

    def _check_gptmeg(self) -> None:
        if self.n_head <= 0 or self.n_embd <= 0 or self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be a positive multiple of n_head ({self.n_head}): each attention "
                "head gets n_embd / n_head channels. Change n_embd or n_head."
            )
        if self.activation_function != MEGATRON_GELU and self.activation_function not in ACT2CLS:
            known = ", ".join(sorted(ACT2CLS))
            raise ValueError(
                f"Unknown activation_function {self.activation_function!r}. Use {MEGATRON_GELU!r} (Megatron's GELU, "
                f"the GPTMeg default) or one of transformers' activations: {known}."
            )
        self.megatron_numerics = normalize_megatron_numerics(self.megatron_numerics, self.activation_function)
        if self.megatron_numerics is not None:
            clashes = [name for name, bad in (("scale_attn_weights=False", not self.scale_attn_weights),
                                              ("scale_attn_by_inverse_layer_idx=True",
                                               self.scale_attn_by_inverse_layer_idx),
                                              ("reorder_and_upcast_attn=True",
                                               getattr(self, "reorder_and_upcast_attn", False))) if bad]
            if clashes:
                raise ValueError(f"megatron_numerics reproduces Megatron's attention, which scales every score by "
                                 f"1/sqrt(head_dim) and multiplies layer scaling back: it cannot be combined with "
                                 f"GPT-2's {', '.join(clashes)}. Remove those settings or megatron_numerics.")
        if self.add_cross_attention:
            raise ValueError(
                "GPTMeg is a decoder-only model and has no cross-attention: set add_cross_attention=False."
            )
