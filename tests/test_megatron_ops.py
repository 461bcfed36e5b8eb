"""Each GPTMeg divergence equals an independent reference bit for bit in fp16, and differs from GPT-2's fp16 path."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers.activations import ACT2FN

from gptmeg import megatron_ops
from gptmeg.megatron_ops import MegatronLayerNorm, attention_scores, megatron_gelu, megatron_gelu_formula


def _mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).sum())


# --- LayerNorm --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layernorm_is_fp32_rounded_once(dtype):
    generator = torch.Generator().manual_seed(0)
    width = 96
    ln = MegatronLayerNorm(width)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.1 * torch.randn(width, generator=generator))
        ln.bias.copy_(0.1 * torch.randn(width, generator=generator))
    ln = ln.to(dtype)
    # large activations with a large mean: where a half-precision normalisation would lose the most
    x = (300 * torch.randn(64, width, generator=generator) + 2000).to(dtype)

    ours = ln(x)
    reference = F.layer_norm(x.float(), (width,), ln.weight.float(), ln.bias.float(), 1e-5).to(dtype)
    assert ours.dtype == dtype
    assert _mismatches(ours, reference) == 0

    gpt2_path = torch.nn.functional.layer_norm(x, (width,), ln.weight, ln.bias, 1e-5)  # nn.LayerNorm in dtype
    assert _mismatches(ours, gpt2_path) > 0, "fp32 LayerNorm must differ from the half-precision one here"


def test_layernorm_fp32_is_plain_layernorm():
    ln = MegatronLayerNorm(16)
    x = torch.randn(3, 16)
    assert torch.equal(ln(x), F.layer_norm(x, (16,), ln.weight, ln.bias, ln.eps))


# --- GELU -------------------------------------------------------------------------------------------------------


def _gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """Megatron's fused GELU: load as fp32, every intermediate in fp32, one rounding on store."""
    y = x.float()
    return (y * 0.5 * (1.0 + torch.tanh(0.79788456 * y * (1.0 + 0.044715 * y * y)))).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gelu_is_fp32_rounded_once(dtype):
    x = torch.linspace(-10, 10, 20001).to(dtype)
    ours = megatron_gelu(x)
    assert ours.dtype == dtype
    assert _mismatches(ours, _gelu_reference(x)) == 0
    gpt2_fast_gelu = ACT2FN["gelu_fast"](x)  # transformers' gelu_fast, computed in half precision
    assert _mismatches(ours, gpt2_fast_gelu) > 0


def test_gelu_fp32_matches_transformers_gelu_fast():
    x = torch.linspace(-10, 10, 20001)
    assert (megatron_gelu(x) - ACT2FN["gelu_fast"](x)).abs().max() <= 1e-6


def test_gelu_formula_gradcheck_fp64():
    x = torch.linspace(-6, 6, 97, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(megatron_gelu_formula, (x,))


def test_gelu_custom_backward_gradcheck_fp64():
    # fp64 input: the custom Function computes forward and backward in fp64, so gradcheck tests its backward.
    x = torch.linspace(-6, 6, 97, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(megatron_gelu, (x,))


def test_gelu_custom_backward_matches_autograd_fp32():
    generator = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(4096, generator=generator)).requires_grad_()
    grad_out = torch.randn(4096, generator=generator)
    (custom,) = torch.autograd.grad(megatron_gelu(x), x, grad_out)
    (autograd,) = torch.autograd.grad(megatron_gelu_formula(x), x, grad_out)
    assert (custom - autograd).abs().max() <= 1e-5


def test_gelu_fp16_backward_is_fp32_rounded_once():
    x = torch.linspace(-6, 6, 1001).half().requires_grad_()
    grad_out = torch.full_like(x, 0.37)
    (grad,) = torch.autograd.grad(megatron_gelu(x), x, grad_out)
    y = x.detach().float()
    tanh_out = torch.tanh(0.79788456 * y * (1 + 0.044715 * y * y))
    ff = 0.5 * y * ((1 - tanh_out * tanh_out) * (0.79788456 + 0.1070322243 * y * y)) + 0.5 * (1 + tanh_out)
    assert grad.dtype == torch.float16
    assert _mismatches(grad, (ff * grad_out.float()).half()) == 0


# --- attention scores -------------------------------------------------------------------------------------------


def _scores_reference(query, key, alpha):
    """alpha * Q K^T with an fp32 accumulator summed in head_dim order, scaled in fp32, rounded once."""
    q, k = query.float(), key.float()
    acc = torch.zeros(*q.shape[:-1], k.shape[-2])
    for d in range(q.shape[-1]):
        acc = acc + q[..., :, d : d + 1] * k[..., :, d].unsqueeze(-2)
    return (acc * alpha).to(query.dtype)


@pytest.mark.parametrize("head_dim", [24, 32, 80])
def test_scores_baddbmm_rounded_once(head_dim):
    generator = torch.Generator().manual_seed(head_dim)
    query = torch.randn(2, 3, 5, head_dim, generator=generator).half()
    key = torch.randn(2, 3, 11, head_dim, generator=generator).half()  # keys longer than queries (KV cache)
    alpha = head_dim**-0.5
    ours = attention_scores(query, key, alpha)
    assert ours.shape == (2, 3, 5, 11)
    assert _mismatches(ours, _scores_reference(query, key, alpha)) == 0
    gpt2_path = torch.matmul(query, key.transpose(-1, -2)) * alpha  # GPT-2 eager: round, scale, round
    assert _mismatches(ours, gpt2_path) > 0


def test_scores_export_form_is_one_rounding(monkeypatch):
    """The traced form (fp32 MatMul, fp32 scale, one cast) differs from eager only by fp32 summation order."""
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(2, 4, 16, 24, generator=generator).half()
    key = torch.randn(2, 4, 16, 24, generator=generator).half()
    eager = attention_scores(query, key, 24**-0.5)
    monkeypatch.setattr(megatron_ops, "is_exporting", lambda: True)
    traced = attention_scores(query, key, 24**-0.5)
    ulp = torch.finfo(torch.float16).eps * eager.float().abs().clamp_min(2**-14)
    assert ((traced.float() - eager.float()).abs() <= ulp).all()  # at most one fp16 ulp apart
    assert _mismatches(traced, eager) <= 0.02 * eager.numel()


def test_gpt2_numerics_switches_each_divergence_back():
    from gptmeg.megatron_ops import gpt2_numerics

    x = torch.linspace(-10, 10, 2001).half()
    with gpt2_numerics("gelu"):
        assert torch.equal(megatron_gelu(x), megatron_gelu_formula(x))  # half-precision formula
    assert _mismatches(megatron_gelu(x), _gelu_reference(x)) == 0  # restored on exit
    query, key = torch.randn(1, 2, 4, 24).half(), torch.randn(1, 2, 4, 24).half()
    with gpt2_numerics("attention_score"):
        assert torch.equal(attention_scores(query, key, 0.2), torch.matmul(query, key.transpose(-1, -2)) * 0.2)
    ln = MegatronLayerNorm(24).half()
    big = (torch.randn(8, 24) * 300 + 2000).half()
    with gpt2_numerics("layernorm"):
        assert torch.equal(ln(big), F.layer_norm(big, (24,), ln.weight, ln.bias, ln.eps))
    with pytest.raises(ValueError, match="unknown divergence"):
        with gpt2_numerics("softmax"):
            pass
