"""Training and compiled-inference paths GPT-2 has: gradient checkpointing, the static cache, torch.compile with
fullgraph=True and custom 4D masks. Each keeps the three fp16 divergences: the fp16 outputs equal a forward pass
written here from the independent references of tests/test_megatron_ops.py, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers import GPT2LMHeadModel

from gptmeg import GPTMegLMHeadModel, megatron_ops
from gptmeg.modeling_gptmeg import GPTMegMLP
from tests.conftest import copy_into, gpt2_config
from tests.test_megatron_ops import _gelu_reference, _scores_reference


def _model(dtype=torch.float32, **config):
    torch.manual_seed(0)
    return copy_into(GPTMegLMHeadModel, GPT2LMHeadModel(gpt2_config(**config)).eval()).to(dtype)


def _ids(batch=2, length=12, seed=4):
    return torch.randint(2, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


def _reference_logits(model: GPTMegLMHeadModel, input_ids: torch.Tensor) -> torch.Tensor:
    """GPTMeg's forward from its weights, written with the references: LayerNorm in fp32 rounded once, the
    Megatron GELU reference, scores accumulated in fp32 and scaled before one rounding; the rest as GPT-2's eager
    path (Conv1D = addmm, additive causal mask, softmax, matmul) in the model dtype."""
    p = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    config = model.config
    heads, width = config.n_head, config.n_embd
    head_dim = width // heads
    batch, length = input_ids.shape
    dtype = p["transformer.wte.weight"].dtype

    def layer_norm(x, prefix):
        w, b = p[prefix + ".weight"], p[prefix + ".bias"]
        return F.layer_norm(x.float(), (width,), w.float(), b.float(), config.layer_norm_epsilon).to(x.dtype)

    def conv1d(x, prefix):
        out = torch.addmm(p[prefix + ".bias"], x.reshape(-1, x.shape[-1]), p[prefix + ".weight"])
        return out.view(*x.shape[:-1], -1)

    def split(x):
        return x.view(batch, length, heads, head_dim).transpose(1, 2)

    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))
    mask = torch.zeros(length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    hidden = p["transformer.wte.weight"][input_ids] + p["transformer.wpe.weight"][torch.arange(length)][None]
    for i in range(config.n_layer):
        block = f"transformer.h.{i}"
        q, k, v = conv1d(layer_norm(hidden, block + ".ln_1"), block + ".attn.c_attn").split(width, dim=2)
        scores = _scores_reference(split(q), split(k), head_dim**-0.5) + mask
        probs = F.softmax(scores, dim=-1).to(dtype)
        context = (probs @ split(v)).transpose(1, 2).reshape(batch, length, width)
        hidden = hidden + conv1d(context, block + ".attn.c_proj")
        inner = _gelu_reference(conv1d(layer_norm(hidden, block + ".ln_2"), block + ".mlp.c_fc"))
        hidden = hidden + conv1d(inner, block + ".mlp.c_proj")
    return F.linear(layer_norm(hidden, "transformer.ln_f"), p["lm_head.weight"])


def test_fp16_eager_forward_equals_the_references():
    """The anchor of this file: eager fp16 GPTMeg is the reference forward bit for bit."""
    model = _model(torch.float16)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _reference_logits(model, ids))


# --- gradient checkpointing ---------------------------------------------------------------------------------------


def _grads(model, ids, checkpointing: bool, **kwargs):
    model.zero_grad(set_to_none=True)
    if checkpointing:
        model.gradient_checkpointing_enable(**kwargs)
    else:
        model.gradient_checkpointing_disable()
    model.train()  # dropout is 0 in these configs: training mode only switches checkpointing on
    output = model(ids, labels=ids)
    output.loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return output, grads


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients_fp32(monkeypatch, use_reentrant):
    model = _model()
    ids = _ids()
    mlp_calls = []
    forward = GPTMegMLP.forward
    monkeypatch.setattr(GPTMegMLP, "forward", lambda self, x: mlp_calls.append(1) or forward(self, x))

    plain, expected = _grads(model, ids, checkpointing=False)
    assert len(mlp_calls) == model.config.n_layer
    mlp_calls.clear()
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": use_reentrant}}
    checkpointed, got = _grads(model, ids, checkpointing=True, **kwargs)
    assert all(block.gradient_checkpointing for block in model.transformer.h)
    assert len(mlp_calls) == 2 * model.config.n_layer  # every block recomputed in the backward pass

    assert torch.equal(plain.logits, checkpointed.logits)
    assert expected.keys() == got.keys() and len(got) == len(list(model.parameters()))
    for name in expected:
        assert float((expected[name] - got[name]).abs().max()) <= 1e-6, name


def test_gradient_checkpointing_fp16_keeps_the_divergences(monkeypatch):
    """fp16 training forward under checkpointing equals the reference forward; the backward (recomputed blocks)
    runs Megatron's GELU backward and gives the gradients of the un-checkpointed model bit for bit."""
    model = _model(torch.float16)
    ids = _ids()
    gelu_backward_calls = []
    backward = megatron_ops.megatron_gelu_backward
    monkeypatch.setattr(
        megatron_ops, "megatron_gelu_backward", lambda x, g: gelu_backward_calls.append(1) or backward(x, g)
    )

    plain, expected = _grads(model, ids, checkpointing=False)
    checkpointed, got = _grads(model, ids, checkpointing=True)
    with torch.no_grad():
        assert torch.equal(checkpointed.logits, _reference_logits(model, ids))
    assert len(gelu_backward_calls) == 2 * model.config.n_layer  # the custom backward, in both runs
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_training_loop_with_gradient_checkpointing_matches_without():
    """What Trainer(gradient_checkpointing=True) does - gradient_checkpointing_enable(), then optimizer steps in
    training mode - gives the losses of the un-checkpointed run (fp32, 1e-6)."""
    ids = _ids(batch=4, length=16)
    losses = {}
    for checkpointing in (False, True):
        model = _model()
        if checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()  # what Trainer does for frozen-embedding (PEFT) setups: harmless
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[checkpointing] = []
        for step in range(3):
            batch = ids[step % 2 * 2 : step % 2 * 2 + 2]
            loss = model(batch, labels=batch, use_cache=True).loss  # use_cache is switched off, as GPT-2 does
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[checkpointing].append(float(loss.detach()))
    assert losses[False][-1] < losses[False][0]  # it trains
    assert max(abs(a - b) for a, b in zip(losses[False], losses[True])) <= 1e-6


