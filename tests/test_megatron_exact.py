"""The opt-in megatron-exact numerics (config.megatron_numerics) against an independent fp16 reference.

The reference below is written from the formulas of issue 14 / research/megatron-checkpoints.md §6 with plain torch
ops on the model's state_dict; it imports no model code. It must equal the eager model bit for bit in fp16 on CPU,
with left padding and with KV-cache decoding, for 6-layer models whose layer-scaling coefficients include 3 and 5
(head_dim 24: 1/sqrt(24) is not a power of two). Switching any one site back (gpt2_numerics) must change the logits.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from gptmeg import GPTMegConfig, GPTMegLMHeadModel
from gptmeg._compat import CACHE_FIELD
from gptmeg.configuration_gptmeg import NUMERICS_PLANS
from gptmeg.megatron_ops import DIVERGENCES, MEGATRON_SITES, gpt2_numerics

N_LAYER, N_EMBD, N_HEAD, VOCAB, N_POS = 6, 48, 2, 64, 32
HEAD_DIM = N_EMBD // N_HEAD  # 24
PAD = 0

PLANS = {
    "megatron-lm": "megatron-lm",  # c = 1, 2, 3, 4, 5, 6
    "megatron-deepspeed-pipe": "megatron-deepspeed-pipe",  # c = 1, 1, 2, 3, 4, 5
    "fp32-residual": {"query_key_layer_scaling": "layer+1", "softmax_in_fp32": True, "bias_gelu_fusion": True,
                      "bias_dropout_add_fusion": True, "fp32_residual_connection": True},
}


def _config(plan, **overrides) -> GPTMegConfig:
    settings = dict(vocab_size=VOCAB, n_positions=N_POS, n_embd=N_EMBD, n_layer=N_LAYER, n_head=N_HEAD,
                    n_inner=2 * N_EMBD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=PAD,
                    bos_token_id=1, eos_token_id=1, megatron_numerics=plan)
    return GPTMegConfig(**{**settings, **overrides})


@torch.no_grad()
def _model(plan, seed: int = 14, dtype=torch.float16) -> GPTMegLMHeadModel:
    """Weights large enough that every rounding site shows in the logits (biases of a few tenths, O(1) GEMM
    outputs), drawn from a fixed generator in parameter-name order."""
    model = GPTMegLMHeadModel(_config(plan))
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        noise = torch.randn(param.shape, generator=generator)
        if name.endswith((".ln_1.weight", ".ln_2.weight", "ln_f.weight")):
            value = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            value = 0.3 * noise
        else:
            value = 0.15 * noise
        param.copy_(value)
    return model.to(dtype).eval()


# --- the independent reference -----------------------------------------------------------------------------------


def _coefficient(scheme: str | None, i: int) -> int:
    return {"layer+1": i + 1, "max(1,layer)": max(1, i), None: 1}[scheme]


def _ln(x, sd, name, eps=1e-5):
    """fp32 LayerNorm of a fp16 or fp32 input, parameters upcast, rounded once to fp16."""
    w, b = sd[name + ".weight"], sd[name + ".bias"]
    return F.layer_norm(x.float(), (x.shape[-1],), w.float(), b.float(), eps).to(w.dtype)


def _scores16(q, k, alpha):
    """round16(alpha * Q K^T): fp32 accumulator summed in head_dim order (as CPU baddbmm does), scaled, one rounding."""
    acc = torch.zeros(*q.shape[:-1], k.shape[-2])
    qf, kf = q.float(), k.float()
    for d in range(q.shape[-1]):
        acc = acc + qf[..., :, d : d + 1] * kf[..., :, d].unsqueeze(-2)
    return (acc * alpha).to(q.dtype)


def _gelu32(x):
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1.0 + 0.044715 * x * x)))


def reference(sd: dict, plan: dict, input_ids: torch.Tensor, pad_mask: torch.Tensor, past=None):
    """Logits (B, T, V) and the grown cache [(K, V)] per layer, from the formulas of issue 14.

    pad_mask: (B, P+T) 1 for a real token, 0 for padding; past: the previous call's cache or None.
    """
    batch, seq = input_ids.shape
    prev = 0 if past is None else past[0][0].shape[2]
    wte = sd["transformer.wte.weight"]
    half = wte.dtype
    positions = torch.arange(prev, prev + seq)
    x = wte[input_ids] + sd["transformer.wpe.weight"][positions]  # fp16 sum, rounded
    if plan["fp32_residual_connection"]:
        x = x.float()
    key_pos, query_pos = torch.arange(prev + seq), positions
    allowed = (key_pos[None, :] <= query_pos[:, None])[None] & pad_mask[:, None, :].bool()  # (B, T, P+T)
    blocked = ~allowed[:, None]  # (B, 1, T, P+T): Megatron's boolean mask
    cache = []
    for i in range(N_LAYER):
        p = f"transformer.h.{i}."
        h = _ln(x, sd, p + "ln_1").reshape(-1, N_EMBD)
        qkv = torch.addmm(sd[p + "attn.c_attn.bias"], h, sd[p + "attn.c_attn.weight"]).view(batch, seq, 3 * N_EMBD)
        q, k, v = (t.reshape(batch, seq, N_HEAD, HEAD_DIM).transpose(1, 2) for t in qkv.split(N_EMBD, dim=-1))
        if past is not None:
            k, v = torch.cat([past[i][0], k], dim=2), torch.cat([past[i][1], v], dim=2)
        cache.append((k, v))
        c = _coefficient(plan["query_key_layer_scaling"], i)
        s16 = _scores16(q, k, 1.0 / (math.sqrt(HEAD_DIM) * c))  # round16(QK^T / (sqrt(d) c))
        s32 = s16.float() * c  # exact
        s32 = s32.masked_fill(blocked, -10000.0)
        probs = torch.softmax(s32, dim=-1).to(half)  # fp32 softmax, one rounding
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(-1, N_EMBD)
        a16 = torch.mm(ctx, sd[p + "attn.c_proj.weight"]).view(batch, seq, N_EMBD)  # bias skipped: rounded x W
        x = (x.float() + (a16.float() + sd[p + "attn.c_proj.bias"].float())).to(x.dtype)  # fused, one rounding
        h = _ln(x, sd, p + "ln_2").reshape(-1, N_EMBD)
        f32 = torch.mm(h, sd[p + "mlp.c_fc.weight"]).float() + sd[p + "mlp.c_fc.bias"].float()
        g16 = _gelu32(f32).to(half)  # bias + GELU in fp32, one rounding
        m16 = torch.mm(g16, sd[p + "mlp.c_proj.weight"]).view(batch, seq, N_EMBD)
        x = (x.float() + (m16.float() + sd[p + "mlp.c_proj.bias"].float())).to(x.dtype)
    x = _ln(x, sd, "transformer.ln_f")
    return F.linear(x, wte), cache


# --- helpers ----------------------------------------------------------------------------------------------------


def _batch(seq: int = 10, pad: int = 3, seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (2, seq), generator=generator)
    pad_mask = torch.ones_like(input_ids)
    input_ids[0, :pad], pad_mask[0, :pad] = PAD, 0  # row 0 left-padded
    return input_ids, pad_mask


def _mismatch(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).sum())


@pytest.fixture(scope="module", params=list(PLANS))
def plan_model(request):
    model = _model(PLANS[request.param])
    return request.param, model, model.config.megatron_numerics, {k: v.detach() for k, v in model.state_dict().items()}


# --- config -----------------------------------------------------------------------------------------------------


def test_plans_expand_to_every_site_and_round_trip():
    config = _config("megatron-deepspeed-pipe")
    assert config.megatron_numerics == {"query_key_layer_scaling": "max(1,layer)", "softmax_in_fp32": True,
                                        "bias_gelu_fusion": True, "bias_dropout_add_fusion": True,
                                        "fp32_residual_connection": False}
    again = GPTMegConfig.from_dict(config.to_dict())
    assert again.megatron_numerics == config.megatron_numerics
    assert GPTMegConfig().megatron_numerics is None
    partial = _config({"softmax_in_fp32": True})
    assert partial.megatron_numerics["query_key_layer_scaling"] is None and not partial.megatron_numerics[
        "bias_gelu_fusion"]
    assert _config({"query_key_layer_scaling": "layer+1"}).megatron_numerics["softmax_in_fp32"]  # forced, as Megatron


@pytest.mark.parametrize("plan, overrides, message", [
    ("megatron", {}, "unknown megatron_numerics plan"),
    ({"softmax_fp32": True}, {}, "unknown site"),
    ({"query_key_layer_scaling": "i+1"}, {}, "max(1,layer)"),
    ({"query_key_layer_scaling": "layer+1", "softmax_in_fp32": False}, {}, "needs softmax_in_fp32"),
    ({"bias_gelu_fusion": "yes"}, {}, "true or false"),
    ("megatron-lm", {"activation_function": "gelu_new"}, "bias_gelu_fusion"),
    ("megatron-lm", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    (7, {}, "not int"),
])
def test_bad_plans_are_refused_at_config_time(plan, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(plan, **overrides)


def test_all_sites_off_is_gptmeg_bit_for_bit():
    """A plan naming no site runs GPTMeg's own path: identical logits to a model without the field."""
    input_ids, pad_mask = _batch()
    off = _model({})
    plain = _model(None)
    with torch.no_grad():
        assert torch.equal(off(input_ids, attention_mask=pad_mask).logits, plain(input_ids, attention_mask=pad_mask).logits)


