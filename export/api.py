"""``export_model``: checkpoint -> ONNX folder (model.onnx, config, tokenizer, manifest.json), checked and atomic."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from gptmeg import GPTMegLMHeadModel, load_config
from gptmeg.tiny import TINY_NAME, tiny_model, tiny_tokenizer

from .manifest import graph_io, package_versions, write_manifest
from .ort_session import SessionError, create_session
from .onnx_export import DEFAULT_OPSET, MODEL_FILE, ExportError, count_large_initializers, export_decoder
from .precision_plan import ContractReport, check_precision_plan, expected_sites
from .staging import staged_directory
from .verify import VerifyReport, verify_export

__all__ = ["DTYPES", "ExportResult", "ExportError", "ContractBroken", "ValidationFailed", "export_model",
           "default_output_dir", "load_model", "onnxruntime_runner"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
BUILTIN = None  # --model not given: the built-in tiny model


class ContractBroken(ExportError):
    def __init__(self, report: ContractReport):
        self.report = report
        lines = [f"  {s.kind} #{s.index} ({s.node}): {s.detail}" for s in report.violations]
        super().__init__("the exported graph breaks the fp16 precision plan:\n" + "\n".join(lines))


class ValidationFailed(ExportError):
    def __init__(self, report: VerifyReport):
        self.report = report
        super().__init__("onnxruntime does not match the eager model: " + "; ".join(report.failures))


@dataclass
class ExportResult:
    folder: Path
    manifest: Path
    contract: ContractReport
    verification: VerifyReport | None
    seconds: float


def default_output_dir(model_dir: str | None, dtype: str) -> Path:
    name = TINY_NAME if model_dir is None else Path(model_dir).resolve().name
    return Path("exports") / f"{name}-{dtype}"


def load_model(model_dir: str | None):
    """(model in fp32, tokenizer or None, source description) for a checkpoint folder or the built-in model."""
    if model_dir is None:
        return tiny_model(), tiny_tokenizer(), f"builtin:{TINY_NAME}"
    load_config(model_dir)  # clear CheckpointError for a missing folder / wrong model type
    try:
        model = GPTMegLMHeadModel.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        raise ExportError(f"could not load the model weights from {model_dir}: {error}") from error
    tokenizer = None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model.eval(), tokenizer, str(Path(model_dir).resolve())


def onnxruntime_runner(path: Path, provider: str = "cpu") -> Callable[[dict], dict]:
    """A callable feeds -> outputs over an onnxruntime session that really runs on ``provider``."""
    try:
        session, _ = create_session(path, provider)
    except SessionError as error:
        raise ExportError(str(error)) from None
    names = [o.name for o in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, feeds)))

    return run


def export_model(
    model_dir: str | None = BUILTIN,
    out: str | Path | None = None,
    *,
    dtype: str = "fp16",
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    validate: bool = True,
    device: str = "cpu",
    external_data: bool | None = None,
    step: Callable[[str], object] | None = None,
) -> ExportResult:
    """Export a GPTMeg/GPT-2 checkpoint folder (or the built-in model) to an ONNX folder.

    ``step(description)`` is called as each stage starts and may return a context manager (a progress spinner).
    Nothing is written to ``out`` unless every stage succeeds; an existing ``out`` is replaced only with ``force``.
    """
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    if device not in ("cpu", "cuda"):
        raise ExportError(f"unknown device {device!r}: choose cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda asked for, but torch sees no CUDA device. Use --device cpu.")
    stage = step or (lambda _description: nullcontext())
    out = Path(out) if out is not None else default_output_dir(model_dir, dtype)
    started = time.perf_counter()

    with staged_directory(out, overwrite=force) as staging:  # checks --force / writability before any work
        with stage("loading the model"):
            model, tokenizer, source = load_model(model_dir)
            model = model.to(DTYPES[dtype])
        config = model.config
        with stage(f"tracing to ONNX ({dtype}, opset {opset})"):
            onnx_path = export_decoder(model, staging, opset, external_data=external_data)
        graph = onnx.load(str(onnx_path), load_external_data=False)  # structure only: read once, used thrice
        tied = count_large_initializers(graph, (config.vocab_size, config.n_embd))
        if config.tie_word_embeddings and tied != 1:
            raise ExportError(f"the tied wte/lm_head matrix is stored {tied} times in the ONNX file (expected once).")
        with stage("checking the precision plan"):
            contract = check_precision_plan(graph, expected_sites(config.n_layer, config.activation_function))
            contract.path = MODEL_FILE  # relative to the export folder, not the staging folder
            if not contract.ok:
                raise ContractBroken(contract)
        config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        verification = None
        if validate:
            with stage(f"validating with onnxruntime ({device}) against eager {dtype}"):
                runner = onnxruntime_runner(onnx_path, device)
                verification = verify_export(model.to(device), runner, dtype=dtype, provider=device)
                if not verification.ok:
                    raise ValidationFailed(verification)
        io = graph_io(graph)
        manifest = write_manifest(
            staging,
            {
                "source": source,
                "dtype": dtype,
                "opset": opset,
                "model_file": MODEL_FILE,
                "has_tokenizer": tokenizer is not None,
                "config": config.to_dict(),
                "kv_cache": {
                    "n_layer": config.n_layer,
                    "n_head": config.n_head,
                    "head_dim": config.n_embd // config.n_head,
                    "layout": ["batch", "heads", "sequence", "head_dim"],
                    "max_sequence": config.n_positions,
                },
                **io,
                "precision_plan": contract.to_dict(),
                "validation": verification.to_dict() if verification else None,
                "versions": package_versions(),
            },
        )
        manifest_name = manifest.name
    return ExportResult(
        folder=out,
        manifest=out / manifest_name,
        contract=contract,
        verification=verification,
        seconds=time.perf_counter() - started,
    )
