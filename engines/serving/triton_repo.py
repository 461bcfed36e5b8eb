"""``python -m engines triton-repo``: a Triton Inference Server model repository serving an export.

The main model is a **decoupled python-backend model** whose ``model.py`` (a verbatim copy of
:mod:`engines.serving.triton_model`) runs the same :class:`~engines.serving.scheduler.Scheduler` over the same export
as ``python -m engines serve``. Its inputs and outputs follow the TensorRT-LLM style that Triton's OpenAI-compatible
frontend sends to any non-vLLM model (``text_input``, ``max_tokens``, ``stream``, ... -> ``text_output``)::

    REPO/gptmeg-triton-repo.json      marker: this folder was written by triton-repo (what --force may replace)
    REPO/<name>/config.pbtxt          backend "python", decoupled, IO and parameters
    REPO/<name>/1/model.py            TritonPythonModel
    REPO/<name>/1/export/             a verified copy of the export folder
    REPO/<name>_decoder/...           with --with-decoder-model: the stateless decoder as an onnxruntime model
                                      (or a tensorrt_plan model for --backend tensorrt), IO from the manifest

The repository is written into a hidden sibling folder and swapped into place atomically (``safeio.staging``).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from safeio.staging import OutputExistsError, OutputNotWritableError, staged_directory

from ..artifacts import ExportArtifact, open_export
from ..backends import ALIASES, BACKENDS
from ..errors import EngineError, check_counts

__all__ = ["MARKER_NAME", "TritonRepoOptions", "is_triton_repo", "write_triton_repo"]

MARKER_NAME = "gptmeg-triton-repo.json"
FORMAT = "gptmeg-triton-repo/1"
EXPORT_FOLDER = "export"  # inside the model's version folder
VERSION = "1"
MODEL_TEMPLATE = Path(__file__).with_name("triton_model.py")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

# Triton's data types for the manifest's dtypes
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}

# (name, data type, dims, optional): TensorRT-LLM-style names, shapes as Triton's OpenAI frontend sends them
# ([[prompt]], [[stream]], [stop words]) with max_batch_size 0
TEXT_INPUTS = (
    ("text_input", "TYPE_STRING", [1, 1], False),
    ("max_tokens", "TYPE_INT32", [1, 1], True),
    ("stream", "TYPE_BOOL", [1, 1], True),
    ("temperature", "TYPE_FP32", [1, 1], True),
    ("top_p", "TYPE_FP32", [1, 1], True),
    ("top_k", "TYPE_INT32", [1, 1], True),
    ("repetition_penalty", "TYPE_FP32", [1, 1], True),
    ("frequency_penalty", "TYPE_FP32", [1, 1], True),  # sent by the OpenAI frontend when given: only 0 is accepted
    ("presence_penalty", "TYPE_FP32", [1, 1], True),
    ("seed", "TYPE_UINT64", [1, 1], True),
    ("stop_words", "TYPE_STRING", [1, -1], True),
    ("ignore_eos", "TYPE_BOOL", [1, 1], True),
)
TEXT_OUTPUTS = (
    ("text_output", "TYPE_STRING", [1, -1]),  # one string per response: a delta (stream) or the whole text
    ("finish_reason", "TYPE_STRING", [1, -1]),  # "stop" | "length", on the last response only
)


@dataclass(frozen=True)
class TritonRepoOptions:
    model_name: str = "gptmeg"
    backend: str = "onnxruntime"  # runtime inside the python model
    provider: str = "cpu"  # onnxruntime device
    threads: int | None = None  # intra-op threads (None: onnxruntime's choice)
    max_batch: int = 8  # rows the scheduler decodes together
    instances: int = 1  # Triton model instances (each its own runtime and scheduler)
    with_decoder_model: bool = False

    def __post_init__(self):
        backend = ALIASES.get(self.backend, self.backend)
        if backend not in BACKENDS:
            raise EngineError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}.")
        object.__setattr__(self, "backend", backend)
        if self.provider not in ("cpu", "cuda"):
            raise EngineError(f"unknown provider {self.provider!r}: choose cpu or cuda.")
        if not _NAME.fullmatch(self.model_name) or len(self.model_name) > 100:
            raise EngineError(f"--model-name {self.model_name!r} must be a folder name of letters, digits, '_', '.' "
                              "and '-' (at most 100 characters), e.g. gptmeg.")
        check_counts(self, ("max_batch", "instances", "threads"))

    @property
    def decoder_name(self) -> str:
        return f"{self.model_name}_decoder"

    @property
    def instance_kind(self) -> str:
        return "KIND_GPU" if self.provider == "cuda" or self.backend == "tensorrt" else "KIND_CPU"


def is_triton_repo(folder: Path) -> bool:
    """True when ``folder`` holds the marker file a repository written by ``triton-repo`` has."""
    try:
        marker = json.loads((Path(folder) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == FORMAT


def write_triton_repo(artifact: ExportArtifact, out: str | Path, options: TritonRepoOptions = TritonRepoOptions(),
                      force: bool = False) -> Path:
    """Write the model repository for ``artifact`` to ``out`` (atomically); returns its absolute path.

    ``force`` replaces ``out`` only when it is an earlier repository written by this function (or empty).
    """
    out = Path(out).absolute()
    source = artifact.folder.resolve()
    if out.resolve() == source or source in out.resolve().parents:
        raise EngineError(f"--out {out} is inside the export {source}; choose a folder outside it.")
    if artifact.model_path != artifact.folder / artifact.manifest.get("model_file", "model.onnx"):
        raise EngineError("a Triton repository serves the export's own model file; open the export without "
                          "model_path.")
    engine = _cached_engine(artifact) if options.backend == "tensorrt" else None
    if options.backend == "tensorrt" and artifact.dtype != "fp16":
        raise EngineError(f"the tensorrt backend runs fp16 exports; {artifact.folder} is {artifact.dtype}. Export "
                          "with --dtype fp16, or use --backend onnxruntime.")
    try:
        with staged_directory(out, force, marker=is_triton_repo, protected=[source], what="a Triton repository",
                              option="--out") as staging:
            _write(staging, artifact, options, engine)
    except (OutputExistsError, OutputNotWritableError) as error:
        message = str(error).replace("(no manifest.json saying so)", f"(no {MARKER_NAME} saying so)")
        raise EngineError(message) from None
    return out


# --- writing ---------------------------------------------------------------------------------------------------


def _write(repo: Path, artifact: ExportArtifact, options: TritonRepoOptions, engine: tuple[Path, dict] | None) -> None:
    model_dir = repo / options.model_name
    version = model_dir / VERSION
    version.mkdir(parents=True)
    export_copy = version / EXPORT_FOLDER
    _copy_export(artifact, export_copy, engine)
    shutil.copyfile(MODEL_TEMPLATE, version / "model.py")
    engine_dir = f"tensorrt/{engine[0].name}" if engine is not None else None
    (model_dir / "config.pbtxt").write_text(python_model_config(options, engine_dir))
    models = [options.model_name]
    if options.with_decoder_model:
        decoder = repo / options.decoder_name
        (decoder / VERSION).mkdir(parents=True)
        if options.backend == "tensorrt":
            shutil.copyfile(engine[0] / "engine.plan", decoder / VERSION / "model.plan")
            text = decoder_config(artifact.manifest, options, platform="tensorrt_plan",
                                  profiles=len(engine[1].get("profiles") or [None, None]), engine=engine[1])
        else:
            for name in _onnx_files(artifact):
                shutil.copyfile(artifact.folder / name, decoder / VERSION / name)
            text = decoder_config(artifact.manifest, options, model_file=artifact.model_path.name)
        (decoder / "config.pbtxt").write_text(text)
        models.append(options.decoder_name)
    marker = {"format": FORMAT, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "export": str(artifact.folder.resolve()), "models": models}
    (repo / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def _copy_export(artifact: ExportArtifact, target: Path, engine: tuple[Path, dict] | None) -> None:
    """The manifest and every file it lists (plus the TensorRT engine the model runs), then verified."""
    target.mkdir()
    shutil.copyfile(artifact.folder / "manifest.json", target / "manifest.json")
    for name in artifact.manifest["files"]:
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(artifact.folder / name, path)
        except FileNotFoundError:
            raise EngineError(f"{artifact.folder / name} is listed in the manifest but missing; re-export the "
                              "model.") from None
    if engine is not None:
        shutil.copytree(engine[0], target / "tensorrt" / engine[0].name)
    try:
        open_export(target, verify=True)
    except EngineError as error:
        raise EngineError(f"the copy of {artifact.folder} does not verify ({error}); check the export with "
                          f"`python -m engines generate {artifact.folder} ...` and re-export it if needed.") from None


def _onnx_files(artifact: ExportArtifact) -> list[str]:
    """The model file and the external-data files it refers to."""
    import onnx

    model = onnx.load(str(artifact.model_path), load_external_data=False)
    names = {artifact.model_path.name}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.update(entry.value for entry in tensor.external_data if entry.key == "location")
    for name in names:
        if Path(name).is_absolute() or ".." in Path(name).parts or not (artifact.folder / name).is_file():
            raise EngineError(f"{artifact.model_path} refers to external data {name!r} that is not a file of the "
                              "export; re-export the model.")
    return sorted(names)


def _cached_engine(artifact: ExportArtifact) -> tuple[Path, dict]:
    """The newest TensorRT engine `python -m engines build` cached for this export's model.onnx (found without
    TensorRT: the Triton container, not this machine, runs it)."""
    sha = artifact.manifest["files"].get(artifact.model_path.name, {}).get("sha256")
    found = []
    for meta in sorted((artifact.folder / "tensorrt").glob("*/engine.json")):
        try:
            metadata = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(metadata, dict) and metadata.get("onnx_sha256") == sha and (meta.parent / "engine.plan").is_file():
            found.append((str(metadata.get("built", "")), meta.parent, metadata))
    if not found:
        raise EngineError(f"no TensorRT engine is cached for {artifact.folder}: run `python -m engines build "
                          f"{artifact.folder}` first, on a GPU with the TensorRT version of the Triton container.")
    _, folder, metadata = max(found, key=lambda item: item[0])
    return folder, metadata


# --- config.pbtxt ------------------------------------------------------------------------------------------------


class Enum(str):
    """A protobuf enum value: written bare (KIND_CPU), not quoted."""


def pbtxt(message: dict, indent: int = 0) -> str:
    """Protobuf text format of ``message``: str quoted, Enum bare, bool true/false, dict a message, list repeated."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            blocks = [f"{pad}  {{\n{pbtxt(v, indent + 2)}{pad}  }}" for v in value]
            lines.append(f"{pad}{key} [\n" + ",\n".join(blocks) + f"\n{pad}]\n")
        elif isinstance(value, dict):
            lines.append(f"{pad}{key} {{\n{pbtxt(value, indent + 1)}{pad}}}\n")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}\n")
    return "".join(lines)


