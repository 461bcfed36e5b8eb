"""``genai_config.json``: what onnxruntime-genai needs to run an export folder as it is.

The export's I/O names are already genai's defaults (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.%d.key/.value``, ``logits``, ``present.%d.key/.value``), and its KV cache is one key and one value
tensor per layer, which genai's generic ``decoder`` type reads (its ``gpt2`` type wants a combined cache). So
``onnxruntime_genai.Model(export_dir)`` works with no edits. Known limit: genai builds the attention mask of a
batch itself and attends to left padding, so batch 1 is the way to use it here.
"""

from __future__ import annotations

import json
from pathlib import Path

from .io_names import past_name, present_name

__all__ = ["GENAI_CONFIG", "genai_config", "write_genai_config"]

GENAI_CONFIG = "genai_config.json"


def _token(config, name: str) -> int:
    value = getattr(config, name, None)
    value = value[0] if isinstance(value, list) and value else value
    return value if isinstance(value, int) and 0 <= value < config.vocab_size else None


def genai_config(config, model_file: str) -> dict:
    eos = _token(config, "eos_token_id")
    eos = eos if eos is not None else 0
    pad = _token(config, "pad_token_id")
    return {
        "model": {
            "type": "decoder",
            "context_length": config.n_positions,
            "vocab_size": config.vocab_size,
            "bos_token_id": _token(config, "bos_token_id") if _token(config, "bos_token_id") is not None else eos,
            "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else eos,
            "decoder": {
                "filename": model_file,
                "head_size": config.n_embd // config.n_head,
                "hidden_size": config.n_embd,
                "num_attention_heads": config.n_head,
                "num_hidden_layers": config.n_layer,
                "num_key_value_heads": config.n_head,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": past_name(0).replace(".0.", ".%d."),
                    "past_value_names": past_name(1).replace(".0.", ".%d."),
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": present_name(0).replace(".0.", ".%d."),
                    "present_value_names": present_name(1).replace(".0.", ".%d."),
                },
                "session_options": {"log_id": "gptmeg", "provider_options": []},
            },
        },
        "search": {"max_length": config.n_positions, "do_sample": False, "num_beams": 1, "temperature": 1.0,
                   "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0},
    }


def write_genai_config(folder: Path, config, model_file: str) -> Path:
    path = Path(folder) / GENAI_CONFIG
    path.write_text(json.dumps(genai_config(config, model_file), indent=2) + "\n")
    return path
