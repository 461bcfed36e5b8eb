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

__all__ = ["DecoderSpec", "ExportArtifact", "changed_files", "load_tokenizer", "open_export"]

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
    emit_vocab_size: int | None = None  # ids >= this are never generated (a Megatron vocabulary's padding rows)

    @property
    def numpy_kv_dtype(self):
        return _NUMPY_DTYPES[self.kv_dtype]

    def past_names(self) -> list[str]:
        return io_names.past_names(self.n_layer)

    def present_names(self) -> list[str]:
        return io_names.present_names(self.n_layer)


class ExportArtifact:
    """A verified export folder. ``open_export(folder)`` builds one."""

    def __init__(self, folder: Path, manifest: dict, model_path: Path | None = None):
        self.folder = folder
        self.manifest = manifest
        self._model_path = model_path  # another graph run with this folder's manifest, config and tokenizer

    @property
    def model_path(self) -> Path:
        return self._model_path or self.folder / self.manifest.get("model_file", "model.onnx")

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @cached_property
    def spec(self) -> DecoderSpec:
        config, kv = self.manifest["config"], self.manifest["kv_cache"]
        vocab = config["vocab_size"]

        def in_vocab(token):  # a config may name ids the model cannot produce (GPT-2's 50256 in a small vocab)
            token = token[0] if isinstance(token, list) and token else token
            return token if isinstance(token, int) and 0 <= token < vocab else None

        eos, pad = in_vocab(config.get("eos_token_id")), in_vocab(config.get("pad_token_id"))
        kv_input = next((i for i in self.manifest["inputs"] if i["name"] == io_names.past_name(0)), None)
        if kv_input is None or kv_input.get("dtype") not in _NUMPY_DTYPES:
            raise ArtifactError(f"the manifest of {self.folder} does not describe the {io_names.past_name(0)} input; "
                                "re-export the model.")
        return DecoderSpec(
            n_layer=kv["n_layer"],
            n_head=kv["n_head"],
            head_dim=kv["head_dim"],
            vocab_size=config["vocab_size"],
            max_sequence=kv["max_sequence"],
            kv_dtype=kv_input["dtype"],
            eos_token_id=eos,
            pad_token_id=pad if pad is not None else (eos if eos is not None else 0),
            emit_vocab_size=_emit_vocab_size(config),
        )

    @cached_property
    def tokenizer(self):
        """The export's fast tokenizer (``tokenizers.Tokenizer``), or an ArtifactError saying it is missing."""
        if not (self.folder / TOKENIZER_FILE).is_file():
            raise ArtifactError(
                f"{self.folder} has no tokenizer (the checkpoint it was exported from had none): pass token ids with "
                "--prompt-ids 1,2,3, or a tokenizer with --tokenizer DIR (a folder with tokenizer.json)."
            )
        return load_tokenizer(self.folder, self.spec.vocab_size)


TOKENIZER_FILE = "tokenizer.json"


def _emit_vocab_size(config: dict) -> int | None:
    """A converted Megatron model keeps the rows Megatron padded its vocabulary with (so logits are as wide as
    Megatron's) and records the real size: generation must never pick a padding row."""
    original = (config.get("megatron") or {}).get("original_vocab_size")
    return original if isinstance(original, int) and 0 < original < config["vocab_size"] else None


def load_tokenizer(folder: str | Path, vocab_size: int):
    """``tokenizers.Tokenizer`` from ``folder/tokenizer.json``, refused when its ids do not fit ``vocab_size``."""
    from tokenizers import Tokenizer

    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {TOKENIZER_FILE}; pass a folder that has one (save_pretrained() of a "
                            "fast tokenizer writes it).")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises its own exception type
        raise ArtifactError(f"{path} cannot be read as a tokenizer ({error}).") from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ArtifactError(f"the tokenizer in {folder} has {size} tokens but the model's vocabulary has {vocab_size}: "
                            "it is not this model's tokenizer.")
    return tokenizer


def changed_files(folder: Path, manifest: dict) -> list[str]:
    """Files the manifest lists that are missing or whose size or sha256 differs (changed after export)."""
    changed = []
    for name, entry in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            changed.append(name)
    return changed


def open_export(folder: str | Path, verify: bool = True, *, model_path: str | Path | None = None) -> ExportArtifact:
    """Open an export folder; with ``verify`` check every file the manifest lists against its sha256.
    ``model_path`` runs another ONNX file (a post-processed graph) with the folder's manifest and tokenizer."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder)
    except ManifestError as error:
        raise ArtifactError(str(error)) from None
    artifact = ExportArtifact(folder, manifest, Path(model_path) if model_path is not None else None)
    model_name = artifact.model_path.name
    if not artifact.model_path.is_file():
        if model_path is not None:
            raise ArtifactError(f"{model_path} is not a file.")
        raise ArtifactError(f"{artifact.model_path} is missing; re-export the model with `python -m export`.")
    if verify:
        for name in changed_files(folder, manifest):
            path = folder / name
            if not path.is_file():
                raise ArtifactError(f"{path} is listed in the manifest but missing; re-export the model.")
            raise ArtifactError(
                f"{path} does not match the sha256 in {folder / 'manifest.json'}: the file is corrupted or "
                f"was changed after export. Re-export the model (python -m export ... --force), or pass --no-verify."
            )
        if model_name not in manifest.get("files", {}) and model_path is None:
            raise ArtifactError(f"the manifest of {folder} does not list {model_name}; re-export the model.")
    return artifact
