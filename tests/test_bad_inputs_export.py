"""`python -m export` driven as a user would, in a subprocess, with the hostile and careless inputs of
shared/research/bad-inputs-2026-11-25.md: exit code, one plain error line, and what is left on disk."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import time
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from gptmeg.tiny import save_tiny_model, tiny_tokenizer
from tests.clitools import assert_refused, popen_cli, run_cli, siblings, tree_digest


def _gpt2(folder: Path, **overrides) -> Path:
    """A small GPT-2 checkpoint saved by transformers, without tokenizer files: vocab 100 x n_embd 64 (the size
    where the optimizer used to fold the tied Transpose into a second copy), context 32 (< the 52 positions the
    export's own check used to need)."""
    torch.manual_seed(0)
    settings = dict(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=100, bos_token_id=0, eos_token_id=0,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(GPT2Config(**{**settings, **overrides})).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    tiny = save_tiny_model(root / "tiny")
    weights = (tiny / "model.safetensors").read_bytes()
    damaged = {
        "truncated": weights[: len(weights) // 2],
        "flipped": weights[:8] + bytes(b ^ 0xFF for b in weights[8:38]) + weights[38:],
        "empty": b"",
    }
    for name, data in damaged.items():
        shutil.copytree(tiny, root / name)
        (root / name / "model.safetensors").write_bytes(data)
    gpt2 = _gpt2(root / "gpt2")
    missing = _gpt2(root / "missing")
    tensors = load_file(missing / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".h.1." not in k}, missing / "model.safetensors",
              metadata={"format": "pt"})
    bigtok = _gpt2(root / "bigtok")
    tiny_tokenizer().save_pretrained(bigtok)  # 287 tokens for a 100-token model
    badheads = root / "badheads"
    badheads.mkdir()
    (badheads / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_head": 5}))
    return {"tiny": tiny, "gpt2": gpt2, "missing": missing, "bigtok": bigtok, "badheads": badheads,
            **{name: root / name for name in damaged}}


def _fake_export(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"format": "gptmeg-export/1"}))
    return folder


# --- --force never loses a folder ------------------------------------------------------------------------------


@pytest.mark.parametrize("out,cwd", [(".", "project"), ("..", "project/sub")])
def test_force_never_replaces_the_current_folder_or_a_parent(tmp_path, out, cwd):
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "notes.txt").write_text("my notes")
    (project / "sub").mkdir()
    (project / "sub" / "main.py").write_text("print('hi')\n")
    before = tree_digest(project)
    result = run_cli("export", "--out", out, "--force", cwd=tmp_path / cwd)
    assert_refused(result, "current folder or one of its parents")
    assert tree_digest(project) == before


def test_force_never_replaces_the_checkpoint(ckpts, tmp_path):
    checkpoint = shutil.copytree(ckpts["tiny"], tmp_path / "ckpt")
    before = tree_digest(checkpoint)
    assert_refused(run_cli("export", "--model", checkpoint, "--out", checkpoint, "--force"), "checkpoint")
    assert tree_digest(checkpoint) == before


def test_force_never_replaces_the_parent_of_the_checkpoint(ckpts, tmp_path):
    parent = tmp_path / "parent"
    checkpoint = shutil.copytree(ckpts["tiny"], parent / "ckpt")
    (parent / "keepme").mkdir()
    (parent / "keepme" / "data.txt").write_text("data")
    before = tree_digest(parent)
    assert_refused(run_cli("export", "--model", checkpoint, "--out", parent, "--force"), "checkpoint")
    assert tree_digest(parent) == before


def test_force_never_replaces_an_export_inside_the_checkpoint(ckpts, tmp_path):
    checkpoint = shutil.copytree(ckpts["tiny"], tmp_path / "ckpt")
    inside = _fake_export(checkpoint / "onnx")
    assert_refused(run_cli("export", "--model", checkpoint, "--out", inside, "--force"), "inside the checkpoint")
    assert (inside / "manifest.json").is_file()


