"""An export folder as the runtimes see it: manifest, verified model file, decoder spec, tokenizer.

Reads only files (no torch, no model code): what ``python -m export`` wrote is the whole contract.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from export import io_names
from export.manifest import ManifestError, read_manifest, sha256_file

from .errors import ArtifactError

__all__ = ["DecoderSpec", "ExportArtifact", "open_export"]

_NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class DecoderSpec:
    """Shapes and types of the exported decoder with KV cache (from manifest.json)."""

    n_layer: int
    n_head: int
    head_dim: int
    vocab_size: int
    max_sequence: int
    kv_dtype: str  # "float16" | "float32"
    eos_token_id: int | None
    pad_token_id: int

    @property
    def numpy_kv_dtype(self):
        return _NUMPY_DTYPES[self.kv_dtype]

    def past_names(self) -> list[str]:
        return io_names.past_names(self.n_layer)

    def present_names(self) -> list[str]:
        return io_names.present_names(self.n_layer)


class ExportArtifact:
    """A verified export folder. ``open_export(folder)`` builds one."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder = folder
        self.manifest = manifest

    @property
    def model_path(self) -> Path:
        return self.folder / self.manifest.get("model_file", "model.onnx")

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @cached_property
    def spec(self) -> DecoderSpec:
        config, kv = self.manifest["config"], self.manifest["kv_cache"]
        eos = config.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        pad = config.get("pad_token_id")
        kv_input = next(i for i in self.manifest["inputs"] if i["name"] == "past_key_values.0.key")
        return DecoderSpec(
            n_layer=kv["n_layer"],
            n_head=kv["n_head"],
            head_dim=kv["head_dim"],
            vocab_size=config["vocab_size"],
            max_sequence=kv["max_sequence"],
            kv_dtype=kv_input["dtype"],
            eos_token_id=eos,
            pad_token_id=pad if pad is not None else (eos if eos is not None else 0),
        )

    @cached_property
    def tokenizer(self):
        """The export's fast tokenizer (``tokenizers.Tokenizer``), or an ArtifactError saying it is missing."""
        from tokenizers import Tokenizer

        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise ArtifactError(
                f"{self.folder} has no tokenizer.json: the export was made from a checkpoint without a tokenizer. "
                "Re-export from a folder that has one, or call engines.generate() with token ids from Python."
            )
        return Tokenizer.from_file(str(path))


def open_export(folder: str | Path, verify: bool = True) -> ExportArtifact:
    """Open an export folder; with ``verify`` check every file the manifest lists against its sha256."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except ManifestError as error:
        raise ArtifactError(str(error)) from None
    artifact = ExportArtifact(folder, manifest)
    files = manifest.get("files", {})
    model_name = artifact.model_path.name
    if not artifact.model_path.is_file():
        raise ArtifactError(f"{artifact.model_path} is missing; re-export the model with `python -m export`.")
    if verify:
        for name, entry in files.items():
            path = folder / name
            if not path.is_file():
                raise ArtifactError(f"{path} is listed in the manifest but missing; re-export the model.")
            if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise ArtifactError(
                    f"{path} does not match the sha256 in {folder / 'manifest.json'}: the file is corrupted or "
                    f"was changed after export. Re-export the model (python -m export ... --force)."
                )
        if model_name not in files:
            raise ArtifactError(f"the manifest of {folder} does not list {model_name}; re-export the model.")
    return artifact
