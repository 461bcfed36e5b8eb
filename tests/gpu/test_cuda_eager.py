"""Eager GPTMeg on CUDA: each divergence in fp16 equals its single-rounding reference computed on the GPU, and the
exported graph's numbers stay within the fp16 targets of eager CUDA fp16. Skipped without CUDA; never run in this
project's sessions (no GPU was available)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_divergences_round_once_on_cuda():
    from gptmeg.megatron_ops import MegatronLayerNorm, attention_scores, megatron_gelu

    x = torch.linspace(-10, 10, 20001, device="cuda").half()
    y = x.float()
    reference = (y * 0.5 * (1.0 + torch.tanh(0.79788456 * y * (1.0 + 0.044715 * y * y)))).half()
    assert torch.equal(megatron_gelu(x), reference)

    ln = MegatronLayerNorm(96).cuda().half()
    h = (torch.randn(64, 96, device="cuda") * 300 + 2000).half()
    expected = torch.nn.functional.layer_norm(h.float(), (96,), ln.weight.float(), ln.bias.float(), ln.eps).half()
    assert torch.equal(ln(h), expected)

    q, k = torch.randn(2, 4, 16, 24, device="cuda").half(), torch.randn(2, 4, 40, 24, device="cuda").half()
    scores = attention_scores(q, k, 24**-0.5)
    fp32 = (q.double() @ k.double().transpose(-1, -2) * 24**-0.5).half()  # exact product, one rounding
    ulp = torch.finfo(torch.float16).eps * fp32.float().abs().clamp_min(2**-14)
    assert ((scores.float() - fp32.float()).abs() <= ulp).all()  # fp32 accumulation order: at most 1 ulp
    gpt2 = torch.matmul(q, k.transpose(-1, -2)) * 24**-0.5
    assert not torch.equal(scores, gpt2)


def test_export_matches_eager_cuda_fp16(tiny_exports):
    from export.api import onnxruntime_runner
    from export.verify import compare_decoder, export_tolerance_failures, validation_inputs
    from gptmeg.tiny import tiny_model

    model = tiny_model(dtype=torch.float16).to("cuda")
    ids, mask = validation_inputs(model.config.vocab_size)
    run = onnxruntime_runner(tiny_exports("fp16").folder / "model.onnx", "cpu")
    metrics = compare_decoder(model, run, ids, mask, graph_dtype="fp16", decode_steps=4)
    print(f"onnxruntime CPU vs eager CUDA fp16: logits max abs {metrics[0].max_abs:.3g}, top-1 {metrics[0].top1:.2%}")
    assert export_tolerance_failures(metrics, "fp16") == []