def test_force_replaces_only_a_previous_export(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "experiment.csv").write_text("a,b\n1,2\n")
    assert_refused(run_cli("export", "--out", folder, "--force"), "not an export made by this tool")
    assert (folder / "experiment.csv").read_text() == "a,b\n1,2\n"


# --- paths printed as text, names the file system allows -------------------------------------------------------


@pytest.mark.parametrize("name", ["exp[x]", "exp[/]", "exp[bold]"])
def test_paths_are_printed_literally(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "keep.txt").write_text("mine")
    line = assert_refused(run_cli("export", "--out", folder))
    assert str(folder) in line and (folder / "keep.txt").exists()


def test_a_name_longer_than_the_file_system_allows_is_refused(tmp_path):
    assert_refused(run_cli("export", "--out", tmp_path / ("e" * 300)), "255")
    assert list(tmp_path.iterdir()) == []


def test_opset_outside_what_onnx_can_write_is_refused(tmp_path):
    assert_refused(run_cli("export", "--opset", "99", "--out", tmp_path / "o"), "--opset 99", "at most")
    assert_refused(run_cli("export", "--opset", "17", "--out", tmp_path / "o"), "too old", "cannot convert down")
    assert list(tmp_path.iterdir()) == []


# --- checkpoints that are not what they claim ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["truncated", "flipped", "empty"])
def test_damaged_weights_are_one_line_errors(ckpts, tmp_path, name):
    result = run_cli("export", "--model", ckpts[name], "--out", tmp_path / "o")
    assert_refused(result, str(ckpts[name]))
    assert list(tmp_path.iterdir()) == []


def test_missing_tensors_are_refused_unless_allowed(ckpts, tmp_path):
    line = assert_refused(run_cli("export", "--model", ckpts["missing"], "--out", tmp_path / "o"),
                          "12 tensors missing", "transformer.h.1.attn.c_attn.bias", "and 7 more",
                          "--allow-incomplete-checkpoint")
    assert "pass" not in line.split("Pass")[0] and list(tmp_path.iterdir()) == []
    allowed = run_cli("export", "--model", ckpts["missing"], "--out", tmp_path / "o", "--no-validate",
                      "--allow-incomplete-checkpoint")
    assert allowed.returncode == 0, allowed.stderr
    assert "NOT the checkpoint" in allowed.stderr
    recorded = json.loads((tmp_path / "o" / "manifest.json").read_text())["checkpoint"]
    assert recorded["complete"] is False and len(recorded["missing"]) == 12


def test_invalid_head_count_is_a_one_line_error(ckpts, tmp_path):
    assert_refused(run_cli("export", "--model", ckpts["badheads"], "--out", tmp_path / "o"), "multiple of n_head")


def test_tokenizer_larger_than_the_vocabulary_is_refused_before_tracing(ckpts, tmp_path):
    assert_refused(run_cli("export", "--model", ckpts["bigtok"], "--out", tmp_path / "o"),
                   "287 tokens", "vocab_size is 100")
    assert list(tmp_path.iterdir()) == []


# --- small GPT-2 checkpoints export and run ----------------------------------------------------------------


