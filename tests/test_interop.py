"""Export folders run, unchanged, in tools users already have: onnxruntime-genai through the written
genai_config.json, transformers' AutoTokenizer through a tokenizer class every tool knows."""

from __future__ import annotations

import json

import pytest

from engines import GenerationSettings, generate, make_runtime, open_export
from export.genai_config import GENAI_CONFIG

PROMPTS = ["Once upon a time", "Hello world", "The quick brown fox jumps"]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_onnxruntime_genai_runs_the_folder_as_written(tiny_exports, dtype):
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed here")
    folder = tiny_exports(dtype).folder
    manifest = json.loads((folder / "manifest.json").read_text())
    assert GENAI_CONFIG in manifest["files"]  # hashed like every other file of the export
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    artifact = open_export(folder)
    runtime = make_runtime(artifact)
    for prompt in PROMPTS:
        ids = [int(t) for t in tokenizer.encode(prompt)]
        assert ids == artifact.tokenizer.encode(prompt).ids  # genai's tokenizer reads ours identically
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 40)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        theirs = []
        while not generator.is_done():
            generator.generate_next_token()
            theirs.append(int(generator.get_next_tokens()[0]))
        ours = generate(runtime, [ids], GenerationSettings(max_new_tokens=40)).tokens[0]
        assert theirs == ours, prompt


def test_tokenizer_config_names_a_class_every_tool_knows(tiny_exports):
    from transformers import AutoTokenizer

    folder = tiny_exports("fp16").folder
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2TokenizerFast"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for prompt in PROMPTS + ["¿Dónde está? 图书馆 😀"]:
        assert tokenizer.encode(prompt) == open_export(folder).tokenizer.encode(prompt).ids


def _ort_optimized_copy(src, dst, **flags):
    """The export folder with model.onnx replaced, in place, by onnxruntime's transformer optimizer output."""
    import shutil

    from onnxruntime.transformers import optimizer

    shutil.copytree(src, dst)
    optimized = optimizer.optimize_model(str(src / "model.onnx"), model_type="gpt2", num_heads=4, hidden_size=96,
                                         **flags)
    optimized.save_model_to_file(str(dst / "model.onnx"))
    return dst


@pytest.mark.parametrize("opt_level,passes", [(0, True), (None, False)], ids=["opt_level-0", "default-flags"])
def test_validate_checks_a_graph_changed_after_export(tiny_exports, tmp_path, capsys, opt_level, passes):
    """Post-processing a graph is what users do; validate says which files changed and judges the new graph.
    onnxruntime's optimizer with --opt_level 0 keeps the fp16 plan; with its default CPU flags it moves the
    residual adds to fp32 and splits the softmax, and the contract names the broken sites."""
    from validate.cli import main as validate_main

    flags = {"opt_level": opt_level} if opt_level is not None else {}
    folder = _ort_optimized_copy(tiny_exports("fp16").folder, tmp_path / "optimized", **flags)
    code = validate_main([str(folder), "--report", str(tmp_path / "report"), "--decode-steps", "1",
                          "--new-tokens", "4"])
    out = capsys.readouterr()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["changed_files"] == ["model.onnx"]
    assert "model.onnx differs from the export's manifest" in out.err
    assert "changed since export" in (tmp_path / "report" / "report.md").read_text()
    if passes:
        assert code == 0 and report["contract"]["ok"]
    else:
        assert code == 1 and not report["contract"]["ok"]
        violations = report["contract"]["violations"]
        # the optimizer drops the torch module metadata, so the sites are named by their nodes
        broken = {v["node"] for v in violations if v["kind"] == "layernorm"}
        assert len(broken) == 7 and all(name.startswith("node_layer_norm") for name in broken)
        assert any("attention_score site(s) in this model, found 0" in v["detail"] for v in violations)


def test_engines_keep_refusing_a_changed_folder_unless_told(tiny_exports, tmp_path):
    from engines import ArtifactError

    folder = _ort_optimized_copy(tiny_exports("fp16").folder, tmp_path / "optimized", opt_level=0)
    with pytest.raises(ArtifactError, match="--no-verify"):
        open_export(folder)
    assert open_export(folder, verify=False).model_path == folder / "model.onnx"


def test_validate_graph_option_runs_any_file_with_the_folders_manifest(tiny_exports, tmp_path, capsys):
    from validate.cli import main as validate_main

    folder = _ort_optimized_copy(tiny_exports("fp16").folder, tmp_path / "optimized", opt_level=0)
    elsewhere = tmp_path / "graphs" / "opt0.onnx"
    elsewhere.parent.mkdir()
    (folder / "model.onnx").rename(elsewhere)
    code = validate_main([str(tiny_exports("fp16").folder), "--graph", str(elsewhere), "--report",
                          str(tmp_path / "report"), "--decode-steps", "1", "--new-tokens", "4"])
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert code == 0, capsys.readouterr().err
    assert report["graph"] == str(elsewhere) and report["changed_files"] == []
    assert report["contract"]["expected"]["attention_score"] == 3  # expected counts from the folder's manifest


def _optimized_graph(src_folder, out, float16=False, **flags):
    from onnxruntime.transformers import optimizer

    optimized = optimizer.optimize_model(str(src_folder / "model.onnx"), model_type="gpt2", num_heads=4,
                                         hidden_size=96, **flags)
    if float16:
        optimized.convert_float_to_float16(keep_io_types=True)
    optimized.save_model_to_file(str(out))
    return out


def test_checker_reads_fp32_graphs_after_ort_fusion_without_false_positives(tiny_exports, tmp_path):
    """onnxruntime's optimizer fuses the residual adds into SkipLayerNormalization and the GELU into FastGelu:
    recognised as the LayerNorm and GELU sites, judged by their types (fp32: nothing to round)."""
    from export.precision_plan import check_precision_plan, expected_sites

    graph = _optimized_graph(tiny_exports("fp32").folder, tmp_path / "opt.onnx")
    report = check_precision_plan(str(graph), expected_sites(3, "gelu_fast"))
    ops = {s.node.split("_")[0] for s in report.sites}
    assert report.ok, report.violations
    assert report.compute_dtype == "float32"
    assert report.counts == {"layernorm": 7, "gelu": 3, "attention_score": 3}
    assert any("SkipLayerNorm" in s.node for s in report.sites if s.kind == "layernorm"), ops


def test_checker_judges_a_graph_by_its_compute_not_its_outputs(tiny_exports, tmp_path):
    """ORT's --float16 keeps fp32 inputs and outputs around fp16 compute: that is an fp16 graph, and its
    LayerNorms and GELUs in fp16 are violations (before, the first output made it "float32" and let it pass)."""
    from export.precision_plan import check_precision_plan

    graph = _optimized_graph(tiny_exports("fp32").folder, tmp_path / "opt16.onnx", float16=True)
    report = check_precision_plan(str(graph))
    assert report.compute_dtype == "float16" and not report.ok
    kinds = {v.kind for v in report.violations}
    assert {"layernorm", "gelu"} <= kinds, report.violations


def test_missing_sites_are_violations_without_a_manifest(tiny_exports, tmp_path):
    """The KV-cache inputs say how many blocks the decoder has: an fp16 graph whose softmax the optimizer split
    (no score site left) is broken even with no manifest beside it."""
    from export.precision_plan import check_precision_plan

    graph = _optimized_graph(tiny_exports("fp16").folder, tmp_path / "opt.onnx")
    report = check_precision_plan(str(graph))
    assert report.expected is not None and report.expected.attention_score == 3
    assert any("expected 3 attention_score site(s)" in v.detail for v in report.violations)