# --- eager == reference, bit for bit ------------------------------------------------------------------------------


def test_eager_equals_reference_with_padding(plan_model):
    name, model, plan, sd = plan_model
    input_ids, pad_mask = _batch()
    with torch.no_grad():
        ours = model(input_ids, attention_mask=pad_mask).logits
    ref, _ = reference(sd, plan, input_ids, pad_mask)
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    assert _mismatch(ours, ref) == 0, f"{name}: {_mismatch(ours, ref)} of {ref.numel()} logits differ"


def test_eager_equals_reference_with_kv_cache(plan_model):
    """Prefill 6 tokens of a left-padded batch, then decode 4 steps one token at a time (q_len 1)."""
    name, model, plan, sd = plan_model
    input_ids, pad_mask = _batch(seq=10)
    prefill = 6
    with torch.no_grad():
        out = model(input_ids[:, :prefill], attention_mask=pad_mask[:, :prefill], use_cache=True)
        ref, ref_cache = reference(sd, plan, input_ids[:, :prefill], pad_mask[:, :prefill])
        assert _mismatch(out.logits, ref) == 0
        cache = getattr(out, CACHE_FIELD)
        for step in range(prefill, input_ids.shape[1]):
            mask = pad_mask[:, : step + 1]
            out = model(input_ids[:, step : step + 1], attention_mask=mask, cache=cache, use_cache=True)
            ref, ref_cache = reference(sd, plan, input_ids[:, step : step + 1], mask, past=ref_cache)
            cache = getattr(out, CACHE_FIELD)
            assert _mismatch(out.logits, ref) == 0, f"{name}: decode step {step} differs"
            assert torch.equal(cache.layers[N_LAYER - 1].keys, ref_cache[-1][0])


