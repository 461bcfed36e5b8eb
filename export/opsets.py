"""Which ONNX opsets an export may use. The torch exporter builds graphs at opset 18 and converts them up, never
down (asked for 17 it writes opset-18 nodes under an opset-17 header: an invalid model), and it cannot write an
opset newer than the installed onnx package defines. Imports onnx only (no torch), so the command line answers a
bad --opset at once."""

from __future__ import annotations

import onnx

from .errors import ExportError

__all__ = ["MIN_OPSET", "DEFAULT_OPSET", "OpsetError", "check_opset", "graph_opset", "max_opset"]

MIN_OPSET = 18  # the exporter's own opset; it cannot convert down (LayerNormalization itself needs 17)
DEFAULT_OPSET = 18


class OpsetError(ExportError):
    """An --opset the exporter cannot write, or one the fp32 islands do not allow."""


def max_opset() -> int:
    """The newest default-domain opset the installed onnx package defines (the exporter cannot write a newer one)."""
    return onnx.defs.onnx_opset_version()


def check_opset(opset: int) -> None:
    """An OpsetError unless ``opset`` is one the fp32 islands allow and the installed exporter can write."""
    if opset < MIN_OPSET:
        raise OpsetError(f"--opset {opset} is too old: torch's exporter writes opset {MIN_OPSET} and cannot convert "
                         f"down (the fp32 LayerNorm island also needs LayerNormalization, opset 17). Use --opset "
                         f"{MIN_OPSET} or newer.")
    if opset > max_opset():
        raise OpsetError(f"--opset {opset} is newer than onnx {onnx.__version__} knows (at most {max_opset()}). "
                         f"Choose {MIN_OPSET}..{max_opset()}, or upgrade onnx.")


def graph_opset(model: onnx.ModelProto) -> int | None:
    """The default-domain (ai.onnx) opset a graph declares."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