def _scalar(value) -> str:
    if isinstance(value, list):
        return "[ " + ", ".join(_scalar(v) for v in value) + " ]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _parameters(values: dict) -> list[dict]:
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def _tensor(name: str, data_type: str, dims: list, optional: bool = False) -> dict:
    entry = {"name": name, "data_type": Enum(data_type), "dims": dims}
    if optional:
        entry["optional"] = True
    return entry


def project_root() -> Path:
    """The folder that holds the ``engines`` package in use (what model.py puts on sys.path)."""
    return Path(__file__).resolve().parents[2]


def python_model_config(options: TritonRepoOptions, engine_dir: str | None = None) -> str:
    parameters = {"backend": options.backend, "provider": options.provider, "max_batch": options.max_batch,
                  "max_waiting": 256, "max_prefill_tokens": 2048, "default_max_tokens": 16,
                  "export_dir": EXPORT_FOLDER, "project_root": str(project_root())}
    if options.threads is not None:
        parameters["threads"] = options.threads
    if engine_dir is not None:
        parameters["engine_dir"] = engine_dir
    config = {
        "name": options.model_name,
        "backend": "python",
        "max_batch_size": 0,  # the scheduler inside batches (continuous batching); Triton hands requests over as-is
        "model_transaction_policy": {"decoupled": True},
        "input": [_tensor(*spec) for spec in TEXT_INPUTS],
        "output": [_tensor(*spec) for spec in TEXT_OUTPUTS],
        "instance_group": [{"count": options.instances, "kind": Enum(options.instance_kind)}],
        "parameters": _parameters(parameters),
    }
    header = ("# Written by `python -m engines triton-repo`: a decoupled python-backend model running the engines\n"
              "# scheduler over 1/export. Inputs in the TensorRT-LLM style of Triton's OpenAI frontend; an omitted\n"
              "# temperature samples at 1.0 (as OpenAI), temperature 0 is greedy. project_root is added to sys.path\n"
              "# when it exists (the python stub does not see PYTHONPATH); with the project pip-installed it is unused.\n")
    return header + pbtxt(config)


