"""The graph contract checker: accepts an intact fp16 graph, rejects each kind of broken site."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.precision_plan import ExpectedSites, check_precision_plan
from validate.cli import main as validate_main

F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT
ALPHA = 24**-0.5


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _const(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _layernorm_graph(with_casts: bool):
    x = helper.make_tensor_value_info("x", F16, [2, 8])
    y = helper.make_tensor_value_info("y", F16, [2, 8])
    if with_casts:
        nodes = [
            helper.make_node("Cast", ["x"], ["x32"], to=F32),
            helper.make_node("LayerNormalization", ["x32", "g", "b"], ["n32"], axis=-1),
            helper.make_node("Cast", ["n32"], ["y"], to=F16),
        ]
        inits = [_const("g", np.ones(8)), _const("b", np.zeros(8))]
    else:
        nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)]
        inits = [_const("g", np.ones(8), np.float16), _const("b", np.zeros(8), np.float16)]
    return _model(nodes, [x], [y], inits)


def _gelu_graph(fp32: bool):
    x = helper.make_tensor_value_info("x", F16, [4])
    y = helper.make_tensor_value_info("y", F16, [4])
    dt = np.float32 if fp32 else np.float16
    nodes = []
    src = "x"
    if fp32:
        nodes.append(helper.make_node("Cast", ["x"], ["x32"], to=F32))
        src = "x32"
    nodes += [
        helper.make_node("Mul", [src, "c"], ["inner"]),
        helper.make_node("Tanh", ["inner"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["t1"]),
        helper.make_node("Mul", [src, "t1"], ["g" if fp32 else "y"]),
    ]
    if fp32:
        nodes.append(helper.make_node("Cast", ["g"], ["y"], to=F16))
    return _model(nodes, [x], [y], [_const("c", 0.79788456, dt), _const("one", 1.0, dt)])


def _score_graph(kind: str):
    """q (2,5,24) x kT (2,24,5) -> scores -> + mask -> Softmax, as fp16 graph. kind picks the score path."""
    q = helper.make_tensor_value_info("q", F16, [2, 5, 24])
    k = helper.make_tensor_value_info("kt", F16, [2, 24, 5])
    mask = helper.make_tensor_value_info("mask", F16, [2, 5, 5])
    p = helper.make_tensor_value_info("p", F16, [2, 5, 5])
    inits = [_const("alpha", ALPHA), _const("sqrt_d", 24**0.5, np.float16), _const("alpha16", ALPHA, np.float16)]
    casts = [helper.make_node("Cast", ["q"], ["q32"], to=F32), helper.make_node("Cast", ["kt"], ["k32"], to=F32)]
    if kind == "intact":
        nodes = casts + [
            helper.make_node("MatMul", ["q32", "k32"], ["s32"]),
            helper.make_node("Mul", ["s32", "alpha"], ["scaled"]),
            helper.make_node("Cast", ["scaled"], ["s"], to=F16),
        ]
    elif kind == "div_after_matmul":
        nodes = casts + [
            helper.make_node("MatMul", ["q32", "k32"], ["s32"]),
            helper.make_node("Cast", ["s32"], ["s16"], to=F16),
            helper.make_node("Div", ["s16", "sqrt_d"], ["s"]),
        ]
    elif kind == "gpt2_two_roundings":
        nodes = [
            helper.make_node("MatMul", ["q", "kt"], ["s16"]),
            helper.make_node("Mul", ["s16", "alpha16"], ["s"]),
        ]
    elif kind == "zero_times_buffer":
        inits.append(_const("zero", 0.0))
        buffer = helper.make_tensor_value_info("buffer", F32, [2, 5, 5])
        nodes = casts + [
            helper.make_node("MatMul", ["q32", "k32"], ["s32"]),
            helper.make_node("Mul", ["s32", "alpha"], ["scaled"]),
            helper.make_node("Mul", ["buffer", "zero"], ["beta_term"]),
            helper.make_node("Add", ["scaled", "beta_term"], ["sum"]),
            helper.make_node("Cast", ["sum"], ["s"], to=F16),
        ]
    nodes += [helper.make_node("Add", ["s", "mask"], ["masked"]), helper.make_node("Softmax", ["masked"], ["p"], axis=-1)]
    inputs = [q, k, mask] + ([buffer] if kind == "zero_times_buffer" else [])
    return _model(nodes, inputs, [p], inits)


def _only_site(report, kind):
    sites = [s for s in report.sites if s.kind == kind]
    assert len(sites) == 1, report.sites
    return sites[0]


def test_intact_islands_are_accepted():
    for model, kind in [(_layernorm_graph(True), "layernorm"), (_gelu_graph(True), "gelu"),
                        (_score_graph("intact"), "attention_score")]:
        report = check_precision_plan(model)
        assert report.compute_dtype == "float16"
        assert _only_site(report, kind).intact, report.sites
        assert report.ok


def test_layernorm_without_casts_is_rejected():
    report = check_precision_plan(_layernorm_graph(False))
    site = _only_site(report, "layernorm")
    assert not site.intact and "normalises in float16" in site.detail
    assert not report.ok


def test_gelu_in_fp16_is_rejected():
    site = _only_site(check_precision_plan(_gelu_graph(False)), "gelu")
    assert not site.intact and "Tanh computes in float16" in site.detail


def test_div_after_score_matmul_is_rejected():
    report = check_precision_plan(_score_graph("div_after_matmul"))
    site = _only_site(report, "attention_score")
    assert not site.intact and "Div after the score MatMul" in site.detail


def test_gpt2_style_scores_are_rejected():
    site = _only_site(check_precision_plan(_score_graph("gpt2_two_roundings")), "attention_score")
    assert not site.intact and "not fp32" in site.detail


def test_zero_times_buffer_is_rejected():
    report = check_precision_plan(_score_graph("zero_times_buffer"))
    assert any(s.kind == "graph" and "constant zero" in s.detail for s in report.violations)
    assert not report.ok


def test_missing_sites_are_counted():
    report = check_precision_plan(_layernorm_graph(True), ExpectedSites(layernorm=3, gelu=0, attention_score=0))
    assert not report.ok
    assert any("expected 3 layernorm" in v.detail for v in report.violations)


def test_validate_graph_cli_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "good.onnx", tmp_path / "bad.onnx"
    onnx.save(_score_graph("intact"), good)
    onnx.save(_score_graph("div_after_matmul"), bad)
    assert validate_main(["graph", str(good)]) == 0
    assert validate_main(["graph", str(bad), "--json"]) == 1
    assert '"ok": false' in capsys.readouterr().out
    assert validate_main(["graph", str(tmp_path / "missing.onnx")]) == 2
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    assert validate_main(["graph", str(tmp_path / "junk.onnx")]) == 2
