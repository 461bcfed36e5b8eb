"""manifest.json: what a later step needs to know about an export without loading the model."""

from __future__ import annotations

import datetime as _dt
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

from safeio.digest import sha256_file

__all__ = ["MANIFEST_NAME", "FORMAT", "sha256_file", "file_digests", "graph_io", "package_versions", "write_manifest",
           "read_manifest", "is_export_folder", "ManifestError"]

MANIFEST_NAME = "manifest.json"
FORMAT = "gptmeg-export/1"
_ONNX_TYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


_KV_FIELDS = ("n_layer", "n_head", "head_dim", "max_sequence")


class ManifestError(ValueError):
    pass


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file under ``folder`` (relative POSIX paths), manifest excluded."""
    return {
        p.relative_to(folder).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


def graph_io(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and shapes (symbolic dims by name) of the graph's inputs and outputs."""

    def describe(value):
        tensor = value.type.tensor_type
        shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim]
        return {
            "name": value.name,
            "dtype": _ONNX_TYPES.get(tensor.elem_type, str(tensor.elem_type)),
            "shape": shape,
            "dynamic_axes": {str(i): d for i, d in enumerate(shape) if isinstance(d, str)},
        }

    return {"inputs": [describe(v) for v in model.graph.input], "outputs": [describe(v) for v in model.graph.output]}


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "gptmeg-deploy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(folder: Path, content: dict[str, Any]) -> Path:
    manifest = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **content,
        "files": file_digests(folder),
    }
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def _structure_problem(manifest: Any) -> str | None:
    """What is wrong with the shape of a parsed manifest (None when a runtime can rely on it)."""
    if not isinstance(manifest, dict):
        return f"holds a JSON {type(manifest).__name__}, not an object"
    if manifest.get("format") != FORMAT:
        return f"has format {manifest.get('format')!r}, expected {FORMAT!r}"
    if manifest.get("dtype") not in ("fp16", "fp32"):
        return f"has dtype {manifest.get('dtype')!r}, expected 'fp16' or 'fp32'"
    config, kv = manifest.get("config"), manifest.get("kv_cache")
    if not isinstance(config, dict) or not isinstance(config.get("vocab_size"), int):
        return "has no config with an integer vocab_size"
    if not isinstance(kv, dict) or not all(isinstance(kv.get(k), int) for k in _KV_FIELDS):
        return f"has no kv_cache with integer {', '.join(_KV_FIELDS)}"
    for key in ("inputs", "outputs"):
        if not isinstance(manifest.get(key), list) or not all(isinstance(v, dict) and "name" in v
                                                               for v in manifest[key]):
            return f"has no list of {key}"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "has no files table"
    for name, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) \
                or not isinstance(entry.get("sha256"), str):
            return f"lists {name!r} without its sha256 and bytes"
    return None


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export folder, with a clear error when the folder is not an export or the manifest is
    damaged (not JSON, not UTF-8, fields missing)."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder. Pass a folder written by `python -m export`.")
    if not path.is_file():
        raise ManifestError(f"{folder} has no {MANIFEST_NAME}: it is not a `python -m export` output folder.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); re-export the model.") from None
    except OSError as error:
        raise ManifestError(f"{path} cannot be read ({error.strerror}).") from None
    problem = _structure_problem(manifest)
    if problem:
        raise ManifestError(f"{path} {problem}; re-export the model.")
    return manifest


def is_export_folder(folder: str | os.PathLike) -> bool:
    """True when ``folder`` has a manifest.json that says it was written by ``python -m export`` (its format). The
    test ``python -m export --force`` applies before replacing a folder."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT
