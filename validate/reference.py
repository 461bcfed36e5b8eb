"""The eager reference a deployed model is judged against: which model, on which device, in which precision."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gptmeg import GPTMegLMHeadModel

__all__ = ["REFERENCES", "ValidateError", "default_reference", "load_reference"]

REFERENCES = ("cpu-fp32", "cpu-fp16", "cuda-fp16")


class ValidateError(ValueError):
    """Validation cannot run as asked (bad folder, missing model, unavailable device); the message says why."""


def default_reference(graph_dtype: str) -> str:
    """The export's own precision; for fp16, CUDA when a GPU exists (the numerics Megatron defines), else CPU."""
    import torch

    if graph_dtype == "fp32":
        return "cpu-fp32"
    return "cuda-fp16" if torch.cuda.is_available() else "cpu-fp16"


def load_reference(manifest: dict, reference: str, model_dir: str | None = None) -> GPTMegLMHeadModel:
    """The eager model the export came from (``manifest["source"]``, or ``model_dir``), placed for ``reference``."""
    import torch  # here, not at the top: `python -m validate graph` and argument errors need no torch

    from gptmeg import CheckpointError, load_pretrained
    from gptmeg.tiny import TINY_NAME, tiny_model

    if reference not in REFERENCES:
        raise ValidateError(f"unknown reference {reference!r}: choose one of {', '.join(REFERENCES)}.")
    device, precision = reference.split("-")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValidateError("--reference cuda-fp16 needs a CUDA GPU and torch sees none; use cpu-fp16.")
    source = model_dir or manifest.get("source", "")
    if source == f"builtin:{TINY_NAME}":
        model = tiny_model()
    else:
        try:
            model, _ = load_pretrained(source, dtype=torch.float32)
        except CheckpointError as error:
            raise ValidateError(
                f"cannot load the eager reference from {source!r} ({error}). Pass the checkpoint with --model DIR."
            ) from None
    exported = manifest.get("config", {})
    for key in ("n_layer", "n_embd", "n_head", "vocab_size", "megatron_numerics"):
        if key in exported and getattr(model.config, key) != exported[key]:
            raise ValidateError(
                f"the reference model's {key} is {getattr(model.config, key)} but the export's is {exported[key]}: "
                "--model must be the checkpoint the export was made from."
            )
    dtype = torch.float16 if precision == "fp16" else torch.float32
    return model.to(device=device, dtype=dtype).eval()
