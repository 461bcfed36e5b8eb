"""`python -m validate` with the bad inputs of shared/research/bad-inputs-2026-11-25.md: refused before the run
(exit 2, one plain line), never a PASS for nothing compared, and a report folder holding one run's files."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from onnx import TensorProto, helper

from gptmeg.tiny import save_tiny_model
from tests.clitools import assert_refused, run_cli


@pytest.fixture(scope="module")
def export_dir(tiny_exports):
    return tiny_exports("fp16").folder


def test_a_damaged_reference_checkpoint_is_one_line(export_dir, tmp_path):
    checkpoint = save_tiny_model(tmp_path / "ckpt")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run_cli("validate", export_dir, "--model", checkpoint, "--report", tmp_path / "rep")
    assert_refused(result, "cannot load the eager reference", "--model")
    assert not (tmp_path / "rep").exists()


def test_prompts_that_are_not_utf8_are_refused(export_dir, tmp_path):
    (tmp_path / "prompts.txt").write_bytes(b"abc\xff\xfe\n")
    assert_refused(run_cli("validate", export_dir, "--prompts", tmp_path / "prompts.txt", "--report", tmp_path / "r"),
                   "not UTF-8")
    assert_refused(run_cli("validate", export_dir, "--prompts", tmp_path, "--report", tmp_path / "r"), "is a folder")


def test_new_tokens_beyond_the_context_are_refused(export_dir, tmp_path):
    assert_refused(run_cli("validate", export_dir, "--new-tokens", "10000", "--report", tmp_path / "r"),
                   "--new-tokens 10000", "context of 256")


def test_an_empty_backend_list_is_refused_not_passed(export_dir, tmp_path):
    result = run_cli("validate", export_dir, "--backends", ",", "--report", tmp_path / "r")
    assert_refused(result, "names no backend")
    assert "PASS" not in result.stdout


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_an_unwritable_report_folder_is_refused_before_the_run(export_dir, tmp_path, where):
    (tmp_path / "afile").write_text("keep")
    report = tmp_path / "afile" if where == "file" else tmp_path / "afile" / "rep"
    assert_refused(run_cli("validate", export_dir, "--report", report), "--report" if where == "file" else "writable")
    assert (tmp_path / "afile").read_text() == "keep"


def test_a_new_report_replaces_the_files_of_an_older_one(export_dir, tmp_path, capsys):
    """The passing run draws no layer plot; an older run's plot must not sit beside the new report."""
    from validate.cli import main as validate_main

    report = tmp_path / "rep"
    report.mkdir()
    (report / "error_by_layer.png").write_bytes(b"an older run's plot")
    assert validate_main([str(export_dir), "--report", str(report), "--decode-steps", "1", "--new-tokens", "2"]) == 0
    written = sorted(p.name for p in report.iterdir())
    assert "report.json" in written and "report.md" in written
    assert not any(".tmp-" in name for name in written)
    data = json.loads((report / "report.json").read_text())
    drew = any(b["localization"] for b in data["backends"])
    assert ("error_by_layer.png" in written) == drew
    if drew:
        assert (report / "error_by_layer.png").read_bytes() != b"an older run's plot"


# --- validate graph ----------------------------------------------------------------------------------------------


def test_graph_check_of_an_empty_file_is_refused(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    result = run_cli("validate", "graph", tmp_path / "empty.onnx")
    assert_refused(result, "holds no ONNX graph")


def test_graph_without_any_site_is_a_failure(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])])
    onnx.save(helper.make_model(graph), str(tmp_path / "add.onnx"))
    result = run_cli("validate", "graph", tmp_path / "add.onnx", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False and "nothing was proven" in report["violations"][0]["detail"]


@pytest.mark.parametrize("manifest", [b"[1,2,3]", b"{not json", b"\xff\xfe"])
def test_graph_check_next_to_a_damaged_manifest_is_refused(export_dir, tmp_path, manifest):
    folder = shutil.copytree(export_dir, tmp_path / "exp")
    (folder / "manifest.json").write_bytes(manifest)
    assert_refused(run_cli("validate", "graph", folder), "manifest.json", "damaged")
