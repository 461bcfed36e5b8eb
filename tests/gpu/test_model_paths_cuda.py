"""GPT-2's training and compiled paths on CUDA fp16 (gradient checkpointing, the static cache, torch.compile with
fullgraph=True): each keeps the numbers of the plain eager forward. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.test_model_training import _ids, _model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _report(name: str, ours: torch.Tensor, eager: torch.Tensor) -> None:
    differing = (ours != eager).float().mean().item()
    print(f"{name}: max abs {float((ours.float() - eager.float()).abs().max()):.3g}, {differing:.2%} of values differ")


def test_gradient_checkpointing_on_cuda_fp16_gives_the_same_forward_and_gradients():
    ids = _ids(batch=4, length=32).cuda()
    results = []
    for checkpointing in (False, True):
        model = _model(torch.float16).cuda().train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.logits.detach(), grads))
    (logits, grads), (logits_ckpt, grads_ckpt) = results
    _report("checkpointed logits", logits_ckpt, logits)
    _report("checkpointed gradients", grads_ckpt, grads)
    assert torch.equal(logits_ckpt, logits)  # the recomputed forward is the same kernels on the same inputs
    assert torch.allclose(grads_ckpt, grads, rtol=0, atol=1e-3 * float(grads.abs().max()))


def test_static_cache_generates_the_dynamic_cache_tokens_on_cuda():
    model = _model(torch.float16).cuda()
    ids = _ids(batch=2, length=10).cuda()
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)


def test_compiled_fullgraph_forward_on_cuda_fp16_stays_within_the_fp16_targets():
    import torch._inductor.config as inductor

    model = _model(torch.float16).cuda()
    ids = _ids(batch=2, length=16).cuda()
    with torch.no_grad():
        eager = model(ids).logits
        with inductor.patch(emulate_precision_casts=True):
            compiled = torch.compile(model, fullgraph=True)(ids).logits
    _report("compiled (emulate_precision_casts) vs eager", compiled, eager)
    scale = float(eager.float().abs().max())
    assert float((compiled.float() - eager.float()).abs().max()) <= 0.02 * scale
    assert (compiled.argmax(-1) == eager.argmax(-1)).float().mean() >= 0.99
