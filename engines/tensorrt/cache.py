"""The engine cache: a key per (model, GPU, TensorRT version, build options), and metadata saved beside each engine
so that an engine built for another GPU or TensorRT version is refused with a message saying what to rebuild."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import EngineError
from .options import BuildOptions

__all__ = ["GpuInfo", "EngineMetadata", "engine_cache_key", "check_compatible", "METADATA_NAME", "ENGINE_NAME"]

KEY_FORMAT = 1
ENGINE_NAME = "engine.plan"
METADATA_NAME = "engine.json"


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.6"
    tensorrt: str  # TensorRT version


def engine_cache_key(onnx_sha256: str, gpu: GpuInfo, options: BuildOptions) -> str:
    """sha256 of everything that makes an engine valid: same key, same engine."""
    material = {"format": KEY_FORMAT, "onnx_sha256": onnx_sha256, "gpu": gpu.name,
                "compute_capability": gpu.compute_capability, "tensorrt": gpu.tensorrt, "options": options.to_dict()}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


@dataclass
class EngineMetadata:
    key: str
    onnx_sha256: str
    gpu: str
    compute_capability: str
    tensorrt: str
    options: dict
    profiles: list
    build_seconds: float
    built: str = ""

    def save(self, folder: Path) -> Path:
        if not self.built:
            self.built = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        path = folder / METADATA_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> "EngineMetadata":
        path = folder / METADATA_NAME
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise EngineError(f"{path} is missing: the engine has no metadata. Rebuild it with "
                              "`python -m engines build EXPORT_DIR`.") from None
        except (json.JSONDecodeError, TypeError) as error:
            raise EngineError(f"{path} is unreadable ({error}). Rebuild the engine with "
                              "`python -m engines build EXPORT_DIR --force`.") from None


def check_compatible(metadata: EngineMetadata, gpu: GpuInfo, onnx_sha256: str) -> None:
    """Refuse an engine that was built for another GPU, another TensorRT or another model.onnx."""
    rebuild = "Rebuild it here with `python -m engines build EXPORT_DIR`."
    if metadata.onnx_sha256 != onnx_sha256:
        raise EngineError(f"the engine was built from a different model.onnx (sha256 {metadata.onnx_sha256[:12]}… "
                          f"vs {onnx_sha256[:12]}…). {rebuild}")
    if (metadata.gpu, metadata.compute_capability) != (gpu.name, gpu.compute_capability):
        raise EngineError(f"the engine was built for {metadata.gpu} (compute capability "
                          f"{metadata.compute_capability}) but this GPU is {gpu.name} (compute capability "
                          f"{gpu.compute_capability}). {rebuild}")
    if metadata.tensorrt != gpu.tensorrt:
        raise EngineError(f"the engine was built with TensorRT {metadata.tensorrt} but TensorRT {gpu.tensorrt} is "
                          f"installed. {rebuild}")