def test_reference_is_not_gptmeg(plan_model):
    """The reference is sensitive: GPTMeg's plan (no megatron_numerics) on the same weights does not equal it."""
    name, model, plan, sd = plan_model
    input_ids, pad_mask = _batch()
    plain = GPTMegLMHeadModel(_config(None)).to(torch.float16).eval()
    plain.load_state_dict(sd)
    with torch.no_grad():
        ours = plain(input_ids, attention_mask=pad_mask).logits
    ref, _ = reference(sd, plan, input_ids, pad_mask)
    assert _mismatch(ours, ref) > 0


# --- each site matters ---------------------------------------------------------------------------------------------


def _sites_of(plan: dict) -> list[str]:
    return [*DIVERGENCES, *(s for s in MEGATRON_SITES if plan[s])]


# CPU fp16 F.layer_norm already accumulates in fp32 (DESIGN.md): its island flips ~0.01 % of elements, which may or
# may not reach these logits, so it is reported but not asserted here (tests/test_megatron_ops.py proves it).
_REPORTED_ONLY = {"layernorm"}


def test_switching_any_site_off_changes_the_logits(plan_model, capsys):
    name, model, plan, sd = plan_model
    input_ids, pad_mask = _batch()
    with torch.no_grad():
        exact = model(input_ids, attention_mask=pad_mask).logits
        changed = {}
        for site in _sites_of(plan):
            with gpt2_numerics(site):
                ablated = model(input_ids, attention_mask=pad_mask).logits
            changed[site] = (_mismatch(ablated, exact), float((ablated.float() - exact.float()).abs().max()))
        assert torch.equal(model(input_ids, attention_mask=pad_mask).logits, exact)  # restored on exit
    with capsys.disabled():
        scale = float(exact.float().abs().max())
        print(f"\n[{name}] fp16 logits that change when one site is switched off (of {exact.numel()}, "
              f"max |logit| {scale:.2f}):")
        for site, (count, worst) in changed.items():
            print(f"  {site:26s} {count:5d}  max |diff| {worst:.4f}")
    unchanged = [site for site, (count, _) in changed.items() if count == 0 and site not in _REPORTED_ONLY]
    assert not unchanged, f"{name}: switching off {unchanged} changes nothing"


