"""GPTMeg -> ONNX: the decoder with KV cache, the fp16 precision plan and its checker, the export manifest."""

from .api import ContractBroken, ExportError, ExportResult, ValidationFailed, export_model
from .manifest import read_manifest
from .precision_plan import ContractReport, check_precision_plan, expected_sites

__all__ = [
    "ContractBroken",
    "ContractReport",
    "ExportError",
    "ExportResult",
    "ValidationFailed",
    "check_precision_plan",
    "expected_sites",
    "export_model",
    "read_manifest",
]
