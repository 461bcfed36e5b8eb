"""``export_model``: checkpoint -> ONNX folder (model.onnx, config, tokenizer, manifest.json), checked and atomic."""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from gptmeg import LoadReport, load_pretrained
from gptmeg.loading import has_tokenizer_files, load_tokenizer_files
from gptmeg.tiny import TINY_NAME, tiny_model, tiny_tokenizer

from .genai_config import write_genai_config
from .manifest import graph_io, is_export_folder, package_versions, write_manifest
from .ort_session import SessionError, available_providers, create_session
from .errors import ExportError
from .onnx_export import DEFAULT_OPSET, MODEL_FILE, export_decoder
from .opsets import check_opset, graph_opset
from .tied_weights import count_large_initializers
from .precision_plan import ContractReport, check_precision_plan, expected_sites_of
from safeio.staging import staged_directory
from safeio.terminal import first_line
from .verify import VerifyReport, verify_export

__all__ = ["DTYPES", "ExportResult", "ExportError", "ContractBroken", "ValidationFailed", "LoadedModel", "export_model",
           "default_output_dir", "load_model", "load_tokenizer", "onnxruntime_runner"]

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
    notes: list[str] = field(default_factory=list)  # things the user should know (no tokenizer, incomplete)


@dataclass
class LoadedModel:
    model: torch.nn.Module  # fp32, eval mode
    tokenizer: object | None  # a transformers tokenizer, or None when the checkpoint has no tokenizer files
    source: str  # "builtin:<name>" or the checkpoint's absolute path
    checkpoint: LoadReport | None = None  # what loading the weights found (None for the built-in model)
    notes: list[str] = field(default_factory=list)


def default_output_dir(model_dir: str | None, dtype: str) -> Path:
    name = TINY_NAME if model_dir is None else Path(model_dir).resolve().name
    return Path("exports") / f"{name}-{dtype}"


