"""The three numerical divergences of GPTMeg from GPT-2, as plain PyTorch ops.

Each op reproduces what Megatron-DeepSpeed computes in fp16 on a GPU, on every device:

1. ``MegatronLayerNorm`` - layer norm of a half/bfloat16 input computed in fp32 and rounded once.
2. ``MegatronGELU`` - Megatron's tanh GELU computed in fp32 and rounded once (what its fused jit kernel does),
   with the analytic backward Megatron uses.
3. ``attention_scores`` - ``alpha * Q @ K^T`` with the scale applied inside the GEMM on the fp32 accumulator
   (``torch.baddbmm(..., beta=0, alpha=alpha)``), so the score is rounded once.

fp32 and fp64 inputs are computed in their own precision: the divergences only matter below fp32.

The opt-in "megatron-exact" plan (``config.megatron_numerics``) adds Megatron's further roundings, each one here:

4. ``megatron_attention_probs`` - query-key layer scaling (scores rounded at ``1/(sqrt(d) c)``, then ``* c`` in
   fp32) and the fp32 softmax (Megatron's boolean mask written as -10000 in fp32, one rounding of the probabilities).
5. ``bias_gelu`` - ``c_fc`` skips its bias (``matmul_skip_bias``); the GELU adds it in fp32, one rounding.
6. ``bias_dropout_add`` - after each ``c_proj``: ``residual + dropout(x W + b)`` in fp32, one rounding (none with
   ``fp32_residual_connection``, whose residual stream stays fp32 and is read by ``MegatronLayerNorm`` directly).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from .configuration_gptmeg import MEGATRON_NUMERICS_SITES

__all__ = [
    "GELU_TANH_COEF",
    "GELU_CUBIC_COEF",
    "MegatronLayerNorm",
    "MegatronGELU",
    "megatron_gelu",
    "megatron_gelu_formula",
    "megatron_gelu_backward",
    "attention_scores",
    "is_exporting",
    "DIVERGENCES",
    "MEGATRON_SITES",
    "SITES",
    "gpt2_numerics",
    "site_active",
    "MEGATRON_MASK_VALUE",
    "megatron_attention_probs",
    "matmul_skip_bias",
    "bias_gelu",
    "bias_dropout_add",
]

# Megatron's literals (megatron/model/fused_bias_gelu.py), kept verbatim: they are part of the numerics.
GELU_TANH_COEF = 0.79788456  # ~ sqrt(2 / pi)
GELU_CUBIC_COEF = 0.044715
GELU_BACKWARD_CUBIC_COEF = 0.1070322243  # = 3 * 0.044715 * 0.79788456

_LOW_PRECISION = (torch.float16, torch.bfloat16)

DIVERGENCES = ("layernorm", "gelu", "attention_score")
# the opt-in megatron-exact sites: the keys of config.megatron_numerics (configuration_gptmeg)
MEGATRON_SITES = MEGATRON_NUMERICS_SITES
SITES = DIVERGENCES + MEGATRON_SITES
_GPT2_SITES: set[str] = set()  # divergences switched back to GPT-2's rounding by `gpt2_numerics`

# Megatron's attention_mask_func: scores.masked_fill_(mask, -10000.0) (Megatron-LM v2.5, BigScience until 2022-07)
MEGATRON_MASK_VALUE = -10000.0


@contextlib.contextmanager
def gpt2_numerics(*sites: str) -> Iterator[None]:
    """Within the block, the named divergences compute with GPT-2's half-precision rounding instead of Megatron's:
    "layernorm" (nn.LayerNorm in the input dtype), "gelu" (the formula in the input dtype, rounding every step),
    "attention_score" (Q @ K^T rounded, then scaled and rounded again). The megatron-exact sites (only active in a
    model whose config.megatron_numerics turns them on) go back to GPTMeg's plan: "query_key_layer_scaling" (c = 1),
    "softmax_in_fp32" (scale, mask and softmax in the scores' dtype), "bias_gelu_fusion" and
    "bias_dropout_add_fusion" (the bias added in the GEMM, rounded with it), "fp32_residual_connection" (the
    residual stream in the model's dtype). For ablations and tests that must show what each island changes; not
    thread-safe (it switches module-level state)."""
    unknown = set(sites) - set(SITES)
    if unknown:
        raise ValueError(f"unknown divergence(s) {sorted(unknown)}; choose from {SITES}.")
    added = set(sites) - _GPT2_SITES
    _GPT2_SITES.update(added)
    try:
        yield
    finally:
        _GPT2_SITES.difference_update(added)


def site_active(site: str, configured: bool = True) -> bool:
    """True when ``site`` is configured on and not switched back by :func:`gpt2_numerics`."""
    return bool(configured) and site not in _GPT2_SITES


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bfloat16 tensors, the tensor's own dtype for fp32/fp64."""
    return torch.promote_types(dtype, torch.float32)


def is_exporting() -> bool:
    """True while torch.export / torch.onnx.export traces the model."""
    return bool(torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export())


# --- 1. LayerNorm in fp32 -------------------------------------------------------------------------------------


class MegatronLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that normalises half/bfloat16 input in fp32 (input, weight and bias upcast) and casts the
    result back to the input dtype once. Parameter names are nn.LayerNorm's, so GPT-2 checkpoints load as is."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype == torch.float32 and self.weight is not None and self.weight.dtype in _LOW_PRECISION:
            return self._mixed(hidden_states)
        if hidden_states.dtype not in _LOW_PRECISION or "layernorm" in _GPT2_SITES:
            return super().forward(hidden_states)
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        normed = F.layer_norm(hidden_states.float(), self.normalized_shape, weight, bias, self.eps)
        return normed.to(hidden_states.dtype)

    def _mixed(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """fp32 input, half/bfloat16 parameters: the fp32 residual stream of ``fp32_residual_connection``. Megatron's
        mixed-precision LayerNorm kernel normalises in fp32 and writes the parameters' dtype (rounded once)."""
        low = self.weight.dtype
        if "layernorm" in _GPT2_SITES:  # GPT-2 rounding: the stream rounded to the model dtype, normalised there
            return F.layer_norm(hidden_states.to(low), self.normalized_shape, self.weight, self.bias, self.eps)
        bias = self.bias.float() if self.bias is not None else None
        normed = F.layer_norm(hidden_states, self.normalized_shape, self.weight.float(), bias, self.eps)
        return normed.to(low)


# --- 2. Megatron GELU -------------------------------------------------------------------------------------------


def megatron_gelu_formula(x: torch.Tensor) -> torch.Tensor:
    """Megatron's tanh GELU in the dtype of ``x``, operation order as in Megatron's source."""
    return x * 0.5 * (1.0 + torch.tanh(GELU_TANH_COEF * x * (1.0 + GELU_CUBIC_COEF * x * x)))


def megatron_gelu_backward(x: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Megatron's analytic GELU derivative times ``grad_output``, computed in the dtype of ``x``."""
    tanh_out = torch.tanh(GELU_TANH_COEF * x * (1.0 + GELU_CUBIC_COEF * x * x))
    ff = 0.5 * x * ((1.0 - tanh_out * tanh_out) * (GELU_TANH_COEF + GELU_BACKWARD_CUBIC_COEF * x * x)) + 0.5 * (
        1.0 + tanh_out
    )
    return ff * grad_output


class _MegatronGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return megatron_gelu_formula(x.to(_compute_dtype(x.dtype))).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        compute = _compute_dtype(x.dtype)
        return megatron_gelu_backward(x.to(compute), grad_output.to(compute)).to(grad_output.dtype)


def megatron_gelu(x: torch.Tensor) -> torch.Tensor:
    """Megatron GELU: every intermediate in fp32 (for half/bfloat16 input), one rounding on the way out.

    With autograd recording, the custom backward is used; otherwise (inference, export tracing) the formula is
    applied directly, which traces to ``Cast(fp32) -> formula -> Cast(fp16)`` in an exported graph.
    """
    if "gelu" in _GPT2_SITES:
        return megatron_gelu_formula(x)
    if torch.is_grad_enabled() and x.requires_grad and not is_exporting():
        return _MegatronGeluFunction.apply(x)
    return megatron_gelu_formula(x.to(_compute_dtype(x.dtype))).to(x.dtype)


class MegatronGELU(nn.Module):
    """Module form of :func:`megatron_gelu` (transformers' ``ACT2FN`` holds modules)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return megatron_gelu(x)


# --- 3. Attention scores by baddbmm ----------------------------------------------------------------------------


def attention_scores(query: torch.Tensor, key: torch.Tensor, alpha: float) -> torch.Tensor:
    """Scaled attention scores ``alpha * query @ key^T``, rounded once.

    query: (batch, heads, q_len, head_dim); key: (batch, heads, k_len, head_dim) - keys keep their own length,
    which differs from q_len when a KV cache is used. Returns (batch, heads, q_len, k_len) in query's dtype.

    Eager: ``torch.baddbmm(zeros, Q, K^T, beta=0, alpha=alpha)`` (Megatron's call). The buffer is zero-filled
    rather than ``torch.empty`` so no uninitialised memory is ever an operand.
    Export: the same arithmetic spelled so that the ONNX graph keeps it - QK^T in fp32, times alpha in fp32, one
    cast to the model dtype - because an ONNX ``MatMul`` in fp16 would round before the scale.
    """
    if "attention_score" in _GPT2_SITES:
        return torch.matmul(query, key.transpose(-1, -2)) * alpha  # GPT-2: round the product, scale, round
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[-2]
    q = query.reshape(batch * heads, q_len, head_dim)  # (B*H, Tq, D)
    k_t = key.reshape(batch * heads, k_len, head_dim).transpose(1, 2)  # (B*H, D, Tk)
    if is_exporting():
        compute = _compute_dtype(query.dtype)
        scores = (torch.bmm(q.to(compute), k_t.to(compute)) * alpha).to(query.dtype)
    else:
        buffer = torch.zeros(batch * heads, q_len, k_len, dtype=query.dtype, device=query.device)
        scores = torch.baddbmm(buffer, q, k_t, beta=0.0, alpha=alpha)
    return scores.view(batch, heads, q_len, k_len)


# --- 4. megatron-exact: query-key layer scaling and the fp32 softmax --------------------------------------------


def megatron_attention_probs(
    scores: torch.Tensor, attention_mask: torch.Tensor | None, coefficient: int, softmax_in_fp32: bool
) -> torch.Tensor:
    """Megatron's ``FusedScaleMaskSoftmax`` torch path (the one incremental decoding takes) on the rounded scores.

    scores: (B, H, T, P+T) ``round16(Q K^T / (sqrt(d) * c))`` from :func:`attention_scores` with
    ``alpha = 1 / (sqrt(d) * c)``; attention_mask: transformers' additive mask (0 where a key is attended, negative
    where masked), or None. With ``softmax_in_fp32``: ``float(scores) * c`` (exact for these integers), masked keys
    set to -10000 in fp32, softmax in fp32, one rounding to the scores' dtype. Without (ablation): the same steps
    in the scores' dtype, the mask added as GPTMeg adds it. Megatron's fused kernel writes -inf for causal masks;
    for a row with an attended key the two agree exactly (exp(-10000 - max) is 0 in fp32) unless the row's best
    score is below about -9900. A row with every key masked (a left-padding query) is uniform, as in Megatron's
    torch path.
    """
    if not site_active("softmax_in_fp32", softmax_in_fp32):
        if coefficient != 1:
            scores = scores * coefficient  # rounded in the scores' dtype: what the fp32 softmax avoids
        if attention_mask is not None:
            scores = scores + attention_mask
        return F.softmax(scores, dim=-1).type(scores.dtype)
    compute = _compute_dtype(scores.dtype)
    x = scores.to(compute)
    if coefficient != 1:  # times 1 is exact: skipped (as Megatron's fused kernel with scale 1 changes nothing)
        x = x * float(coefficient)
    if attention_mask is not None:
        x = x.masked_fill(attention_mask < 0, MEGATRON_MASK_VALUE)
    return F.softmax(x, dim=-1).to(scores.dtype)


# --- 5. megatron-exact: bias fused into the GELU --------------------------------------------------------------


def matmul_skip_bias(x: torch.Tensor, conv1d: nn.Module) -> torch.Tensor:
    """``x @ W`` of a transformers ``Conv1D`` without its bias (Megatron's ``skip_bias_add=True``), rounded to x's
    dtype. (..., in) -> (..., out)."""
    out = torch.matmul(x.reshape(-1, x.shape[-1]), conv1d.weight)
    return out.view(*x.shape[:-1], out.shape[-1])


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Megatron's ``bias_gelu`` (fused_bias_gelu.py): ``GELU(fp32(x) + fp32(bias))`` in fp32, rounded once to x's
    dtype, where x is the bias-free GEMM output. Backward is Megatron's analytic GELU derivative (in fp32)."""
    compute = _compute_dtype(x.dtype)
    summed = x.to(compute) + bias.to(compute)
    if "gelu" in _GPT2_SITES:  # GPT-2 rounding of the GELU: the sum rounded, the formula in x's dtype
        return megatron_gelu_formula(summed.to(x.dtype))
    return megatron_gelu(summed).to(x.dtype)


# --- 6. megatron-exact: bias + dropout + residual add ----------------------------------------------------------


def bias_dropout_add(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, p: float, training: bool
) -> torch.Tensor:
    """Megatron's ``bias_dropout_add`` as its jit-fused kernel computes it: ``residual + dropout(x + bias)`` with
    every operand in fp32 and one rounding to the residual's dtype (fp16; none for an fp32 residual stream). x is
    the bias-free GEMM output."""
    compute = torch.promote_types(_compute_dtype(x.dtype), residual.dtype)
    out = F.dropout(x.to(compute) + bias.to(compute), p=p, training=training)
    return (residual.to(compute) + out).to(residual.dtype)
