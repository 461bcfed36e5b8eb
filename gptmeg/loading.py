"""Loading a checkpoint's weights strictly: every tensor of the model comes from the file, or the load is refused.

transformers fills tensors a checkpoint lacks with fresh random values and only logs a table about it; a model
exported or validated that way is not the checkpoint. Here a missing, unexpected or wrongly shaped tensor is a
:class:`IncompleteCheckpointError` naming the tensors, unless the caller explicitly allows it, and a corrupt or
truncated weights file is a :class:`~gptmeg.CheckpointError` instead of a library traceback.
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from safeio.terminal import first_line

from .checkpoint import CheckpointError, load_config
from .modeling_gptmeg import GPTMegLMHeadModel, GPTMegPreTrainedModel

__all__ = ["TOKENIZER_FILES", "IncompleteCheckpointError", "LoadReport", "has_tokenizer_files", "load_pretrained",
           "load_tokenizer_files", "quiet_transformers"]

_SHOWN = 5


class IncompleteCheckpointError(CheckpointError):
    """The checkpoint's tensors do not cover the model (missing, unexpected or wrongly shaped)."""

    def __init__(self, path, report: "LoadReport"):
        self.report = report
        super().__init__(
            f"{path} does not hold the whole model: {report.describe()}. Pass the complete checkpoint, or "
            "--allow-incomplete-checkpoint to accept random values in place of the missing tensors."
        )


def _names(kind: str, names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"{len(names)} {kind} ({shown}{more})"


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: randomly initialised
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model: ignored
    mismatched: list[str] = field(default_factory=list)  # both, different shapes: randomly initialised
    conversion: dict | None = None  # a Megatron checkpoint converted on the fly: its conversion.json record

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(_names("tensors missing", self.missing))
        if self.unexpected:
            parts.append(_names("unexpected tensors", self.unexpected))
        if self.mismatched:
            parts.append(_names("tensors of the wrong shape", self.mismatched))
        return "; ".join(parts) or "complete"

    def to_dict(self) -> dict:
        return {"complete": self.complete, "missing": self.missing, "unexpected": self.unexpected,
                "mismatched": self.mismatched, "megatron_conversion": self.conversion}


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or load tables from transformers while the block runs (errors still raise)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))  # either set makes a GPT-2 tokenizer


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    return any(all((Path(folder) / name).is_file() for name in group) for group in TOKENIZER_FILES)


def load_tokenizer_files(folder: str | os.PathLike):
    """``AutoTokenizer`` over a folder's tokenizer files, without transformers' chatter; a CheckpointError when the
    files cannot be loaded (never a made-up tokenizer: call :func:`has_tokenizer_files` first)."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # noqa: BLE001 - tokenizer loaders raise many types for damaged files
        raise CheckpointError(f"the tokenizer files in {folder} cannot be loaded ({type(error).__name__}: {error}). "
                              "Fix or remove them.") from None


def _load_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - older safetensors
        pass
    return tuple(errors)


def load_pretrained(
    path: str | os.PathLike,
    model_class: type[GPTMegPreTrainedModel] = GPTMegLMHeadModel,
    *,
    dtype: torch.dtype = torch.float32,
    allow_incomplete: bool = False,
) -> tuple[GPTMegPreTrainedModel, LoadReport]:
    """(model in eval mode, what the load found) for a local GPTMeg or GPT-2 checkpoint folder, or a Megatron-LM /
    Megatron-DeepSpeed save folder (converted in memory, see :mod:`gptmeg.megatron`).

    Raises CheckpointError for a folder that is not a usable checkpoint (with the reason), and
    IncompleteCheckpointError when tensors are missing, unexpected or wrongly shaped and ``allow_incomplete`` is
    False.
    """
    from .megatron import is_megatron_checkpoint, load_megatron_model

    if is_megatron_checkpoint(path):  # converted in memory: every tensor comes from the shards, or it is refused
        if model_class is not GPTMegLMHeadModel:
            raise CheckpointError(f"{path} is a Megatron checkpoint: convert it first (python -m gptmeg.convert) to "
                                  f"load it as {model_class.__name__}.")
        model, conversion = load_megatron_model(path, dtype=dtype)
        return model, LoadReport(conversion=conversion.record)
    config = load_config(path)  # a clear CheckpointError for a missing folder, a bad config, a wrong model type
    try:
        with quiet_transformers():
            model, info = model_class.from_pretrained(
                path, config=config, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=allow_incomplete
            )
    except CheckpointError:
        raise
    except _load_errors() as error:
        first = first_line(error)
        raise CheckpointError(f"could not load the model weights from {path}: {first}") from error
    report = LoadReport(
        missing=sorted(info.get("missing_keys", ())),
        unexpected=sorted(info.get("unexpected_keys", ())),
        mismatched=sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ())),
    )
    if not report.complete and not allow_incomplete:
        raise IncompleteCheckpointError(path, report)
    return model.eval(), report
