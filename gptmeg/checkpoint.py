"""Reading checkpoint directories: GPTMeg's own, or a GPT-2 one converted on the fly (same parameter names)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .configuration_gptmeg import GPTMegConfig

__all__ = ["CheckpointError", "SUPPORTED_MODEL_TYPES", "load_config"]

SUPPORTED_MODEL_TYPES = ("gptmeg", "gpt2")


class CheckpointError(ValueError):
    """A checkpoint directory that GPTMeg cannot load, with the reason in the message."""


def load_config(path: str | os.PathLike) -> GPTMegConfig:
    """The GPTMegConfig of a local GPTMeg or GPT-2 checkpoint directory.

    A GPT-2 config keeps every field, including its activation (GPT-2's "gelu_new"), so the loaded model computes
    exactly what GPT-2 computes in fp32; only LayerNorm and the attention score change rounding in fp16.
    """
    directory = Path(path)
    config_file = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{str(path)!r} is not a directory. Pass a local GPTMeg or GPT-2 checkpoint folder.")
    if not config_file.is_file():
        raise CheckpointError(
            f"{directory} has no config.json, so it is not a transformers checkpoint. Pass a folder written by "
            "save_pretrained() of GPTMeg or GPT-2."
        )
    try:
        config_dict = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_file} is not valid JSON ({error}).") from None
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{config_file} must hold a JSON object, not {type(config_dict).__name__}.")
    model_type = config_dict.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{directory} holds a {model_type!r} checkpoint; GPTMeg loads only {' or '.join(SUPPORTED_MODEL_TYPES)} "
            "checkpoints (model_type in config.json)."
        )
    config_dict = {k: v for k, v in config_dict.items() if k not in ("model_type", "architectures", "transformers_version")}
    config_dict.setdefault("activation_function", "gelu_new" if model_type == "gpt2" else GPTMegConfig.activation_function)
    try:
        return GPTMegConfig.from_dict(config_dict)
    except (ValueError, TypeError) as error:  # the config's own checks (n_embd % n_head, activation, ...)
        raise CheckpointError(f"{config_file} is not a valid GPTMeg/GPT-2 config: {error}") from None