def test_training_step_runs_and_dropout_is_fused():
    """Backward works through every megatron-exact site (fp32 islands included), and dropout is live in training."""
    model = _model(PLANS["fp32-residual"], dtype=torch.float32)
    model.config.resid_pdrop = 0.5
    for block in model.transformer.h:
        block.attn.resid_dropout.p = block.mlp.dropout.p = 0.5
    model.train()
    input_ids, pad_mask = _batch()
    out = model(input_ids, attention_mask=pad_mask, labels=input_ids)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.transformer.h[0].attn.c_proj.bias.grad.abs().sum() > 0  # the fused bias gets its gradient
    with torch.no_grad():
        a, b = model(input_ids, attention_mask=pad_mask).logits, model(input_ids, attention_mask=pad_mask).logits
    assert not torch.equal(a, b)


def test_fp16_training_backward_is_finite():
    model = _model("megatron-lm").train()
    input_ids, pad_mask = _batch()
    logits = model(input_ids, attention_mask=pad_mask).logits
    logits.float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_softmax_in_fp32_alone_is_invisible_in_cpu_eager(capsys):
    """Measured, not a goal: without layer scaling the fp32 softmax gives the probabilities of torch's CPU half
    softmax (which computes in fp32 and rounds once). The site still matters for an exported graph, where an fp16
    Softmax node is the runtime's to round. Reported; the equality is not asserted (it is torch's kernel choice)."""
    model = _model({"softmax_in_fp32": True})
    input_ids, pad_mask = _batch()
    with torch.no_grad():
        exact = model(input_ids, attention_mask=pad_mask, output_attentions=True)
        with gpt2_numerics("softmax_in_fp32"):
            ablated = model(input_ids, attention_mask=pad_mask, output_attentions=True)
    probs = sum(_mismatch(a, b) for a, b in zip(exact.attentions, ablated.attentions))
    with capsys.disabled():
        print(f"\n[softmax_in_fp32 only] probabilities differing from the fp16 softmax: {probs} of "
              f"{sum(a.numel() for a in exact.attentions)}; logits: {_mismatch(exact.logits, ablated.logits)}")
    assert torch.isfinite(exact.logits).all()


