"""``python -m validate graph FILE``: the fp16 precision-plan checker on any ONNX file.

The checker itself lives in :mod:`export.precision_plan` (it is the contract ``python -m export`` enforces on
its own output, and ``export`` must not import ``validate``); this module runs it standalone and reads the
expected site counts from a ``manifest.json`` next to the file when there is one.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from export.manifest import MANIFEST_NAME
from export.precision_plan import ContractReport, check_precision_plan, expected_sites_of

__all__ = ["check_graph_file", "GraphFileError"]


class GraphFileError(ValueError):
    pass


def check_graph_file(path: str | Path, config: dict | None = None) -> ContractReport:
    """The precision-plan report of an ONNX file. The expected site counts come from ``config`` (an export
    manifest's config) or from the manifest.json beside the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise GraphFileError(f"{path} does not exist. Pass an .onnx file or an export folder.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - onnx raises several types for a bad file
        raise GraphFileError(f"{path} is not a readable ONNX model ({error}).") from None
    if not model.graph.node:  # an empty or non-ONNX file parses as an empty ModelProto
        raise GraphFileError(f"{path} holds no ONNX graph (empty or not an ONNX file).")
    expected = None
    manifest = path.parent / MANIFEST_NAME
    if config is None and manifest.is_file():
        try:
            config = json.loads(manifest.read_text(encoding="utf-8")).get("config", {})
        except (OSError, ValueError, AttributeError) as error:
            raise GraphFileError(f"{manifest} beside the graph is damaged ({type(error).__name__}: {error}); fix or "
                                 "remove it, or pass the .onnx file from another folder.") from None
    if isinstance(config, dict) and isinstance(config.get("n_layer"), int):
        from gptmeg.configuration_gptmeg import normalize_megatron_numerics

        activation = config.get("activation_function", "gelu_fast")
        try:
            plan = normalize_megatron_numerics(config.get("megatron_numerics"), activation)
        except ValueError as error:
            raise GraphFileError(f"the config's megatron_numerics is not a numerics plan: {error}") from None
        expected = expected_sites_of({**config, "activation_function": activation, "megatron_numerics": plan})
    report = check_precision_plan(model, expected)
    report.path = str(path)
    return report
