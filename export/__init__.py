"""GPTMeg -> ONNX: the decoder with KV cache, the fp16 precision plan and its checker, the export manifest.

Attributes are imported lazily, so ``import export.manifest`` (used by the runtimes) does not load torch.
"""

from importlib import import_module

_PUBLIC = {
    "ContractBroken": "export.api",
    "ExportError": "export.errors",
    "ExportResult": "export.api",
    "ValidationFailed": "export.api",
    "export_model": "export.api",
    "read_manifest": "export.manifest",
    "ContractReport": "export.precision_plan",
    "check_precision_plan": "export.precision_plan",
    "expected_sites": "export.precision_plan",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