def load_tokenizer(model_dir: str | Path, vocab_size: int):
    """The checkpoint's tokenizer, or None when the folder has no tokenizer files (never a made-up one).

    Damaged tokenizer files are a CheckpointError; a tokenizer whose ids do not fit the model's vocabulary is an
    ExportError."""
    if not has_tokenizer_files(model_dir):
        return None
    tokenizer = load_tokenizer_files(model_dir)
    if len(tokenizer) > vocab_size:
        raise ExportError(
            f"the tokenizer in {model_dir} has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}: "
            "ids the model cannot embed would reach it. Put the checkpoint's own tokenizer files in the folder, or "
            "remove them to export without a tokenizer."
        )
    return tokenizer


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Save the tokenizer under a class every tool knows: GPTMeg's tokenizers encode exactly as GPT-2's, so
    ``tokenizer_config.json`` names ``GPT2TokenizerFast`` (onnxruntime-genai and optimum refuse unknown classes;
    ``AutoTokenizer`` on the export folder still returns an identical tokenizer)."""
    import json

    tokenizer.save_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    if type(tokenizer).__name__.startswith("GPTMeg") and config_file.is_file():
        settings = json.loads(config_file.read_text())
        settings["tokenizer_class"] = "GPT2TokenizerFast"
        config_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")


def load_model(model_dir: str | None, *, allow_incomplete: bool = False) -> LoadedModel:
    """The model in fp32, its tokenizer (or None) and where it came from, for a checkpoint folder or the built-in
    model. A checkpoint whose tensors do not cover the model is refused unless ``allow_incomplete``."""
    if model_dir is None:
        return LoadedModel(tiny_model(), tiny_tokenizer(), f"builtin:{TINY_NAME}")
    model, report = load_pretrained(model_dir, dtype=torch.float32, allow_incomplete=allow_incomplete)
    notes = []
    if not report.complete:
        notes.append(f"the checkpoint is incomplete and the export is NOT the checkpoint: {report.describe()} "
                     "(random values, accepted by --allow-incomplete-checkpoint).")
    tokenizer = load_tokenizer(model_dir, model.config.vocab_size)
    if tokenizer is None:
        notes.append(f"{model_dir} has no tokenizer files (tokenizer.json, or vocab.json + merges.txt): the export "
                     "has none. `python -m engines generate` then needs --prompt-ids, or --tokenizer DIR.")
    return LoadedModel(model, tokenizer, str(Path(model_dir).resolve()), report, notes)


def onnxruntime_runner(path: Path, provider: str = "cpu") -> Callable[[dict], dict]:
    """A callable feeds -> outputs over an onnxruntime session that really runs on ``provider``."""
    try:
        session, _ = create_session(path, provider)
    except SessionError as error:
        raise ExportError(str(error)) from None
    names = [o.name for o in session.get_outputs()]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return dict(zip(names, session.run(names, feeds)))
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            first = first_line(error)
            raise ExportError(f"onnxruntime could not run the exported graph: {first}") from None

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
    allow_incomplete: bool = False,
    step: Callable[[str], object] | None = None,
) -> ExportResult:
    """Export a GPTMeg/GPT-2 checkpoint folder (or the built-in model) to an ONNX folder.

    ``step(description)`` is called as each stage starts and may return a context manager (a progress spinner).
    Nothing is written to ``out`` unless every stage succeeds. An existing ``out`` is replaced only with ``force``,
    only when it is a previous export (or empty), and never when it is the current folder, one of its parents, or
    holds or is inside the checkpoint. A checkpoint whose tensors do not cover the model is refused unless
    ``allow_incomplete``.
    """
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    if device not in ("cpu", "cuda"):
        raise ExportError(f"unknown device {device!r}: choose cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda asked for, but torch sees no CUDA device. Use --device cpu.")
    if device == "cuda" and validate and "cuda" not in available_providers():  # before minutes of export work
        raise ExportError(
            "--device cuda validates with onnxruntime's CUDA provider, which this onnxruntime lacks (install "
            "onnxruntime-gpu: pip install '.[cuda]'). To compare onnxruntime on the CPU with eager CUDA fp16, export "
            "with --device cpu and run `python -m validate EXPORT_DIR --reference cuda-fp16`."
        )
    check_opset(opset)  # before any work (export_decoder checks it again for its direct callers)
    stage = step or (lambda _description: nullcontext())
    out = Path(out) if out is not None else default_output_dir(model_dir, dtype)
    protected = [Path(model_dir)] if model_dir is not None else []
    started = time.perf_counter()

    staging_context = staged_directory(out, overwrite=force, marker=is_export_folder, protected=protected)
    with staging_context as staging, _disk_errors(out):  # checks --force / writability before any work
        with stage("loading the model"):
            loaded = load_model(model_dir, allow_incomplete=allow_incomplete)
            model = loaded.model.to(DTYPES[dtype])
        config = model.config
        if dtype == "fp16" and getattr(config, "reorder_and_upcast_attn", False):
            raise ExportError(
                "the model's config sets reorder_and_upcast_attn (GPT-2's option: attention scores kept in fp32), "
                "which the fp16 precision plan does not carry: it rounds each score to fp16 once, as Megatron does. "
                "Export with --dtype fp32, or set reorder_and_upcast_attn to false in config.json."
            )
        with stage(f"tracing to ONNX ({dtype}, opset {opset})"):
            onnx_path = export_decoder(model, staging, opset, external_data=external_data)
        graph = onnx.load(str(onnx_path), load_external_data=False)  # structure only: read once, used thrice
        tied = count_large_initializers(graph, (config.vocab_size, config.n_embd))
        if config.tie_word_embeddings and tied != 1:
            raise ExportError(f"the tied wte/lm_head matrix is stored {tied} times in the ONNX file (expected once).")
        with stage("checking the precision plan"):
            contract = check_precision_plan(graph, expected_sites_of(config))
            contract.path = MODEL_FILE  # relative to the export folder, not the staging folder
            if not contract.ok:
                raise ContractBroken(contract)
        config.save_pretrained(staging)
        write_genai_config(staging, config, MODEL_FILE)  # onnxruntime-genai runs the folder as it is
        if loaded.tokenizer is not None:
            save_tokenizer(loaded.tokenizer, staging)
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
                "source": loaded.source,
                "dtype": dtype,
                "opset": graph_opset(graph),
                "model_file": MODEL_FILE,
                "has_tokenizer": loaded.tokenizer is not None,
                "checkpoint": loaded.checkpoint.to_dict() if loaded.checkpoint is not None else None,
                "config": config.to_dict(),
                "kv_cache": {
                    "n_layer": config.n_layer,
                    "n_head": config.n_head,
                    "head_dim": config.n_embd // config.n_head,
                    "layout": ["batch", "heads", "sequence", "head_dim"],
                    "max_sequence": config.n_positions,
                },
                **io,
                "numerics_plan": contract.plan,  # "gptmeg" or "megatron-exact" (config.megatron_numerics)
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
        notes=loaded.notes,
    )


@contextmanager
def _disk_errors(out: Path):
    """A file-system error while writing (disk full, name too long, permissions) as one ExportError naming it."""
    try:
        yield
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        raise ExportError(f"could not write the export for {out}: {error.strerror or error}{where}. Nothing was "
                          "written; free some space or choose another --out.") from error
