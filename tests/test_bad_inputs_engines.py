"""`python -m engines` (and its Python API) with the bad inputs of shared/research/bad-inputs-2026-11-25.md: one
plain error line, exit 2, nothing printed on stdout for a refused run, no silent wrong answers."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest

from engines import EngineError, GenerationSettings, generate, make_runtime, open_export
from tests.clitools import assert_refused, run_cli


@pytest.fixture(scope="module")
def export_dir(tiny_exports, tmp_path_factory):
    """A copy of the built-in fp16 export in a folder whose name Rich would read as markup."""
    folder = tmp_path_factory.mktemp("engines") / "exp[" / "]"
    shutil.copytree(tiny_exports("fp16").folder, folder)
    return folder


def _with_manifest(src, dst, content: bytes):
    shutil.copytree(src, dst)
    (dst / "manifest.json").write_bytes(content)
    return dst


def _manifest(export_dir) -> dict:
    return json.loads((export_dir / "manifest.json").read_text())


@pytest.mark.parametrize("case", ["list", "no-config", "no-bytes", "binary", "no-kv-input"])
def test_damaged_manifests_are_one_line_errors(export_dir, tmp_path, case):
    manifest = _manifest(export_dir)
    if case == "list":
        content = b"[1, 2, 3]"
    elif case == "binary":
        content = b"\xff\xfe\x00garbage"
    else:
        if case == "no-config":
            del manifest["config"]
        elif case == "no-bytes":
            del manifest["files"]["model.onnx"]["bytes"]
        else:
            manifest["inputs"] = [i for i in manifest["inputs"] if not i["name"].startswith("past_key_values")]
        content = json.dumps(manifest).encode()
    folder = _with_manifest(export_dir, tmp_path / "bad", content)
    result = run_cli("engines", "generate", folder, "--prompt", "hi")
    assert_refused(result, "manifest")
    assert result.stdout == ""


def test_the_path_in_a_message_is_printed_literally(export_dir, tmp_path):
    folder = _with_manifest(export_dir, tmp_path / "a[/]b[red]", b"[]")
    line = assert_refused(run_cli("engines", "generate", folder, "--prompt", "hi"))
    assert str(folder) in line


def test_a_prompt_longer_than_the_context_prints_nothing_to_stdout(export_dir):
    result = run_cli("engines", "generate", export_dir, "--prompt", "q" * 400)
    assert_refused(result, "400 tokens", "context is 256")
    assert result.stdout == ""


def test_non_utf8_prompt_bytes_are_refused(export_dir):
    result = run_cli("engines", "generate", export_dir, "--prompt", b"abc\xff\xfedef")
    assert_refused(result, "not valid UTF-8", "--prompt-ids")
    assert result.stdout == ""


@pytest.mark.parametrize(
    "option,value,fragment",
    [
        ("--temperature", "nan", "temperature"),
        ("--repetition-penalty", "nan", "repetition_penalty"),
        ("--top-p", "nan", "top_p"),
        ("--seed", "-5", "seed must be >= 0"),
        ("--stop", "", "stop string must not be empty"),
        ("--prompt-ids", "1,-1", "token id -1"),
        ("--prompt-ids", "1,287", "token id 287"),
        ("--prompt-ids", "1,x", "comma-separated integers"),
    ],
)
def test_bad_generation_settings_are_refused(export_dir, option, value, fragment):
    args = [option, value] if option == "--prompt-ids" else ["--prompt", "hi", option, value]
    result = run_cli("engines", "generate", export_dir, *args)
    assert_refused(result, fragment)
    assert result.stdout == ""


def test_two_prompts_one_empty_names_the_empty_one(export_dir):
    assert_refused(run_cli("engines", "generate", export_dir, "--prompt", "hi", "--prompt", ""), "prompt 2 of 2")


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(export_dir, tmp_path):
    from tokenizers import Tokenizer, models

    big = Tokenizer(models.WordLevel({f"w{i}": i for i in range(1000)}, unk_token="w0"))
    (tmp_path / "tok").mkdir()
    big.save(str(tmp_path / "tok" / "tokenizer.json"))
    assert_refused(run_cli("engines", "generate", export_dir, "--prompt", "hi", "--tokenizer", tmp_path / "tok"),
                   "1000 tokens", "287")


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--batch", "0"], "--batch"),
        (["--batch", "-2"], "--batch"),
        (["--prompt-length", "-5"], "--prompt-length"),
        (["--prompt-length", "0"], "--prompt-length"),
        (["--prompt-length", "250", "--new-tokens", "100"], "exceed the model's context of 256"),
        (["--prompt-length", "255"], "exceed the model's context of 256"),
        (["--new-tokens", "1"], "--new-tokens must be >= 2"),
        (["--repeats", "0"], "--repeats"),
        (["--repeats", "-1"], "--repeats"),
    ],
)
def test_bench_refuses_what_it_cannot_measure(export_dir, args, fragment):
    result = run_cli("engines", "bench", export_dir, *args)
    assert_refused(result, fragment)
    assert result.stdout == ""


def test_bench_reports_what_it_measured(export_dir):
    result = run_cli("engines", "bench", export_dir, "--prompt-length", "250", "--new-tokens", "6", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    assert "prompt 250, 6 new tokens" in " ".join(result.stdout.split())  # the title may wrap


def test_cuda_provider_hint_keeps_its_brackets(export_dir):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: there is nothing to refuse")
    assert_refused(run_cli("engines", "generate", export_dir, "--prompt", "hi", "--provider", "cuda"),
                   "pip install '.[cuda]'")


def test_tensorrt_hint_keeps_its_brackets(export_dir):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the missing-TensorRT message cannot be shown")
    for args in (["generate", export_dir, "--prompt", "hi", "--backend", "trt"], ["build", export_dir]):
        assert_refused(run_cli("engines", *args), "'.[tensorrt]'", "--backend onnxruntime")


# --- the Python API ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runtime(tiny_exports):
    return make_runtime(open_export(tiny_exports("fp16").folder))


@pytest.mark.parametrize("bad", [-1, -287, 287, 10_000])
def test_runtimes_refuse_token_ids_outside_the_vocabulary(runtime, bad):
    """ONNX Gather reads id -1 as the last row; eager raises. The runtime must raise too, on every entry point."""
    ids = np.array([[1, bad]], dtype=np.int64)
    mask = np.ones_like(ids)
    positions = np.array([[0, 1]], dtype=np.int64)
    with pytest.raises(EngineError, match=f"token id {bad} "):
        runtime.step(ids, mask, positions, runtime.empty_cache(1))
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
             **{name: np.zeros((1, 4, 0, 24), np.float16) for name in runtime.spec.past_names()}}
    with pytest.raises(EngineError, match=f"token id {bad} "):
        runtime.infer(feeds)
    with pytest.raises(EngineError, match=f"token id {bad};"):
        generate(runtime, [[1, bad]], GenerationSettings(max_new_tokens=2))


def test_runtimes_refuse_negative_positions(runtime):
    ids = np.array([[1, 2]], dtype=np.int64)
    with pytest.raises(EngineError, match="position -1"):
        runtime.step(ids, np.ones_like(ids), np.array([[-1, 0]]), runtime.empty_cache(1))


@pytest.mark.parametrize("length", [1, 4, 6])
def test_runtimes_refuse_an_attention_mask_that_does_not_cover_past_and_new(runtime, length):
    """The graph would broadcast a length-1 mask silently; past 0 + 5 new tokens need a mask of length 5."""
    ids = np.array([[1, 2, 3, 4, 5]], dtype=np.int64)
    with pytest.raises(EngineError, match="attention_mask has shape"):
        runtime.step(ids, np.ones((1, length), np.int64), np.arange(5)[None], runtime.empty_cache(1))


@pytest.mark.parametrize("options, message", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-waiting", "0"], "--max-waiting must be >= 1"),
    (["--port", "70000"], "--port must be in [0, 65535]"),
    (["--api-key", " "], "--api-key must not be empty"),
])
def test_serve_settings_are_refused_before_the_server_starts(export_dir, options, message):
    assert_refused(run_cli("engines", "serve", export_dir, "--port", "0", *options), message)


def test_serve_on_a_busy_port_is_one_line(export_dir):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert_refused(run_cli("engines", "serve", export_dir, "--port", str(port)), "cannot listen on")
