"""onnxruntime sessions that really run where they were asked to (shared by the export check and the runtimes).

onnxruntime-gpu silently falls back to CPU when the CUDA libraries are missing; here that is an error (or, when the
caller allows it, an explicit warning), and every refusal says what to install or pass instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnxruntime as ort

__all__ = ["PROVIDERS", "OPTIMIZATION_LEVELS", "SessionError", "available_providers", "create_session"]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class SessionError(RuntimeError):
    """A session cannot be created as asked; the message says why and what to do."""


def available_providers() -> list[str]:
    """Our provider names (cpu, cuda) that this onnxruntime build offers."""
    offered = set(ort.get_available_providers())
    return [name for name, provider in PROVIDERS.items() if provider in offered]


def create_session(
    path: str | Path,
    provider: str = "cpu",
    *,
    threads: int | None = None,
    optimization: str = "all",
    allow_fallback: bool = False,
) -> tuple[ort.InferenceSession, str]:
    """(session, the provider name it really runs on) for the model at ``path``."""
    if provider not in PROVIDERS:
        raise SessionError(f"unknown provider {provider!r}: choose one of {', '.join(PROVIDERS)}.")
    if optimization not in OPTIMIZATION_LEVELS:
        raise SessionError(f"unknown optimization level {optimization!r}: choose one of "
                           f"{', '.join(OPTIMIZATION_LEVELS)}.")
    if threads is not None and threads < 1:
        raise SessionError(f"threads must be >= 1, got {threads}.")
    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        hint = " Install onnxruntime-gpu (pip install '.[cuda]') on a machine with CUDA, or use the cpu provider." \
            if provider == "cuda" else ""
        raise SessionError(f"onnxruntime {ort.__version__} here has no {wanted} (it offers "
                           f"{', '.join(ort.get_available_providers())}).{hint}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    providers = [wanted] + (["CPUExecutionProvider"] if provider == "cuda" else [])
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise SessionError(f"onnxruntime could not load {path}: {error}") from None
    active = session.get_providers()[0]
    if active != wanted:
        message = f"asked for {wanted} but onnxruntime runs on {active} (CUDA libraries missing or mismatched?)."
        if not allow_fallback:
            raise SessionError(message + " Fix the CUDA install or use the cpu provider.")
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return session, "cpu"
    return session, provider
