"""`python -m validate`: good exports pass; broken ones fail and name the block or site; reports are consistent."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from export.manifest import MANIFEST_NAME, file_digests
from export.precision_plan import module_scope
from validate.cli import main as validate_main

HAS_POLYGRAPHY = importlib.util.find_spec("polygraphy") is not None


def _mutated_copy(src, dst, mutate):
    """Copy an export folder, change its graph with ``mutate(model)``, and re-sign the manifest (so only the
    numbers and the contract, not the sha256 check, can catch the change)."""
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"))
    mutate(model)
    onnx.save(model, str(dst / "model.onnx"))
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    manifest["files"] = file_digests(dst)
    (dst / MANIFEST_NAME).write_text(json.dumps(manifest))
    return dst


def _initializer(model, name):
    return next(i for i in model.graph.initializer if i.name == name)


def _run(argv, capsys):
    code = validate_main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_builtin_exports_pass_and_reports_agree(tiny_exports, tmp_path, capsys, dtype):
    report_dir = tmp_path / "report"
    code, output = _run([str(tiny_exports(dtype).folder), "--report", str(report_dir)], capsys)
    assert code == 0, output
    assert "PASS" in output
    data = json.loads((report_dir / "report.json").read_text())
    markdown = (report_dir / "report.md").read_text()
    assert data["ok"] and data["graph_dtype"] == dtype and data["contract"]["ok"]
    assert (report_dir / "error_by_layer.png").stat().st_size > 1000
    backend = data["backends"][0]
    assert [c["case"] for c in backend["cases"]] == ["prompts", "random tokens"]
    for case in backend["cases"]:
        logits = next(o for o in case["outputs"] if o["name"] == "logits")
        assert logits["top1"] >= 0.99 and logits["nan"] == 0
        # the Markdown row carries the JSON's numbers
        row = f"| {backend['backend']} | {case['case']} | logits | {logits['max_abs']:.3g} | {logits['mean_abs']:.3g} |"
        assert row in markdown
    assert backend["generation"]["exact"] or dtype == "fp16"
    assert backend["localization"]["available"] and backend["localization"]["first_divergence"] is None
    polygraphy = backend["polygraphy"]
    assert "## Teacher-forced step check" in markdown
    if not HAS_POLYGRAPHY:  # the GPU test environments run without Polygraphy
        assert polygraphy["available"] is False
        return
    assert polygraphy["available"] and polygraphy["passed"] and polygraphy["iterations"] == 5
    assert set(polygraphy["outputs"]) == {"logits", *[f"present.{i}.{k}" for i in range(3) for k in ("key", "value")]}
    if dtype == "fp32":
        assert backend["generation"]["prefix_lengths"] == [16] * 4


def test_perturbed_weight_fails_and_names_the_block(tiny_exports, tmp_path, capsys):
    def perturb(model):
        init = _initializer(model, "model.transformer.h.1.mlp.c_fc.weight")
        weight = numpy_helper.to_array(init)
        noise = np.random.default_rng(0).normal(0, 0.5, weight.shape).astype(weight.dtype)
        init.CopyFrom(numpy_helper.from_array(weight + noise, init.name))

    broken = _mutated_copy(tiny_exports("fp32").folder, tmp_path / "broken", perturb)
    code, output = _run([str(broken), "--report", str(tmp_path / "report")], capsys)
    assert code == 1
    assert "first divergence at block 1, MLP (transformer.h.1.mlp)" in output
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["backends"][0]["localization"]["first_divergence"] == "transformer.h.1.mlp"
    polygraphy = data["backends"][0]["polygraphy"]
    if HAS_POLYGRAPHY:
        assert not polygraphy["passed"] and not polygraphy["outputs"]["logits"]["passed"]
        assert polygraphy["outputs"]["present.0.key"]["passed"]  # block 0 is untouched: its cache still matches
    assert data["contract"]["ok"]  # the graph's structure is fine: the numbers caught it


def test_swapped_attention_scale_fails_at_that_block(tiny_exports, tmp_path, capsys):
    def swap_scale(model):
        graph = model.graph
        matmuls = {n.output[0] for n in graph.node if n.op_type == "MatMul" and module_scope(n) == "transformer.h.2.attn"}
        scale = next(n for n in graph.node if n.op_type == "Mul" and n.input[0] in matmuls)  # scores * alpha
        graph.initializer.append(numpy_helper.from_array(np.array(24**0.5, np.float32), "swapped_alpha"))
        scale.input[1] = "swapped_alpha"  # sqrt(d) instead of 1/sqrt(d)

    broken = _mutated_copy(tiny_exports("fp32").folder, tmp_path / "broken", swap_scale)
    code, output = _run([str(broken), "--report", str(tmp_path / "report")], capsys)
    assert code == 1
    assert "first divergence at block 2, attention (transformer.h.2.attn)" in output


def test_removed_layernorm_island_fails_the_contract(tiny_exports, tmp_path, capsys):
    def remove_island(model):
        graph = model.graph
        producers = {o: n for n in graph.node for o in n.output}
        ln = next(n for n in graph.node
                  if n.op_type == "LayerNormalization" and module_scope(n) == "transformer.h.1.ln_2")
        initializers = {i.name: i for i in graph.initializer}
        for i, name in enumerate(ln.input):  # bypass the Cast(fp32) of the input, use fp16 scale and bias
            cast = producers.get(name)
            if cast is not None and cast.op_type == "Cast":
                ln.input[i] = cast.input[0]
            elif name in initializers:
                half = numpy_helper.to_array(initializers[name]).astype(np.float16)
                graph.initializer.append(numpy_helper.from_array(half, f"{name}_fp16"))
                ln.input[i] = f"{name}_fp16"
        kept = [v for v in graph.value_info if v.name != ln.output[0]]
        del graph.value_info[:]
        graph.value_info.extend(kept)
        graph.value_info.append(onnx.helper.make_tensor_value_info(ln.output[0], TensorProto.FLOAT16, None))

    broken = _mutated_copy(tiny_exports("fp16").folder, tmp_path / "broken", remove_island)
    code, output = _run([str(broken), "--report", str(tmp_path / "report")], capsys)
    assert code == 1, output
    assert "transformer.h.1.ln_2" in output and "normalises in float16" in output
    violations = json.loads((tmp_path / "report" / "report.json").read_text())["contract"]["violations"]
    assert [v["scope"] for v in violations] == ["transformer.h.1.ln_2"]


def test_bad_input_is_a_clear_error(tiny_exports, tmp_path, capsys):
    code, output = _run([str(tmp_path)], capsys)
    assert code == 2 and "has no manifest.json" in output
    folder = str(tiny_exports("fp32").folder)
    code, output = _run([folder, "--prompts", str(tmp_path / "none.txt")], capsys)
    assert code == 2 and "no such file" in output
    code, output = _run([folder, "--backends", "tensorrt"], capsys)
    assert code == 2 and "tensorrt" in output.lower()
    code, output = _run([folder, "--ablation"], capsys)
    assert code == 2 and "fp16 export" in output
    import torch

    if not torch.cuda.is_available():
        code, output = _run([folder, "--reference", "cuda-fp16"], capsys)
        assert code == 2 and "needs a CUDA GPU" in output


def test_prompts_file_is_used(tiny_exports, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond, longer prompt with more words\n")
    code, output = _run([str(tiny_exports("fp32").folder), "--prompts", str(prompts), "--batch", "2",
                         "--report", str(tmp_path / "r")], capsys)
    assert code == 0, output
    data = json.loads((tmp_path / "r" / "report.json").read_text())
    assert len(data["backends"][0]["generation"]["prefix_lengths"]) == 2


def test_polygraphy_check_is_optional(tiny_exports, monkeypatch):
    import sys

    import torch

    from engines import make_runtime, open_export
    from gptmeg.tiny import tiny_model
    from validate.eager_runtime import EagerDecoder
    from validate.polygraphy_check import polygraphy_check

    artifact = open_export(tiny_exports("fp32").folder)
    monkeypatch.setitem(sys.modules, "polygraphy.backend.base", None)  # as on a machine without Polygraphy
    result = polygraphy_check(EagerDecoder(tiny_model(dtype=torch.float32), artifact.spec), make_runtime(artifact),
                              graph_dtype="fp32")
    assert result == {"available": False, "note": "Polygraphy is not installed (pip install '.[validate]')"}