# --- python -m gptmeg.convert --numerics megatron-exact ------------------------------------------------------------


@pytest.fixture(scope="module")
def synth():
    import megatron_synth as ms

    return ms, ms.Dims(), ms.canonical_weights(ms.Dims())  # 4 layers: pipe coefficients 1, 1, 2, 3


def test_convert_sets_the_plan_from_the_checkpoint_args(synth, tmp_path):
    from gptmeg.megatron import convert

    ms, dims, weights = synth
    pipe = convert(ms.write_deepspeed_pipe(tmp_path / "pipe", weights, dims), numerics="megatron-exact")
    assert pipe.config.megatron_numerics == NUMERICS_PLANS["megatron-deepspeed-pipe"]
    assert pipe.record["numerics_plan"] == "megatron-exact"
    assert not any("apply_query_key_layer_scaling" in n for n in pipe.record["numerics_not_reproduced"])
    sequential = convert(ms.write_megatron_lm(tmp_path / "lm", weights, dims,
                                              args_overrides={"fp32_residual_connection": True}),
                         numerics="megatron-exact")
    assert sequential.config.megatron_numerics == {**NUMERICS_PLANS["megatron-lm"], "fp32_residual_connection": True}
    plain = convert(tmp_path / "lm")
    assert plain.config.megatron_numerics is None and plain.record["numerics_plan"] == "gptmeg"
    unscaled = convert(ms.write_megatron_lm(tmp_path / "noscale", weights, dims, args_overrides={
        "apply_query_key_layer_scaling": False, "attention_softmax_in_fp32": False, "bias_dropout_fusion": False}),
        numerics="megatron-exact")
    assert unscaled.config.megatron_numerics["query_key_layer_scaling"] is None
    assert unscaled.config.megatron_numerics["bias_dropout_add_fusion"] is False
    assert any("bias_dropout_fusion" in n for n in unscaled.notes)


def test_convert_cli_numerics_flag(synth, tmp_path):
    from tests.clitools import run_cli

    ms, dims, weights = synth
    src = ms.write_deepspeed_pipe(tmp_path / "ckpt", weights, dims)
    result = run_cli("gptmeg.convert", src, tmp_path / "out", "--numerics", "megatron-exact")
    assert result.returncode == 0, result.stderr
    assert "numerics megatron-exact" in result.stderr
    model = GPTMegLMHeadModel.from_pretrained(tmp_path / "out")
    assert model.config.megatron_numerics["query_key_layer_scaling"] == "max(1,layer)"
    assert [block.attn.coefficient for block in model.transformer.h] == [1, 1, 2, 3]
    bad = run_cli("gptmeg.convert", src, tmp_path / "out2", "--numerics", "exact")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr and "Traceback" not in bad.stderr


# --- export: the megatron-exact sites survive into the fp16 graph ------------------------------------------------


@pytest.fixture(scope="module")
def exact_exports(tmp_path_factory):
    """fp16 exports (python -m export's export_model: precision plan checked, onnxruntime validated against eager
    within its fp16 targets) of a megatron-lm model and of the fp32-residual plan, made once."""
    from export import export_model

    root = tmp_path_factory.mktemp("exact")
    made = {}

    def get(name: str):
        if name not in made:
            source = root / f"{name}-model"
            _model(PLANS[name], dtype=torch.float32).save_pretrained(source)
            made[name] = export_model(str(source), root / f"{name}-fp16", dtype="fp16")
        return made[name]

    return get