def test_small_gpt2_without_tokenizer_exports_with_one_tied_matrix(ckpts, tmp_path):
    """vocab 100 x n_embd 64, context 32, no tokenizer files, --quiet, opset 21, a '[/x]' in the name."""
    out = tmp_path / "new[/x]"
    result = run_cli("export", "--model", ckpts["gpt2"], "--out", out, "--opset", "21", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert "Loading weights" not in result.stderr and "LOAD REPORT" not in result.stderr
    assert "no tokenizer files" in result.stderr and "--prompt-ids" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["has_tokenizer"] is False and manifest["opset"] == 21
    assert not (out / "tokenizer.json").exists() and not (out / "vocab.json").exists()
    assert manifest["validation"]["ok"] and manifest["checkpoint"]["complete"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # umask 022, not mkdtemp's 0700

    graph = onnx.load(str(out / "model.onnx"))
    assert next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) == 21
    tied = [i.name for i in graph.graph.initializer if tuple(i.dims) in {(100, 64), (64, 100)}]
    assert len(tied) == 1, tied
    producers = {o: n for n in graph.graph.node for o in n.output}
    logits_matmul = producers[graph.graph.output[0].name]
    while logits_matmul.op_type != "MatMul":
        logits_matmul = producers[logits_matmul.input[0]]
    weight = logits_matmul.input[1]  # the lm_head reads the embedding matrix through a Transpose
    assert producers[weight].op_type == "Transpose" and producers[weight].input[0] == tied[0]

    text = run_cli("engines", "generate", out, "--prompt", "Hello world")
    assert_refused(text, "--prompt-ids", "--tokenizer")
    assert text.stdout == ""
    ids = run_cli("engines", "generate", out, "--prompt-ids", "5,6,7", "--max-new-tokens", "4")
    assert ids.returncode == 0, ids.stderr
    assert len(ids.stdout.strip().split(",")) == 4


def test_gpt2_without_attention_scaling_exports(tmp_path):
    checkpoint = _gpt2(tmp_path / "unscaled", scale_attn_weights=False)
    result = run_cli("export", "--model", checkpoint, "--out", tmp_path / "o", "--quiet")
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "o" / "manifest.json").read_text())["precision_plan"]
    assert plan["ok"] and plan["counts"]["attention_score"] == 2
    assert all("alpha=1 (unscaled)" in s["detail"] for s in plan["sites"] if s["kind"] == "attention_score")


# --- interruptions ----------------------------------------------------------------------------------------------


def _wait_for_staged_model(out: Path, process, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any((p / "model.onnx").is_file() for p in out.parent.glob(f".{out.name}.partial-*")):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    pytest.fail("the export never wrote model.onnx into its staging folder")


@pytest.fixture
def old_export(tiny_exports, tmp_path):
    out = tmp_path / "X"
    shutil.copytree(tiny_exports("fp16").folder, out)
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_termination_mid_export_keeps_the_old_export_and_leaves_nothing(old_export, sig):
    before = tree_digest(old_export)
    process = popen_cli("export", "--out", old_export, "--force")
    _wait_for_staged_model(old_export, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and "was not changed" in stderr
    assert tree_digest(old_export) == before and siblings(old_export) == []


def test_sigkill_leftovers_are_removed_by_the_next_run(old_export):
    before = tree_digest(old_export)
    process = popen_cli("export", "--out", old_export, "--force")
    _wait_for_staged_model(old_export, process)
    process.kill()
    process.communicate(timeout=60)
    assert tree_digest(old_export) == before
    assert siblings(old_export)  # SIGKILL runs no clean-up: a model-sized staging folder is left ...
    result = run_cli("export", "--out", old_export, "--force")
    assert result.returncode == 0, result.stderr
    assert siblings(old_export) == []  # ... and the next run for the same folder removes it
    assert json.loads((old_export / "manifest.json").read_text())["validation"]["ok"]


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """ENOSPC while writing the graph (simulated: this machine offers no small file system to fill)."""
    import errno

    from export import api as export_api
    from export.cli import main as export_main

    def full(model, folder, opset, external_data=None):
        (folder / "model.onnx").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "model.onnx"))

    monkeypatch.setattr(export_api, "export_decoder", full)
    existing = _fake_export(tmp_path / "out")
    assert export_main(["--out", str(existing), "--force"]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert [p.name for p in existing.iterdir()] == ["manifest.json"] and siblings(existing) == []


# --- the Python API ---------------------------------------------------------------------------------------------


def test_python_api_raises_checkpoint_errors(ckpts):
    from gptmeg import CheckpointError, GPTMegLMHeadModel, IncompleteCheckpointError, load_pretrained

    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        GPTMegLMHeadModel.from_pretrained(ckpts["truncated"])
    with pytest.raises(IncompleteCheckpointError) as caught:
        load_pretrained(ckpts["missing"])
    assert len(caught.value.report.missing) == 12 and caught.value.report.unexpected == []
    model, report = load_pretrained(ckpts["missing"], allow_incomplete=True)
    assert not report.complete and model.config.n_layer == 2
    _, report = load_pretrained(ckpts["gpt2"])
    assert report.complete
