"""`python -m engines triton-repo`: the Triton model repository (layout, config.pbtxt from the manifest, the copied
export, --force rules) and its python-backend model driven with a fake ``triton_python_backend_utils``, checked
against ``engines.generate()``. The real-server check (`scripts/triton_check.py`) runs with ``-m triton`` where
GPTMEG_TRITON_VENV names a venv with nvidia-pytriton."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from clitools import ROOT, assert_refused, run_cli, siblings, tree_digest
from engines import EngineError, GenerationSettings, generate, make_runtime, open_export
from engines.serving import triton_repo
from engines.serving.triton_repo import MARKER_NAME, TEXT_INPUTS, TritonRepoOptions, write_triton_repo

# --- a small protobuf text-format reader (Triton's model_config proto is not installed here) -----------------------

_TOKEN = re.compile(r'\s*(?:#[^\n]*\n?|("(?:[^"\\]|\\.)*")|([A-Za-z_][\w.]*|-?\d+(?:\.\d+)?)|([{}\[\]:,]))')


def _tokens(text: str) -> list:
    tokens, position = [], 0
    text = text.rstrip() + "\n"
    while text[position:].strip():
        match = _TOKEN.match(text, position)
        assert match and match.end() > position, f"cannot read {text[position:position + 40]!r}"
        position = match.end()
        string, word, punct = match.groups()
        if string is not None:
            tokens.append(("str", json.loads(string)))
        elif word is not None:
            tokens.append(("word", word))
        elif punct is not None:
            tokens.append(("punct", punct))
    return tokens


def parse_pbtxt(text: str) -> dict:
    """{field: [values]} (every field a list: repeated or not); messages are dicts, enums and numbers strings/ints."""
    tokens = _tokens(text)
    position = 0

    def value():
        nonlocal position
        kind, token = tokens[position]
        position += 1
        if (kind, token) == ("punct", "{"):
            return message("}")
        if kind == "str":
            return token
        if token in ("true", "false"):
            return token == "true"
        return int(token) if re.fullmatch(r"-?\d+", token) else token

    def message(end: str | None) -> dict:
        nonlocal position
        fields: dict = {}
        while position < len(tokens) and tokens[position] != ("punct", end):
            kind, name = tokens[position]
            assert kind == "word", (kind, name)
            position += 1
            if tokens[position] == ("punct", ":"):
                position += 1
            if tokens[position] == ("punct", "["):
                position += 1
                while tokens[position] != ("punct", "]"):
                    fields.setdefault(name, []).append(value())
                    if tokens[position] == ("punct", ","):
                        position += 1
                position += 1
            else:
                fields.setdefault(name, []).append(value())
        position += 1
        return fields

    return message(None)


def one(message: dict, name: str):
    values = message[name]
    assert len(values) == 1, (name, values)
    return values[0]


def parameters(config: dict) -> dict[str, str]:
    return {one(p, "key"): one(one(p, "value"), "string_value") for p in config.get("parameters", [])}


def as_triton_json(config: dict) -> dict:
    """The model config as Triton hands it to a python model (``args["model_config"]``): parameters as a map."""
    return {"name": one(config, "name"), "parameters": {k: {"string_value": v} for k, v in parameters(config).items()}}


# --- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(tiny_exports) -> Path:
    return tiny_exports("fp32").folder


@pytest.fixture(scope="module")
def repo(export, tmp_path_factory) -> Path:
    options = TritonRepoOptions(threads=1, max_batch=4, instances=2, with_decoder_model=True)
    return write_triton_repo(open_export(export), tmp_path_factory.mktemp("triton") / "repo", options)


def test_repository_layout_and_python_model_config(repo):
    assert sorted(p.name for p in repo.iterdir()) == sorted([MARKER_NAME, "gptmeg", "gptmeg_decoder"])
    marker = json.loads((repo / MARKER_NAME).read_text())
    assert marker["format"] == "gptmeg-triton-repo/1" and marker["models"] == ["gptmeg", "gptmeg_decoder"]
    model_py = repo / "gptmeg" / "1" / "model.py"
    assert model_py.read_bytes() == (ROOT / "engines" / "serving" / "triton_model.py").read_bytes()

    config = parse_pbtxt((repo / "gptmeg" / "config.pbtxt").read_text())
    assert one(config, "name") == "gptmeg" and one(config, "backend") == "python"
    assert one(config, "max_batch_size") == 0
    assert one(one(config, "model_transaction_policy"), "decoupled") is True
    inputs = {one(i, "name"): i for i in config["input"]}
    assert list(inputs) == [name for name, *_ in TEXT_INPUTS]
    expected = {"text_input": ("TYPE_STRING", [1, 1], False), "max_tokens": ("TYPE_INT32", [1, 1], True),
                "stream": ("TYPE_BOOL", [1, 1], True), "temperature": ("TYPE_FP32", [1, 1], True),
                "top_p": ("TYPE_FP32", [1, 1], True), "top_k": ("TYPE_INT32", [1, 1], True),
                "seed": ("TYPE_UINT64", [1, 1], True), "stop_words": ("TYPE_STRING", [1, -1], True),
                "ignore_eos": ("TYPE_BOOL", [1, 1], True)}
    for name, (data_type, dims, optional) in expected.items():
        entry = inputs[name]
        assert one(entry, "data_type") == data_type and entry["dims"] == dims, name
        assert entry.get("optional", [False]) == [optional], name
    outputs = {one(o, "name"): (one(o, "data_type"), o["dims"]) for o in config["output"]}
    assert outputs == {"text_output": ("TYPE_STRING", [1, -1]), "finish_reason": ("TYPE_STRING", [1, -1])}
    group = one(config, "instance_group")
    assert one(group, "count") == 2 and one(group, "kind") == "KIND_CPU"
    params = parameters(config)
    assert params["backend"] == "onnxruntime" and params["provider"] == "cpu"
    assert params["threads"] == "1" and params["max_batch"] == "4" and params["export_dir"] == "export"
    assert Path(params["project_root"]) == ROOT and (Path(params["project_root"]) / "engines").is_dir()


def test_copied_export_verifies_and_equals_the_source(repo, export):
    copy = repo / "gptmeg" / "1" / "export"
    artifact = open_export(copy, verify=True)
    assert artifact.spec == open_export(export).spec
    source = tree_digest(export)
    assert tree_digest(copy) == {name: source[name] for name in [*artifact.manifest["files"], "manifest.json"]}


def test_decoder_model_config_comes_from_the_manifest(repo, export):
    manifest = json.loads((export / "manifest.json").read_text())
    config = parse_pbtxt((repo / "gptmeg_decoder" / "config.pbtxt").read_text())
    assert one(config, "backend") == "onnxruntime" and one(config, "max_batch_size") == 0
    assert one(config, "default_model_filename") == "model.onnx"
    types_ = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}
    for key, section in (("inputs", "input"), ("outputs", "output")):
        want = [(e["name"], types_[e["dtype"]], [d if isinstance(d, int) else -1 for d in e["shape"]])
                for e in manifest[key]]
        got = [(one(e, "name"), one(e, "data_type"), e["dims"]) for e in config[section]]
        assert got == want
    names = [one(e, "name") for e in config["input"]]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and "past_key_values.1.value" in names
    assert any(one(e, "name") == "logits" and e["dims"][-1] == manifest["config"]["vocab_size"]
               for e in config["output"])
    group = one(config, "instance_group")
    assert one(group, "kind") == "KIND_CPU" and one(group, "count") == 2
    assert parameters(config) == {"intra_op_thread_count": "1", "inter_op_thread_count": "1"}
    assert (repo / "gptmeg_decoder" / "1" / "model.onnx").read_bytes() == (export / "model.onnx").read_bytes()


def test_external_data_travels_with_the_decoder_model(export, tmp_path):
    import onnx

    from export.manifest import file_digests

    folder = tmp_path / "external"
    shutil.copytree(export, folder)
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = file_digests(folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    repo = write_triton_repo(open_export(folder), tmp_path / "repo", TritonRepoOptions(with_decoder_model=True))
    assert sorted(p.name for p in (repo / "gptmeg_decoder" / "1").iterdir()) == ["model.onnx", "model.onnx.data"]
    open_export(repo / "gptmeg" / "1" / "export", verify=True)


def test_cuda_provider_places_instances_on_the_gpu(export, tmp_path):
    repo = write_triton_repo(open_export(export), tmp_path / "repo",
                             TritonRepoOptions(provider="cuda", model_name="m1", with_decoder_model=True))
    for model in ("m1", "m1_decoder"):
        config = parse_pbtxt((repo / model / "config.pbtxt").read_text())
        assert one(config, "name") == model and one(one(config, "instance_group"), "kind") == "KIND_GPU"
    assert parameters(parse_pbtxt((repo / "m1" / "config.pbtxt").read_text()))["provider"] == "cuda"


def _fake_engine(folder: Path, sha: str, built: str, tag: bytes) -> Path:
    engine = folder / "tensorrt" / tag.decode()
    engine.mkdir(parents=True)
    (engine / "engine.plan").write_bytes(b"plan " + tag)
    profiles = [{"input_ids": [[1, 1], [1, 8], [8, 64]]}, {"input_ids": [[1, 1], [1, 1], [8, 1]]}]
    (engine / "engine.json").write_text(json.dumps({
        "key": tag.decode() * 4, "onnx_sha256": sha, "gpu": "NVIDIA H100", "compute_capability": "9.0",
        "tensorrt": "10.9.0", "options": {}, "profiles": profiles, "build_seconds": 1.0, "built": built}))
    return engine


def test_tensorrt_backend_uses_the_cached_engine(tiny_exports, tmp_path):
    folder = tmp_path / "fp16"
    shutil.copytree(tiny_exports("fp16").folder, folder)
    artifact = open_export(folder)
    out = tmp_path / "repo"
    with pytest.raises(EngineError, match=r"run `python -m engines build .*` first"):
        write_triton_repo(artifact, out, TritonRepoOptions(backend="trt", with_decoder_model=True))
    assert not out.exists() and not siblings(out)

    sha = artifact.manifest["files"]["model.onnx"]["sha256"]
    _fake_engine(folder, "0" * 64, "2030-01-01T00:00:00+00:00", b"othermodel")  # another model.onnx: ignored
    _fake_engine(folder, sha, "2026-01-01T00:00:00+00:00", b"older")
    newest = _fake_engine(folder, sha, "2026-06-01T00:00:00+00:00", b"newest")
    repo = write_triton_repo(artifact, out, TritonRepoOptions(backend="tensorrt", with_decoder_model=True))
    decoder = parse_pbtxt((repo / "gptmeg_decoder" / "config.pbtxt").read_text())
    assert one(decoder, "platform") == "tensorrt_plan" and "backend" not in decoder
    group = one(decoder, "instance_group")
    assert one(group, "kind") == "KIND_GPU" and group["profile"] == ["0", "1"]
    assert (repo / "gptmeg_decoder" / "1" / "model.plan").read_bytes() == b"plan newest"
    assert "NVIDIA H100" in (repo / "gptmeg_decoder" / "config.pbtxt").read_text()
    model = parse_pbtxt((repo / "gptmeg" / "config.pbtxt").read_text())
    assert one(one(model, "instance_group"), "kind") == "KIND_GPU"
    assert parameters(model)["backend"] == "tensorrt" and parameters(model)["engine_dir"] == "tensorrt/newest"
    copied = repo / "gptmeg" / "1" / "export" / "tensorrt" / "newest"
    assert tree_digest(copied) == tree_digest(newest)


def test_tensorrt_backend_refuses_an_fp32_export(export, tmp_path):
    folder = tmp_path / "fp32"
    shutil.copytree(export, folder)
    artifact = open_export(folder)
    _fake_engine(folder, artifact.manifest["files"]["model.onnx"]["sha256"], "2026", b"e")
    with pytest.raises(EngineError, match="fp16"):
        write_triton_repo(artifact, tmp_path / "repo", TritonRepoOptions(backend="tensorrt"))


@pytest.mark.parametrize("field, value, fragment", [
    ("max_batch", 0, "--max-batch must be >= 1"), ("instances", 0, "--instances must be >= 1"),
    ("threads", 0, "--threads must be >= 1"), ("model_name", "../x", "--model-name"), ("model_name", "", "--model-name"),
    ("backend", "vllm", "unknown backend"), ("provider", "rocm", "unknown provider")])
def test_options_are_validated(field, value, fragment):
    with pytest.raises(EngineError, match=re.escape(fragment)):
        TritonRepoOptions(**{field: value})
    assert TritonRepoOptions(backend="ort").backend == "onnxruntime"


def test_force_replaces_only_an_earlier_repository(export, tmp_path, monkeypatch):
    artifact = open_export(export)
    out = tmp_path / "repo"
    write_triton_repo(artifact, out)
    first = (out / MARKER_NAME).read_text()
    with pytest.raises(EngineError, match="already exists.*--force"):
        write_triton_repo(artifact, out)
    write_triton_repo(artifact, out, TritonRepoOptions(model_name="other"), force=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "other"] and not siblings(out)
    assert json.loads((out / MARKER_NAME).read_text())["models"] == ["other"] and first

    foreign = tmp_path / "foreign"
    (foreign / "gptmeg").mkdir(parents=True)
    (foreign / "gptmeg" / "config.pbtxt").write_text("name: 'mine'\n")
    before = tree_digest(foreign)
    with pytest.raises(EngineError, match=f"not a Triton repository.*no {MARKER_NAME}"):
        write_triton_repo(artifact, foreign, force=True)
    assert tree_digest(foreign) == before and not siblings(foreign)

    empty = tmp_path / "empty"
    empty.mkdir()
    write_triton_repo(artifact, empty, force=True)
    assert (empty / "gptmeg" / "config.pbtxt").is_file()

    with pytest.raises(EngineError, match="inside the export"):
        write_triton_repo(artifact, export / "repo")
    assert not (export / "repo").exists()

    def broken(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(triton_repo, "_copy_export", broken)
    before = tree_digest(out)
    with pytest.raises(OSError, match="No space"):
        write_triton_repo(artifact, out, force=True)
    assert tree_digest(out) == before and not siblings(out)  # the earlier repository is untouched
    with pytest.raises(OSError):
        write_triton_repo(artifact, tmp_path / "never")
    assert not (tmp_path / "never").exists() and not siblings(tmp_path / "never")


# --- the python model with a fake triton_python_backend_utils -----------------------------------------------------


class FakeTensor:
    def __init__(self, name: str, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


class FakeResponse:
    def __init__(self, output_tensors=(), error=None):
        self.outputs = {t.name: t.array for t in output_tensors}
        self.error = error


class FakeError:
    def __init__(self, message: str):
        self.message = message


class FakeSender:
    def __init__(self, cancelled: bool = False):
        self.sent: list[tuple[FakeResponse | None, int]] = []
        self.closed = threading.Event()
        self.cancelled = cancelled

    def send(self, response=None, flags: int = 0):
        assert not self.closed.is_set(), "a response after the final flag"
        self.sent.append((response, flags))
        if flags & FINAL:
            self.closed.set()

    def is_cancelled(self) -> bool:
        return self.cancelled

    def texts(self) -> list[str]:
        return [r.outputs["text_output"].reshape(-1)[0].decode() for r, _ in self.sent if r and r.error is None]

    def finish_reasons(self) -> list[str | None]:
        return [r.outputs["finish_reason"].reshape(-1)[0].decode() if r and "finish_reason" in r.outputs else None
                for r, _ in self.sent]


class FakeRequest:
    """Inputs as Triton's OpenAI frontend sends them: [[value]] arrays, stop words [[w1, w2]]."""

    def __init__(self, prompt: str | None, sender: FakeSender | None = None, **values):
        self.inputs = {}
        if prompt is not None:
            self.inputs["text_input"] = np.array([[prompt.encode()]], dtype=np.object_)
        kinds = {"max_tokens": np.int32, "stream": np.bool_, "temperature": np.float32, "top_p": np.float32,
                 "top_k": np.int32, "seed": np.uint64, "ignore_eos": np.bool_, "frequency_penalty": np.float32,
                 "presence_penalty": np.float32, "repetition_penalty": np.float32}
        for name, value in values.items():
            if name == "stop_words":
                self.inputs[name] = np.array([[w.encode() for w in value]], dtype=np.object_)
            else:
                self.inputs[name] = np.array([[value]], dtype=kinds[name])
        self.sender = sender or FakeSender()

    def get_response_sender(self):
        return self.sender


