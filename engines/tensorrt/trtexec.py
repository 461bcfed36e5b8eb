"""The ``trtexec`` command line equivalent to ``python -m engines build``, for NVIDIA's containers."""

from __future__ import annotations

import shlex
from pathlib import Path

from ..artifacts import ExportArtifact
from .options import BuildOptions
from .profiles import decoder_profiles

__all__ = ["trtexec_command"]


def _spec(shapes: dict, which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims[which])}" for name, dims in shapes.items())


def trtexec_command(artifact: ExportArtifact, options: BuildOptions, engine_path: Path,
                    timing_cache: Path | None) -> list[str]:
    """argv for trtexec: strongly typed build of model.onnx with the prefill and decode profiles (one
    --minShapes/--optShapes/--maxShapes triplet per profile, in profile order)."""
    options = options.resolved(artifact.spec)
    argv = ["trtexec", f"--onnx={artifact.model_path}", f"--saveEngine={engine_path}", "--stronglyTyped",
            "--skipInference"]
    for profile in decoder_profiles(artifact.spec, options):
        argv += [f"--minShapes={_spec(profile, 0)}", f"--optShapes={_spec(profile, 1)}",
                 f"--maxShapes={_spec(profile, 2)}"]
    if timing_cache is not None:
        argv.append(f"--timingCacheFile={timing_cache}")
    if options.workspace_mib is not None:
        argv.append(f"--memPoolSize=workspace:{options.workspace_mib}")
    return argv


def format_command(argv: list[str]) -> str:
    return " \\\n    ".join(shlex.quote(a) for a in argv)
