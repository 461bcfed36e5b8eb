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
from export.precision_plan import ContractReport, check_precision_plan, expected_sites

__all__ = ["check_graph_file", "GraphFileError"]


class GraphFileError(ValueError):
    pass


def check_graph_file(path: str | Path) -> ContractReport:
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.is_file():
        raise GraphFileError(f"{path} does not exist. Pass an .onnx file or an export folder.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - onnx raises several types for a bad file
        raise GraphFileError(f"{path} is not a readable ONNX model ({error}).") from None
    expected = None
    manifest = path.parent / MANIFEST_NAME
    if manifest.is_file():
        config = json.loads(manifest.read_text()).get("config", {})
        if "n_layer" in config:
            expected = expected_sites(config["n_layer"], config.get("activation_function", "gelu_fast"))
    report = check_precision_plan(model, expected)
    report.path = str(path)
    return report