FINAL = 1


@pytest.fixture
def pb_utils(monkeypatch):
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = FakeTensor
    module.InferenceResponse = FakeResponse
    module.TritonError = FakeError
    module.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    module.get_input_tensor_by_name = lambda request, name: (FakeTensor(name, request.inputs[name])
                                                             if name in request.inputs else None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


@pytest.fixture
def model(repo, pb_utils, monkeypatch):
    """The repository's own model.py, loaded as Triton's stub loads it, initialized as Triton does."""
    path = repo / "gptmeg" / "1" / "model.py"
    spec = importlib.util.spec_from_file_location("gptmeg_triton_model_under_test", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    config = as_triton_json(parse_pbtxt((repo / "gptmeg" / "config.pbtxt").read_text()))
    instance = module.TritonPythonModel()
    instance.initialize({"model_config": json.dumps(config), "model_repository": str(repo / "gptmeg"),
                         "model_version": "1", "model_instance_kind": "CPU", "model_instance_device_id": "0"})
    yield instance
    instance.finalize()
    assert not instance.scheduler.alive


@pytest.fixture(scope="module")
def reference(export):
    artifact = open_export(export)
    runtime = make_runtime(artifact, threads=1)
    tokenizer = artifact.tokenizer

    def text(prompt: str, max_tokens: int, stop: tuple[str, ...] = ()) -> str:
        result = generate(runtime, [tokenizer.encode(prompt).ids],
                          GenerationSettings(max_new_tokens=max_tokens, stop_strings=stop), decode=tokenizer.decode)
        out = tokenizer.decode(result.tokens[0])
        cuts = [out.find(s) for s in stop if s in out]
        return out[:min(cuts)] if cuts else out

    return text


def run_requests(model, *requests: FakeRequest, timeout: float = 60) -> None:
    assert model.execute(list(requests)) is None  # decoupled: every answer goes through the senders
    for request in requests:
        assert request.sender.closed.wait(timeout), "no final response"


PROMPTS = ["Once upon a time", "The meaning of life is", "a"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_streamed_text_equals_generate(model, reference, prompt):
    request = FakeRequest(prompt, max_tokens=12, temperature=0.0, stream=True)
    run_requests(model, request)
    sent = request.sender.sent
    assert all(r is not None and r.error is None for r, _ in sent)
    assert [flags for _, flags in sent] == [0] * (len(sent) - 1) + [FINAL]
    assert "".join(request.sender.texts()) == reference(prompt, 12)
    assert all(t for t in request.sender.texts()[:-1])  # no empty deltas except possibly the last
    reasons = request.sender.finish_reasons()
    assert reasons[:-1] == [None] * (len(reasons) - 1) and reasons[-1] in ("stop", "length")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_non_stream_sends_one_final_response(model, reference, prompt):
    request = FakeRequest(prompt, max_tokens=12, temperature=0.0)  # stream omitted = false
    run_requests(model, request)
    assert [flags for _, flags in request.sender.sent] == [FINAL]
    assert request.sender.texts() == [reference(prompt, 12)]
    assert request.sender.finish_reasons() == ["length"] or request.sender.finish_reasons() == ["stop"]


def test_concurrent_requests_are_batched_and_each_equals_its_own_run(model, reference):
    requests = [FakeRequest(p, max_tokens=10 + i, temperature=0.0, stream=bool(i % 2))
                for i, p in enumerate(PROMPTS * 3)]
    run_requests(model, *requests)
    for i, request in enumerate(requests):
        assert "".join(request.sender.texts()) == reference(PROMPTS[i % 3], 10 + i), i
    assert model.scheduler.stats.decode_rows > model.scheduler.stats.decode_steps  # rows shared decode steps


@pytest.mark.parametrize("stream", [True, False])
def test_stop_words_cut_the_text(model, reference, stream):
    full = reference(PROMPTS[0], 12)
    stop = full[3:5]
    assert len(stop) == 2
    request = FakeRequest(PROMPTS[0], max_tokens=12, temperature=0.0, stream=stream, stop_words=[stop, "never-seen"])
    run_requests(model, request)
    text = "".join(request.sender.texts())
    assert text == reference(PROMPTS[0], 12, (stop, "never-seen")) == full[: full.find(stop)]
    assert stop not in text and request.sender.finish_reasons()[-1] == "stop"


def test_seeded_sampling_is_reproducible(model):
    requests = [FakeRequest(PROMPTS[0], max_tokens=10, temperature=0.9, top_k=20, top_p=0.95, seed=7)
                for _ in range(2)]
    run_requests(model, *requests)
    assert requests[0].sender.texts() == requests[1].sender.texts()


def test_a_failing_runtime_gives_an_error_response_and_the_next_request_works(model, reference, monkeypatch):
    def boom(*_args, **_kwargs):
        raise RuntimeError("device lost")

    with monkeypatch.context() as patch:
        patch.setattr(model.runtime, "step", boom)
        for stream in (True, False):
            request = FakeRequest(PROMPTS[0], max_tokens=8, temperature=0.0, stream=stream)
            run_requests(model, request)
            [(response, flags)] = request.sender.sent
            assert flags == FINAL and isinstance(response.error, FakeError)
            assert "generation failed: device lost" in response.error.message
    request = FakeRequest(PROMPTS[0], max_tokens=8, temperature=0.0)
    run_requests(model, request)
    assert request.sender.texts() == [reference(PROMPTS[0], 8)]
    assert model.scheduler.alive and model.scheduler.stats.failed == 2


@pytest.mark.parametrize("values, fragment", [
    ({}, "input 'text_input' is required"),
    ({"text": "", "max_tokens": 4}, "the prompt is empty"),
    ({"text": "a", "max_tokens": 100000}, "This model's maximum context length is"),
    ({"text": "a", "max_tokens": 0}, "max_tokens must be >= 1"),
    ({"text": "a", "frequency_penalty": 0.5}, "frequency_penalty is not supported"),
    ({"text": "a", "temperature": -1.0}, "temperature must be >= 0"),
    ({"text": "a", "top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"text": "a", "stop_words": [""]}, "a stop word must not be empty"),
])
def test_bad_inputs_get_an_error_response(model, values, fragment):
    values = dict(values)
    request = FakeRequest(values.pop("text", None), **values)
    run_requests(model, request)
    [(response, flags)] = request.sender.sent
    assert flags == FINAL and fragment in response.error.message
    assert model.scheduler.stats.received == 0  # refused before queueing


def test_a_cancelled_request_frees_its_row(model):
    request = FakeRequest(PROMPTS[0], max_tokens=30, temperature=0.0, stream=True, ignore_eos=True,
                          sender=FakeSender(cancelled=True))
    run_requests(model, request)
    assert request.sender.sent == [(None, FINAL)]
    stats = model.scheduler.stats
    deadline = time.monotonic() + 10
    while stats.cancelled < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stats.cancelled == 1 and stats.completed == 0 and stats.generated_tokens < 30


def test_queue_metrics_follow_the_scheduler(model):
    families = []

    class Family:
        GAUGE = "gauge"

        def __init__(self, name, description, kind):
            self.name, self.kind, self.values = name, kind, []
            families.append(self)

        def Metric(self, labels):  # noqa: N802 - Triton's name
            self.labels = labels
            return types.SimpleNamespace(set=self.values.append)

    module = sys.modules[type(model).__module__]
    scheduler = types.SimpleNamespace(stats=types.SimpleNamespace(waiting=3, running=2))
    metrics = module.QueueMetrics(types.SimpleNamespace(MetricFamily=Family), scheduler, {"model": "gptmeg"}, 0.01)
    deadline = time.monotonic() + 10
    while not all(f.values for f in families) and time.monotonic() < deadline:
        time.sleep(0.01)
    metrics.stop()
    assert [(f.name, f.kind, f.values[-1], f.labels) for f in families] == [
        ("gptmeg:num_requests_waiting", "gauge", 3, {"model": "gptmeg"}),
        ("gptmeg:num_requests_running", "gauge", 2, {"model": "gptmeg"})]
    assert model.metrics is None  # the fake utils module has no MetricFamily: the model loads without metrics


def test_model_py_does_not_need_triton_to_import(repo):
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('m', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['m'] = m; spec.loader.exec_module(m); "
            "print('triton_python_backend_utils' in sys.modules, 'torch' in sys.modules, 'engines' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(repo / "gptmeg" / "1" / "model.py")], capture_output=True,
                         text=True, cwd="/", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "False"]


# --- the command line ------------------------------------------------------------------------------------------


def test_cli_writes_a_repository_and_follows_the_force_rules(export, tmp_path):
    out = tmp_path / "repo"
    result = run_cli("engines", "triton-repo", export, "--out", out, "--max-batch", "2", "--instances", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    config = parse_pbtxt((out / "gptmeg" / "config.pbtxt").read_text())
    assert parameters(config)["max_batch"] == "2" and one(one(config, "instance_group"), "count") == 3
    assert not (out / "gptmeg_decoder").exists()
    assert_refused(run_cli("engines", "triton-repo", export, "--out", out), "already exists", "--force")
    assert run_cli("engines", "triton-repo", export, "--out", out, "--force", "--with-decoder-model").returncode == 0
    assert (out / "gptmeg_decoder" / "config.pbtxt").is_file()
    assert_refused(run_cli("engines", "triton-repo", export, "--out", tmp_path / "x", "--max-batch", "0"),
                   "--max-batch must be >= 1")
    assert_refused(run_cli("engines", "triton-repo", export, "--out", tmp_path / "y", "--backend", "trt"),
                   "python -m engines build")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- opt-in: a real tritonserver ------------------------------------------------------------------------------------


@pytest.mark.triton
def test_repository_serves_in_a_real_tritonserver(export):
    venv = os.environ.get("GPTMEG_TRITON_VENV")
    if not venv:
        pytest.skip("set GPTMEG_TRITON_VENV to a venv with nvidia-pytriton==0.7.0 (numpy<2, onnx, onnxruntime, "
                    "tokenizers): python scripts/triton_check.py --venv /tmp/ptvenv --build-venv")
    if not (Path(venv) / "bin" / "python").exists():
        pytest.skip(f"GPTMEG_TRITON_VENV={venv} is not a venv")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "triton_check.py"), "--venv", venv, "--export",
                             str(export)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "PASS", \
        result.stdout[-6000:] + result.stderr[-3000:]
