"""Building (or finding in the cache) the fp16 TensorRT engine of an export.

The network is strongly typed, so TensorRT computes each tensor in the type the ONNX gives it: the fp32
LayerNorm / GELU / attention-score islands survive because the graph's casts say so (TensorRT 11 has no other
mode; TensorRT 10 gets the STRONGLY_TYPED flag). The build uses TensorRT's API directly: Polygraphy's loaders would
fit, but the GPU environments this must run in do not have Polygraphy.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..artifacts import ExportArtifact
from ..errors import EngineError
from .cache import ENGINE_NAME, EngineMetadata, GpuInfo, check_compatible, engine_cache_key
from .environment import current_gpu, load_tensorrt
from .options import BuildOptions
from .profiles import decoder_profiles

__all__ = ["BuildResult", "engine_root", "engine_folder", "timing_cache_path", "build_engine", "find_engine"]


@dataclass
class BuildResult:
    folder: Path
    metadata: EngineMetadata
    cache_hit: bool
    seconds: float

    @property
    def engine_path(self) -> Path:
        return self.folder / ENGINE_NAME


def engine_root(artifact: ExportArtifact, out: Path | None = None) -> Path:
    return Path(out) if out is not None else artifact.folder / "tensorrt"


def engine_folder(root: Path, key: str) -> Path:
    return root / key[:16]


def timing_cache_path(root: Path, gpu: GpuInfo) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in gpu.name).strip("-").lower()
    return root / f"timing-{slug}-sm{gpu.compute_capability.replace('.', '')}-trt{gpu.tensorrt}.cache"


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _onnx_sha256(artifact: ExportArtifact) -> str:
    return artifact.manifest["files"][artifact.model_path.name]["sha256"]


def find_engine(artifact: ExportArtifact, options: BuildOptions, out: Path | None = None) -> BuildResult | None:
    """The cached engine for this export, GPU, TensorRT version and options, or None."""
    trt = load_tensorrt()
    gpu = current_gpu(trt)
    options = options.resolved(artifact.spec)
    key = engine_cache_key(_onnx_sha256(artifact), gpu, options)
    folder = engine_folder(engine_root(artifact, out), key)
    if not (folder / ENGINE_NAME).is_file():
        return None
    metadata = EngineMetadata.load(folder)
    check_compatible(metadata, gpu, _onnx_sha256(artifact))
    return BuildResult(folder, metadata, cache_hit=True, seconds=0.0)


def build_engine(artifact: ExportArtifact, options: BuildOptions = BuildOptions(), *, out: Path | None = None,
                 use_timing_cache: bool = True, force: bool = False) -> BuildResult:
    """Build the engine, or return the cached one (same key) unless ``force``."""
    started = time.perf_counter()
    trt = load_tensorrt()
    gpu = current_gpu(trt)
    if artifact.dtype != "fp16":
        raise EngineError(f"TensorRT engines are built from fp16 exports; this export is {artifact.dtype}. "
                          "Export with --dtype fp16.")
    options = options.resolved(artifact.spec)
    onnx_sha = _onnx_sha256(artifact)
    key = engine_cache_key(onnx_sha, gpu, options)
    root = engine_root(artifact, out)
    folder = engine_folder(root, key)
    if not force and (folder / ENGINE_NAME).is_file():
        metadata = EngineMetadata.load(folder)
        check_compatible(metadata, gpu, onnx_sha)
        return BuildResult(folder, metadata, cache_hit=True, seconds=time.perf_counter() - started)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))  # TensorRT 11: always strongly typed
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(artifact.model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {artifact.model_path}: {errors}")
    config = builder.create_builder_config()
    if options.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    profiles = decoder_profiles(artifact.spec, options)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    root.mkdir(parents=True, exist_ok=True)
    timing_path = timing_cache_path(root, gpu)
    if use_timing_cache:
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError("TensorRT failed to build the engine (its log above says why).")
    if use_timing_cache:
        _atomic_write(timing_path, bytes(config.get_timing_cache().serialize()))

    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / ENGINE_NAME, bytes(serialized))
    metadata = EngineMetadata(key=key, onnx_sha256=onnx_sha, gpu=gpu.name, compute_capability=gpu.compute_capability,
                              tensorrt=gpu.tensorrt, options=options.to_dict(),
                              profiles=[{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
                              build_seconds=time.perf_counter() - started)
    metadata.save(folder)
    return BuildResult(folder, metadata, cache_hit=False, seconds=metadata.build_seconds)