@pytest.mark.parametrize("name", ["megatron-lm", "fp32-residual"])
def test_exact_export_passes_the_checker_site_by_site(exact_exports, name, capsys):
    import json

    result = exact_exports(name)
    contract = result.contract
    assert contract.ok and contract.plan == "megatron-exact"
    plan = PLANS[name] if isinstance(PLANS[name], dict) else NUMERICS_PLANS[name]
    want = {"layernorm": 2 * N_LAYER + 1, "gelu": N_LAYER, "attention_score": N_LAYER,
            "query_key_layer_scaling": N_LAYER, "softmax_in_fp32": N_LAYER, "bias_gelu_fusion": N_LAYER,
            "bias_dropout_add_fusion": 2 * N_LAYER}
    if plan["fp32_residual_connection"]:
        want["fp32_residual_connection"] = 2 * N_LAYER
    assert contract.counts == want
    scaling = [s for s in contract.sites if s.kind == "query_key_layer_scaling"]
    assert [s.scope for s in scaling] == [f"transformer.h.{i}.attn" for i in range(N_LAYER)]
    assert [s.detail.split(":")[0] for s in scaling] == ["c=1"] + [f"c={c}" for c in range(2, N_LAYER + 1)]
    manifest = json.loads(result.manifest.read_text())
    assert manifest["numerics_plan"] == "megatron-exact"
    assert manifest["precision_plan"]["plan"] == "megatron-exact"
    assert manifest["config"]["megatron_numerics"] == plan
    verification = result.verification
    assert verification is not None and verification.ok  # python -m export's fp16 targets
    logits = verification.output("logits")
    assert logits.max_abs <= 0.02 * logits.reference_max and logits.top1 >= 0.99
    with capsys.disabled():
        print(f"\n[{name} export] {contract.summary()}\n  onnxruntime CPU vs eager fp16 over {logits.count} logits: "
              f"max abs {logits.max_abs:.4f} (largest logit {logits.reference_max:.2f}), top-1 {logits.top1:.2%}")