def _dims(shape: list) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in shape]


def _io(entries: list[dict], what: str) -> list[dict]:
    tensors = []
    for entry in entries:
        dtype = TRITON_TYPES.get(entry.get("dtype"))
        if dtype is None:
            raise EngineError(f"the manifest's {what} {entry.get('name')!r} has dtype {entry.get('dtype')!r}, which "
                              "has no Triton data type here; re-export the model.")
        tensors.append(_tensor(entry["name"], dtype, _dims(entry.get("shape", []))))
    return tensors


def decoder_config(manifest: dict, options: TritonRepoOptions, *, platform: str | None = None,
                   model_file: str = "model.onnx", profiles: int = 2, engine: dict | None = None) -> str:
    """The stateless decoder (input_ids, attention_mask, position_ids, past_key_values.* -> logits, present.*) as a
    Triton model: onnxruntime backend, or ``platform="tensorrt_plan"`` for the engine from `engines build`."""
    config: dict = {"name": options.decoder_name}
    group: dict = {"count": options.instances}
    if platform == "tensorrt_plan":
        config["platform"] = "tensorrt_plan"
        group.update(kind=Enum("KIND_GPU"), profile=[str(i) for i in range(profiles)])
    else:
        config["backend"] = "onnxruntime"
        config["default_model_filename"] = model_file
        group["kind"] = Enum("KIND_GPU" if options.provider == "cuda" else "KIND_CPU")
    config["max_batch_size"] = 0  # the graph has its own dynamic batch dimension
    config["input"] = _io(manifest["inputs"], "input")
    config["output"] = _io(manifest["outputs"], "output")
    config["instance_group"] = [group]
    if platform != "tensorrt_plan" and options.threads is not None:
        config["parameters"] = _parameters({"intra_op_thread_count": options.threads, "inter_op_thread_count": 1})
    header = ("# Written by `python -m engines triton-repo --with-decoder-model`: one forward step of the decoder with\n"
              "# KV cache (the client or a BLS model runs the loop; present.* of a step is past_key_values.* of the\n"
              "# next). Names, data types and dims from the export's manifest.json; -1 = dynamic.\n")
    if engine is not None:
        header += (f"# TensorRT engine built for {engine.get('gpu')} (compute capability "
                   f"{engine.get('compute_capability')}) with TensorRT {engine.get('tensorrt')}: the Triton container "
                   "must have the\n# same TensorRT version and GPU. Profile 0 = prefill (empty past), 1 = decode "
                   "(one new token).\n")
    return header + pbtxt(config)
