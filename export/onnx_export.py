"""torch -> ONNX for the GPTMeg decoder with KV cache (``torch.onnx.export(dynamo=True)``)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from gptmeg import GPTMegLMHeadModel
from safeio.terminal import first_line

from .decoder import DecoderWithPast
from .errors import ExportError
from .io_names import input_names, output_names
from .opsets import DEFAULT_OPSET, MIN_OPSET, check_opset, graph_opset
from .tied_weights import count_large_initializers, refold_tied_transpose

__all__ = ["MIN_OPSET", "DEFAULT_OPSET", "MODEL_FILE", "ExportError", "export_decoder"]

MODEL_FILE = "model.onnx"


def _sample_inputs(model: GPTMegLMHeadModel, batch: int = 2, seq: int = 3, past: int = 4):
    """Inputs for tracing. Every dynamic size is >= 2 and distinct, or the exporter would specialise it."""
    config = model.config
    head_dim = config.n_embd // config.n_head
    input_ids = torch.zeros(batch, seq, dtype=torch.long)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.long)
    position_ids = torch.arange(past, past + seq, dtype=torch.long).expand(batch, seq).contiguous()
    past_kv = tuple(
        torch.zeros(batch, config.n_head, past, head_dim, dtype=model.dtype) for _ in range(2 * config.n_layer)
    )
    return (input_ids, attention_mask, position_ids, *past_kv)


def _dynamic_shapes(n_layer: int):
    batch, seq, total, past = Dim("batch"), Dim("sequence"), Dim("total_sequence"), Dim("past_sequence")
    # the attention mask gets a dim of its own (past + sequence is not expressible as an input Dim)
    kv = tuple({0: batch, 2: past} for _ in range(2 * n_layer))
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, kv)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs and warns a lot about things that do not concern the user (torchvision ops, deprecated
    internals); keep the terminal for our own progress. Errors still raise."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_decoder(
    model: GPTMegLMHeadModel, folder: Path, opset: int = DEFAULT_OPSET, external_data: bool | None = None
) -> Path:
    """Trace ``model`` (in its own dtype, on CPU) to ``folder/model.onnx``; returns the path.

    Weights go to ``model.onnx.data`` (ONNX external data) when ``external_data`` is True, and automatically when
    the model is over ONNX's 2 GB protobuf limit (``None``).
    """
    check_opset(opset)
    n_layer = model.config.n_layer
    wrapper = DecoderWithPast(model.eval()).eval()
    path = folder / MODEL_FILE
    with torch.no_grad(), _quiet_exporter():
        try:
            program = torch.onnx.export(
                wrapper,
                _sample_inputs(model),
                dynamo=True,
                input_names=input_names(n_layer),
                output_names=output_names(n_layer),
                dynamic_shapes=_dynamic_shapes(n_layer),
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
        except Exception as error:  # the exporter's own errors are long; keep the first line in ours
            first = first_line(error)
            raise ExportError(f"torch.onnx.export failed: {first}") from error
        program.save(str(path), external_data=external_data)
    try:
        onnx.checker.check_model(str(path))  # by path: works above 2 GB too
    except onnx.checker.ValidationError as error:
        first = first_line(error)
        raise ExportError(f"the exporter wrote an invalid ONNX graph at opset {opset} ({first}); try another "
                          "--opset.") from None
    structure = onnx.load(str(path), load_external_data=False)  # read once for the opset and the tied check
    written = graph_opset(structure)
    if written != opset:
        raise ExportError(f"asked for opset {opset}, but the exporter wrote opset {written}; choose --opset {written} "
                          "or another version it supports.")
    shape = (model.config.vocab_size, model.config.n_embd)
    if model.config.tie_word_embeddings and count_large_initializers(structure, shape) > 1:
        _store_tied_weight_once(path, shape, external_data)
    return path


def _store_tied_weight_once(path: Path, shape: tuple[int, int], external_data: bool | None) -> None:
    """Undo the optimizer's fold of ``Transpose(wte)`` into a second copy (small vocab x n_embd); see tied_weights."""
    model = onnx.load(str(path))  # with its data: the copies are compared element by element
    if refold_tied_transpose(model, shape):
        data = path.name + ".data"
        if external_data or (path.parent / data).exists():
            (path.parent / data).unlink(missing_ok=True)  # onnx appends to an existing data file; it is in memory
            onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data)
        else:
            onnx.save(model, str(path))