def _edited(result, tmp_path, edit):
    """The export's graph with ``edit(model, producers)`` applied, checked against the export's own config."""
    import onnx

    from validate.graph_contract import check_graph_file

    model = onnx.load(str(result.folder / "model.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    edit(model, producers)
    path = tmp_path / "edited.onnx"
    onnx.save(model, str(path))
    import json

    return check_graph_file(path, json.loads(result.manifest.read_text())["config"])


def _bypass(model, node):
    """Remove ``node`` (a Cast) and feed its input to its consumers."""
    for consumer in model.graph.node:
        for k, name in enumerate(consumer.input):
            if name == node.output[0]:
                consumer.input[k] = node.input[0]
    model.graph.node.remove(node)


def _cast(node, to):
    return node.op_type == "Cast" and any(a.name == "to" and a.i == to for a in node.attribute)


def test_a_lost_site_is_rejected_at_its_module(exact_exports, tmp_path):
    from onnx import TensorProto

    from export.precision_plan import module_scope

    result = exact_exports("megatron-lm")

    def drop_score_upcast(model, producers):  # layer 2: the fp16 scores go to Mul(c=3) without Cast(fp32)
        softmax = [n for n in model.graph.node if n.op_type == "Softmax"][2]
        node = producers[softmax.input[0]]
        while not _cast(node, TensorProto.FLOAT):
            node = producers[node.input[-1] if node.op_type == "Where" else node.input[0]]
        _bypass(model, node)

    report = _edited(result, tmp_path, drop_score_upcast)
    broken = {(v.kind, v.scope) for v in report.violations}
    assert ("query_key_layer_scaling", "transformer.h.2.attn") in broken
    assert ("softmax_in_fp32", "transformer.h.2.attn") in broken
    assert {scope for _, scope in broken} == {"transformer.h.2.attn"}

    def drop_residual_rounding(model, producers):  # block 3's attention residual sum stays fp32
        adds = [n for n in model.graph.node if n.op_type == "Add" and module_scope(n) == "transformer.h.3"]
        node = next(n for n in model.graph.node if _cast(n, TensorProto.FLOAT16) and n.input[0] == adds[1].output[0])
        _bypass(model, node)

    report = _edited(result, tmp_path, drop_residual_rounding)
    broken = {(v.kind, v.scope): v.detail for v in report.violations}
    assert "not rounded to fp16" in broken[("bias_dropout_add_fusion", "transformer.h.3")]
    assert {scope for _, scope in broken} <= {"transformer.h.3", "transformer.h.3.ln_2"}  # the LN reads fp32 too

    def drop_gelu_bias_upcast(model, producers):  # block 4: the bias added to the fp16 GEMM output
        add = next(n for n in model.graph.node if n.op_type == "Add" and module_scope(n) == "transformer.h.4.mlp")
        cast = next(producers[x] for x in add.input if x in producers and _cast(producers[x], TensorProto.FLOAT)
                    and producers[producers[x].input[0]].op_type in ("Reshape", "MatMul"))
        _bypass(model, cast)

    report = _edited(result, tmp_path, drop_gelu_bias_upcast)
    kinds = {(v.kind, v.scope) for v in report.violations}
    assert ("bias_gelu_fusion", "transformer.h.4.mlp") in kinds
    assert {scope for _, scope in kinds} == {"transformer.h.4.mlp"}


def test_gptmeg_plan_graph_is_not_a_megatron_exact_graph(tiny_exports):
    """The built-in model's export (GPTMeg's plan) checked as if it were megatron-exact: every new site is missing
    or broken, so a graph cannot pass for the wrong plan."""
    from export.precision_plan import check_precision_plan, expected_sites

    graph = tiny_exports("fp16").folder / "model.onnx"
    report = check_precision_plan(graph, expected_sites(3, "gelu_fast", megatron_numerics=NUMERICS_PLANS["megatron-lm"],
                                                        head_dim=24))
    kinds = {v.kind for v in report.violations}
    assert {"query_key_layer_scaling", "bias_gelu_fusion", "bias_dropout_add_fusion"} <= kinds
    assert check_precision_plan(graph, expected_sites(3, "gelu_fast")).ok


# --- validate --ablation on a megatron-exact export -------------------------------------------------------------


def test_validate_ablation_covers_the_megatron_sites(tmp_path, capsys, monkeypatch):
    """2 layers (c = 1, 2) and only the megatron-exact variants (tests/test_validate.py ablates GPTMeg's three) to
    keep the exports short. Every site's variant breaks the contract at that site, and the report names the plan
    that was checked."""
    import json

    import validate.ablation
    from export import export_model
    from validate.cli import main as validate_main

    monkeypatch.setattr(validate.ablation, "DIVERGENCES", ())
    model = _model("megatron-lm", dtype=torch.float32)
    small = GPTMegLMHeadModel(_config("megatron-lm", n_layer=2))
    small.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(
        tuple(f"transformer.h.{i}." for i in range(2, N_LAYER)))})
    small.save_pretrained(tmp_path / "model")
    export_model(str(tmp_path / "model"), tmp_path / "fp16", dtype="fp16", validate=False)
    code = validate_main([str(tmp_path / "fp16"), "--ablation", "--decode-steps", "2", "--new-tokens", "2",
                          "--report", str(tmp_path / "report")])
    output = capsys.readouterr()
    assert code == 0, output.out + output.err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["contract"]["plan"] == "megatron-exact"
    assert "numerics plan checked: megatron-exact" in (tmp_path / "report" / "report.md").read_text()
    rows = {row["variant"]: row for row in report["ablation"]}
    for site in ("query_key_layer_scaling", "softmax_in_fp32", "bias_gelu_fusion", "bias_dropout_add_fusion"):
        assert not rows[f"without {site}"]["contract_ok"], site
    assert rows["all islands (megatron-exact)"]["contract_ok"]
    with capsys.disabled():
        print("\n[validate --ablation, 2-layer megatron-lm fp16 export, onnxruntime CPU vs eager]")
        for name, row in rows.items():
            print(f"  {name:40s} broken sites {row['broken_sites']:2d}  logits max abs {row['logits_max_abs']:.4f}  "
                  f"top-1 {row['logits_top1']:.2%}")
