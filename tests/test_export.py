"""`python -m export`: the exported decoder matches eager over prefill + decode, the folder is complete and atomic,
bad input gets a clear error and writes nothing."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from transformers import GPT2LMHeadModel

from export import export_model, read_manifest
from export import api as export_api
from export.api import onnxruntime_runner
from export.cli import main as export_main
from export.manifest import sha256_file
from export.verify import verify_export
from gptmeg.megatron_ops import MegatronLayerNorm
from gptmeg.tiny import tiny_model
from tests.conftest import gpt2_config


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_export_validates_against_eager(tiny_exports, dtype):
    result = tiny_exports(dtype)
    report = result.verification
    assert report is not None and report.ok, report.failures
    logits = report.outputs[0]
    assert logits.name == "logits" and logits.nan == 0 and logits.inf == 0
    if dtype == "fp32":
        assert logits.max_abs <= 1e-4
    else:
        assert logits.top1 >= 0.99
        assert logits.max_abs <= 0.02 * logits.reference_max


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_decode_steps_chain_through_present(tiny_exports, dtype):
    """Independent of the export-time check: 6 decode steps, fed back from present.*, one row padded."""
    result = tiny_exports(dtype)
    model = tiny_model(dtype=export_api.DTYPES[dtype])
    run = onnxruntime_runner(result.folder / "model.onnx")
    report = verify_export(model, run, dtype=dtype, provider="cpu", decode_steps=6, seed=3)
    assert report.ok, report.failures
    assert report.outputs[1].name == "present.*" and report.outputs[1].nan == 0


def test_empty_past_prefill_equals_eager_fp32(tiny_exports):
    run = onnxruntime_runner(tiny_exports("fp32").folder / "model.onnx")
    model = tiny_model()
    ids = torch.tensor([[5, 17, 99, 3, 250]])
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 5), np.int64),
             "position_ids": np.arange(5)[None]}
    for i in range(2 * model.config.n_layer):
        feeds[f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}"] = np.zeros((1, 4, 0, 24), np.float32)
    out = run(feeds)
    with torch.no_grad():
        expected = model(ids).logits.numpy()
    assert np.abs(out["logits"] - expected).max() <= 1e-4
    assert out["present.2.value"].shape == (1, 4, 5, 24)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_export_folder_contents(tiny_exports, dtype):
    result = tiny_exports(dtype)
    folder = result.folder
    manifest = read_manifest(folder)
    assert manifest["dtype"] == dtype and manifest["opset"] == 18
    names = [i["name"] for i in manifest["inputs"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert [o["name"] for o in manifest["outputs"]][:2] == ["logits", "present.0.key"]
    assert manifest["inputs"][0]["dynamic_axes"] == {"0": "batch", "1": "sequence"}
    assert manifest["inputs"][3]["dtype"] == ("float16" if dtype == "fp16" else "float32")
    for name, entry in manifest["files"].items():
        assert sha256_file(folder / name) == entry["sha256"]
    assert {"model.onnx", "config.json", "vocab.json", "merges.txt"} <= set(manifest["files"])
    assert manifest["precision_plan"]["ok"] and manifest["validation"]["ok"]
    assert manifest["versions"]["torch"] and manifest["versions"]["onnx"]
    # tied lm_head / wte stored once
    graph = onnx.load(str(folder / "model.onnx"))
    vocab, width = manifest["config"]["vocab_size"], manifest["config"]["n_embd"]
    assert sum(tuple(i.dims) in {(vocab, width), (width, vocab)} for i in graph.graph.initializer) == 1
    assert not list(folder.parent.glob(".*partial*"))


def test_fp16_export_keeps_every_island(tiny_exports):
    report = tiny_exports("fp16").contract
    assert report.ok and report.compute_dtype == "float16"
    assert report.counts == {"layernorm": 7, "gelu": 3, "attention_score": 3}


def test_gpt2_checkpoint_exports(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(gpt2_config(activation_function="gelu_new")).save_pretrained(tmp_path / "gpt2")
    result = export_model(str(tmp_path / "gpt2"), tmp_path / "out", dtype="fp32")
    assert result.verification.ok
    assert result.verification.outputs[0].max_abs <= 1e-4
    # gelu_new is not Megatron's GELU: no GELU island is expected, LayerNorms and scores are still checked
    assert result.contract.counts.get("gelu", 0) == 0 and result.contract.counts["layernorm"] == 5


def test_external_data_export_is_complete(tmp_path):
    """The path every model over 2 GB takes, forced on the tiny model: weights in model.onnx.data, listed and
    hashed in the manifest, and the folder still validates and runs."""
    from engines import GenerationSettings, generate, make_runtime, open_export

    result = export_model(None, tmp_path / "ext", dtype="fp16", external_data=True)
    folder = result.folder
    assert (folder / "model.onnx.data").stat().st_size > (folder / "model.onnx").stat().st_size
    assert {"model.onnx", "model.onnx.data"} <= set(read_manifest(folder)["files"])
    assert result.contract.ok and result.verification.ok
    tokens = generate(make_runtime(open_export(folder)), [[1, 2, 3]], GenerationSettings(max_new_tokens=3)).tokens
    assert len(tokens[0]) >= 1


def test_broken_island_fails_the_export_and_writes_nothing(tmp_path, monkeypatch, capsys):
    # a LayerNorm that normalises in half precision: the fp32 island is gone from the graph
    monkeypatch.setattr(MegatronLayerNorm, "forward", torch.nn.LayerNorm.forward)
    out = tmp_path / "broken"
    assert export_main(["--out", str(out), "--no-validate"]) == 1
    err = capsys.readouterr().err
    assert "breaks the fp16 precision plan" in err and "normalises in float16" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert export_main(["--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_failure_midway_leaves_existing_folder_intact(tmp_path, monkeypatch):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "gptmeg-export/1"}))  # a previous export: replaceable
    (out / "keep.txt").write_text("mine")

    def explode(model, folder, opset, external_data=None):
        (folder / "model.onnx").write_bytes(b"half-written")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_api, "export_decoder", explode)
    with pytest.raises(KeyboardInterrupt):
        export_model(None, out, force=True)
    assert (out / "keep.txt").read_text() == "mine" and not (out / "model.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "/nonexistent/model"], "is not a directory"),
        (["--model", "{empty}"], "no config.json"),
        (["--model", "{bert}"], "'bert' checkpoint"),
        (["--out", "{file}/sub"], "not a writable folder"),
        (["--opset", "16"], "opset 16 is too old"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "file").write_text("x")
    argv = [a.format(empty=tmp_path / "empty", bert=tmp_path / "bert", file=tmp_path / "file") for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert export_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_dtype_typo_is_rejected_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--dtype", "fp61", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fp61'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("vocab,dtype", [(100, "fp32"), (128, "fp16"), (129, "fp16"), (400, "fp16")])
def test_tied_embeddings_are_stored_once_at_every_size(tmp_path, vocab, dtype):
    """vocab x n_embd <= 8192 (100 x 64, 128 x 64) is where the optimizer folded Transpose(wte) into a second copy;
    129 x 64 and 400 x 64 are above that limit. Every size: one initializer, read by the Gather and, through one
    Transpose, by the lm_head; onnxruntime's logits equal eager's."""
    from export.onnx_export import export_decoder
    from gptmeg import GPTMegLMHeadModel
    from tests.conftest import copy_into

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(gpt2_config(vocab_size=vocab, n_embd=64, n_head=4, n_layer=1)).eval()
    model = copy_into(GPTMegLMHeadModel, gpt2).to(torch.float16 if dtype == "fp16" else torch.float32)
    kv_dtype = np.float16 if dtype == "fp16" else np.float32
    path = export_decoder(model, tmp_path, 18)
    graph = onnx.load(str(path))
    tied = [i.name for i in graph.graph.initializer if tuple(i.dims) in {(vocab, 64), (64, vocab)}]
    assert len(tied) == 1, tied
    producers = {o: n for n in graph.graph.node for o in n.output}
    readers = [n for n in graph.graph.node if tied[0] in n.input]
    assert sorted(n.op_type for n in readers) == ["Gather", "Transpose"]
    transpose = next(n for n in readers if n.op_type == "Transpose")
    node = producers[graph.graph.output[0].name]
    while node.op_type != "MatMul":
        node = producers[node.input[0]]
    assert node.input[1] == transpose.output[0]
    run = onnxruntime_runner(path)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    outputs = run({"input_ids": ids.numpy(), "attention_mask": np.ones((1, 5), np.int64),
                   "position_ids": np.arange(5)[None],
                   **{f"past_key_values.0.{kv}": np.zeros((1, 4, 0, 16), kv_dtype) for kv in ("key", "value")}})
    with torch.no_grad():
        eager = model(ids).logits.float().numpy()
    tolerance = 1e-5 if dtype == "fp32" else 2e-2 * np.abs(eager).max()
    assert np.abs(outputs["logits"].astype(np.float32) - eager).max() <= tolerance


def _logits_metrics(ours: np.ndarray, reference: np.ndarray):
    from export.verify import _Accumulator

    accumulator = _Accumulator("logits", logits=True)
    accumulator.add(0, ours[None], reference[None], np.ones(ours.shape[:1] + (1,), dtype=bool)[None])
    return accumulator.metrics()


def test_fp16_top1_counts_near_ties_but_not_real_disagreements():
    from export.verify import FP16_TIE_ULPS, export_tolerance_failures

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(200, 50)).astype(np.float16).astype(np.float32)
    reference[:, 0] = 3.0  # every row's top token is 0, with token 1 as runner-up below
    ulp = float(np.spacing(np.float16(3.0)))  # 2**-9 at 3.0
    reference[:, 1] = 3.0 - FP16_TIE_ULPS * ulp  # a near-tie: within the band
    flipped = reference.copy()
    flipped[:4, 1] = 3.0 + ulp  # the graph prefers token 1 in 4 rows of 200 (98 % exact agreement)
    metrics = _logits_metrics(flipped, reference)
    assert metrics.top1 == 0.98 and metrics.top1_near_ties == 4 and metrics.top1_tie_aware == 1.0
    assert export_tolerance_failures([metrics], "fp16") == []

    reference[:, 1] = 3.0 - (FP16_TIE_ULPS + 1) * ulp  # one ulp wider than the band: a real disagreement
    metrics = _logits_metrics(flipped, reference)
    assert metrics.top1 == 0.98 and metrics.top1_near_ties == 0
    assert any("top-1 agreement 98.00%" in f for f in export_tolerance_failures([metrics], "fp16"))


def test_device_cuda_without_onnxruntime_gpu_is_refused_before_any_work(tmp_path, monkeypatch):
    """Seen on an H200 with the CPU onnxruntime: the export ran, then failed at validation. Now refused up front."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(export_api, "available_providers", lambda: ["cpu"])
    monkeypatch.setattr(export_api, "export_decoder", lambda *a, **k: pytest.fail("exported before refusing"))
    with pytest.raises(export_api.ExportError, match="--reference cuda-fp16"):
        export_model(out=tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists()


def test_reorder_and_upcast_attn_is_refused_for_fp16_before_tracing(tmp_path, monkeypatch):
    from gptmeg.tiny import tiny_tokenizer

    checkpoint = tmp_path / "upcast"
    tiny_model(reorder_and_upcast_attn=True).save_pretrained(checkpoint)
    tiny_tokenizer().save_pretrained(checkpoint)
    monkeypatch.setattr(export_api, "export_decoder", lambda *a, **k: pytest.fail("traced before refusing"))
    with pytest.raises(export_api.ExportError, match="reorder_and_upcast_attn"):
        export_model(str(checkpoint), tmp_path / "out", dtype="fp16")
    assert not (tmp_path / "out").exists()