# --- static cache, torch.compile, 4D masks ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_static_cache_generates_the_dynamic_cache_tokens(dtype):
    model = _model(dtype)
    ids = _ids(batch=2, length=6)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # left padding
    settings = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dynamic = model.generate(ids, **settings)
        static = model.generate(ids, cache_implementation="static", **settings)
    assert static.shape == (2, 16)
    assert torch.equal(dynamic, static)


def test_compiled_fullgraph_forward_equals_eager_and_references_fp16():
    """One torch.compile(fullgraph=True) call (inductor on CPU, ~20-30 s here). Inductor keeps fused fp16
    intermediates in fp32 unless asked to emulate eager's casts; with that switch on, the compiled fp16 forward is
    eager's - and the references' - bit for bit (the divergence islands survive compilation)."""
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    model = _model(torch.float16)
    ids = _ids()
    # the config's own patch(): monkeypatch's undo would delete the option from inductor's config module
    with torch.no_grad(), inductor_config.patch(emulate_precision_casts=True):
        compiled = torch.compile(model, fullgraph=True)(ids).logits
        assert torch.equal(compiled, model(ids).logits)
        assert torch.equal(compiled, _reference_logits(model, ids))
    torch._dynamo.reset()


def test_the_length_guard_stays_an_eager_error():
    model = _model()
    with torch.no_grad(), pytest.raises(ValueError, match="Sequence too long"):
        model(_ids(batch=1, length=65))


@torch.no_grad()
def test_custom_4d_mask_packs_documents():
    """Two documents packed in one row with a block-diagonal causal 4D mask and positions restarting at 0 give
    each document's logits as if it ran alone; a 4D form of a left-padding mask equals the 2D mask."""
    for dtype in (torch.float32, torch.float16):
        model = _model(dtype)
        first, second = _ids(1, 5, seed=1), _ids(1, 7, seed=2)
        packed = torch.cat([first, second], dim=1)
        positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
        document = torch.cat([torch.zeros(5), torch.ones(7)])
        allowed = (document[:, None] == document[None, :]) & torch.tril(torch.ones(12, 12, dtype=torch.bool))
        mask = torch.zeros(1, 1, 12, 12, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        logits = model(packed, attention_mask=mask, position_ids=positions).logits
        # fp16: other GEMM shapes may round differently (measured: equal); allow 1 ulp at the logits' scale (~1)
        tol = 1e-5 if dtype == torch.float32 else 1e-3
        assert float((logits[:, :5] - model(first).logits).abs().max()) <= tol
        assert float((logits[:, 5:] - model(second).logits).abs().max()) <= tol

    model = _model()
    ids = _ids(2, 9)
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    allowed = torch.tril(torch.ones(9, 9, dtype=torch.bool))[None] & padding.bool()[:, None, :]
    mask = torch.zeros(2, 1, 9, 9).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    expected = model(ids, attention_mask=padding).logits
    got = model(ids, attention_mask=mask).logits
    assert torch.equal(got[1], expected[1]) and torch.equal(got[0, 3:], expected[0, 3:])
