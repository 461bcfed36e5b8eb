"""Names of the exported decoder's inputs and outputs (the ones transformers/optimum users know).

Kept free of torch so the runtimes can share the naming scheme with the exporter without importing the model.
"""

from __future__ import annotations

__all__ = ["past_name", "present_name", "past_names", "present_names", "input_names", "output_names"]


def past_name(flat_index: int) -> str:
    """Name of the ``flat_index``-th past tensor: 0 -> past_key_values.0.key, 1 -> past_key_values.0.value, ..."""
    return f"past_key_values.{flat_index // 2}.{('key', 'value')[flat_index % 2]}"


def present_name(flat_index: int) -> str:
    return f"present.{flat_index // 2}.{('key', 'value')[flat_index % 2]}"


def past_names(n_layer: int) -> list[str]:
    return [past_name(i) for i in range(2 * n_layer)]


def present_names(n_layer: int) -> list[str]:
    return [present_name(i) for i in range(2 * n_layer)]


def input_names(n_layer: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids", *past_names(n_layer)]


def output_names(n_layer: int) -> list[str]:
    return ["logits", *present_names(n_layer)]
