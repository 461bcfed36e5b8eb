"""Megatron checkpoint -> GPTMeg: in memory (:func:`convert`), as a checkpoint folder (:func:`save_conversion`), or
straight to a model (:func:`load_megatron_model`, what ``python -m export --model MEGATRON_DIR`` uses)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..configuration_gptmeg import GPTMegConfig
from .errors import MegatronCheckpointError
from .hparams import activation_of, model_shape, numerics_flags
from .layouts import find_source, open_reader
from .merge import QKV_LAYOUTS, Merger, qkv_layout_for_version

__all__ = ["CONVERSION_FILE", "CONVERSION_FORMAT", "Conversion", "convert", "is_conversion_folder",
           "load_megatron_model", "save_conversion"]

CONVERSION_FILE = "conversion.json"
CONVERSION_FORMAT = "gptmeg-megatron-conversion/1"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_GPT2_BPE_SIZE, _GPT2_EOS = 50257, 50256
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


@dataclass
class Conversion:
    config: GPTMegConfig
    state_dict: dict[str, torch.Tensor]  # GPTMeg names, lm_head omitted (tied to transformer.wte.weight)
    record: dict  # what conversion.json holds
    tokenizer: object | None = None
    notes: list[str] = field(default_factory=list)  # what the user should know (numerics not reproduced, drift)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    from ..loading import quiet_transformers

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(folder))
    except Exception as error:  # noqa: BLE001 - tokenizer loaders raise many types for damaged files
        raise MegatronCheckpointError(f"the tokenizer in {folder} cannot be loaded ({type(error).__name__}: "
                                      f"{error}).") from None


def _find_tokenizer(src: Path, tokenizer_dir: str | os.PathLike | None):
    if tokenizer_dir is not None:
        folder = Path(tokenizer_dir)
        if not any(all((folder / n).is_file() for n in group) for group in _TOKENIZER_FILES):
            raise MegatronCheckpointError(f"--tokenizer {folder} has no tokenizer.json nor vocab.json + merges.txt.")
        return _load_tokenizer(folder)
    if any(all((src / n).is_file() for n in group) for group in _TOKENIZER_FILES):
        return _load_tokenizer(src)
    return None


def _original_vocab(reader, args, rows: int, tokenizer) -> tuple[int | None, str]:
    for key in ("checkpoint_info", "universal_checkpoint_info"):
        info = reader.meta.get(key) or {}
        if isinstance(info, dict) and info.get("original_vocab_size"):
            return int(info["original_vocab_size"]), key
    if tokenizer is not None:
        return len(tokenizer), "tokenizer"
    if getattr(args, "tokenizer_type", None) == "GPT2BPETokenizer" and rows >= _GPT2_BPE_SIZE:
        return _GPT2_BPE_SIZE, "GPT2BPETokenizer"
    return None, "unknown"


def convert(
    src: str | os.PathLike,
    *,
    iteration: int | str | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    trim_vocab: bool = False,
    qkv_layout: str = "auto",
    tp_replicated: str = "first",
    progress=None,
) -> Conversion:
    """Read a Megatron-LM / Megatron-DeepSpeed checkpoint and build the GPTMeg config and state dict.

    ``qkv_layout`` overrides what ``checkpoint_version`` says about the QKV row order ("blocks" for checkpoints
    written by Megatron-DeepSpeed after its 2024-12 FPDT change, which kept version 3.0); ``tp_replicated`` picks
    rank 0's copy of replicated tensors ("first") or their mean ("average"); ``trim_vocab`` drops the rows Megatron
    padded the vocabulary with. ``progress(text)`` is called as each stage starts.
    """
    if qkv_layout not in QKV_LAYOUTS:
        raise MegatronCheckpointError(f"unknown --qkv-layout {qkv_layout!r}: choose one of {', '.join(QKV_LAYOUTS)}.")
    if tp_replicated not in ("first", "average"):
        raise MegatronCheckpointError(f"unknown --tp-replicated {tp_replicated!r}: choose first or average.")
    step = progress or (lambda _text: None)
    src = Path(src)
    source = find_source(src, iteration)
    step(f"reading the {source.kind} checkpoint in {source.folder}")
    reader = open_reader(source)
    args = reader.args
    shape = model_shape(args)
    layout = qkv_layout if qkv_layout != "auto" else qkv_layout_for_version(reader.checkpoint_version)
    # universal checkpoints hold fp32 masters; the model's weights are those rounded to the training dtype
    dtype = _DTYPES[shape.dtype] if source.kind == "universal" else None
    merger = Merger(shape.num_heads, layout, tp_replicated, dtype=dtype)

    state = merger.embedding(reader.embedding())
    for index in range(shape.num_layers):
        step(f"merging block {index + 1}/{shape.num_layers}")
        state.update(merger.block(index, reader.layer(index)))
    state.update(merger.final_norm(reader.final_norm()))

    notes = []
    head = reader.head()
    if head is not None:
        copy = torch.cat(head["word_embeddings.weight"], dim=0)
        if copy.shape == state["transformer.wte.weight"].shape:
            delta = float((copy.float() - state["transformer.wte.weight"].float()).abs().max())
            if delta > 0:
                merger.drift["word_embeddings_for_head"] = delta
        else:
            raise MegatronCheckpointError(f"the last stage's word_embeddings_for_head has shape {tuple(copy.shape)}, "
                                          f"the embedding {tuple(state['transformer.wte.weight'].shape)}.")

    wte = state["transformer.wte.weight"]
    rows, width = wte.shape
    if width != shape.hidden_size:
        raise MegatronCheckpointError(f"the word embedding is {width} wide but hidden_size is {shape.hidden_size}.")
    positions = state["transformer.wpe.weight"].shape[0]
    if shape.max_positions and positions != shape.max_positions:
        notes.append(f"args say {shape.max_positions} positions but the embedding has {positions} rows; using "
                     f"{positions}.")
    ffn = state["transformer.h.0.mlp.c_fc.weight"].shape[1]  # the tensors, not args (v1.0 args have no ffn size)
    if ffn != shape.ffn_hidden_size:
        notes.append(f"args imply an MLP width of {shape.ffn_hidden_size} but the tensors have {ffn}; using {ffn}.")
    tokenizer = _find_tokenizer(src, tokenizer_dir)
    original, original_from = _original_vocab(reader, args, rows, tokenizer)
    if original is not None and original > rows:
        raise MegatronCheckpointError(f"the vocabulary has {original} tokens ({original_from}) but the embedding only "
                                      f"{rows} rows: the tokenizer does not belong to this model.")
    if trim_vocab:
        if original is None:
            raise MegatronCheckpointError("--trim-vocab needs the original vocabulary size, which this checkpoint does "
                                          "not record: pass --tokenizer DIR.")
        wte = wte[:original].clone()
        state["transformer.wte.weight"] = wte
    kept_rows = wte.shape[0]
    flags, numerics_notes = numerics_flags(args, reader.pipe_model, shape.tp)
    if merger.drift:
        worst = max(merger.drift, key=merger.drift.get)
        notes.append(f"replicated tensors differ across TP ranks in {len(merger.drift)} place(s) (worst: {worst}, max "
                     f"|delta| {merger.drift[worst]:.3g}); used {'rank 0' if tp_replicated == 'first' else 'the mean'}.")

    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is None and getattr(args, "tokenizer_type", None) == "GPT2BPETokenizer" and _GPT2_EOS < kept_rows:
        eos = _GPT2_EOS
    megatron = {
        **flags,
        "padded_vocab_size": rows,
        "original_vocab_size": original,
        "layout": source.kind,
        "checkpoint_version": reader.checkpoint_version,
    }
    config = GPTMegConfig(
        vocab_size=kept_rows,
        n_positions=positions,
        n_embd=shape.hidden_size,
        n_layer=shape.num_layers,
        n_head=shape.num_heads,
        n_inner=ffn,
        activation_function=activation_of(args),
        layer_norm_epsilon=shape.layernorm_epsilon,
        resid_pdrop=shape.hidden_dropout,
        embd_pdrop=shape.hidden_dropout,
        attn_pdrop=shape.attention_dropout,
        scale_attn_by_inverse_layer_idx=False,  # Megatron's layer scaling multiplies back; GPT-2's flag does not
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
        dtype=shape.dtype,
        megatron=megatron,
    )
    step("hashing the source files")
    record = {
        "format": CONVERSION_FORMAT,
        "source": str(src.resolve()),
        "layout": source.kind,
        "folder": str(source.folder.resolve()),
        "iteration": str(source.iteration),
        "checkpoint_version": reader.checkpoint_version,
        "tensor_parallel": shape.tp,
        "pipeline_parallel": shape.pp,
        "virtual_pipeline": shape.vpp,
        "qkv_layout": layout,
        "tp_replicated": tp_replicated,
        "padded_vocab_size": rows,
        "original_vocab_size": original,
        "original_vocab_size_from": original_from,
        "vocab_rows_kept": kept_rows,
        "dtype": shape.dtype,
        "activation_function": config.activation_function,
        "numerics": flags,
        "numerics_not_reproduced": numerics_notes,
        "replicated_drift": merger.drift,
        "notes": notes,
        "files": {str(p.resolve().relative_to(src.resolve())) if p.resolve().is_relative_to(src.resolve())
                  else str(p.resolve()): _sha256(p) for p in dict.fromkeys(reader.files)},
    }
    return Conversion(config, state, record, tokenizer, notes + numerics_notes)


def _suppressed(config: GPTMegConfig) -> list[int]:
    original = (getattr(config, "megatron", None) or {}).get("original_vocab_size")
    return list(range(original, config.vocab_size)) if original and original < config.vocab_size else []


def _generation_config(config: GPTMegConfig):
    from transformers import GenerationConfig

    generation = GenerationConfig.from_model_config(config)
    padding = _suppressed(config)
    if padding:  # the padded rows are never a token: generate() must not emit them
        generation.suppress_tokens = padding
    return generation


def is_conversion_folder(folder: str | os.PathLike) -> bool:
    """True for a folder :func:`save_conversion` wrote (what ``--force`` may replace)."""
    try:
        record = json.loads((Path(folder) / CONVERSION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("format") == CONVERSION_FORMAT


def save_conversion(conversion: Conversion, out: str | os.PathLike, *, force: bool = False,
                    protected=()) -> Path:
    """Write a GPTMeg checkpoint folder atomically: model.safetensors, config.json, generation_config.json, the
    tokenizer when there is one, conversion.json. ``force`` replaces only an earlier conversion."""
    from safetensors.torch import save_file

    from safeio.staging import staged_directory

    out = Path(out)
    with staged_directory(out, overwrite=force, marker=is_conversion_folder, protected=protected,
                          what="a conversion") as staging:
        conversion.config.save_pretrained(staging)
        _generation_config(conversion.config).save_pretrained(staging)
        save_file({k: v.contiguous() for k, v in conversion.state_dict.items()}, str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        if conversion.tokenizer is not None:
            conversion.tokenizer.save_pretrained(staging)
        (staging / CONVERSION_FILE).write_text(json.dumps(conversion.record, indent=2) + "\n")
    return out


def load_megatron_model(src: str | os.PathLike, *, dtype: torch.dtype = torch.float32, **options):
    """(GPTMegLMHeadModel in eval mode, Conversion): a Megatron checkpoint as a model, without a folder in between."""
    from ..modeling_gptmeg import GPTMegLMHeadModel

    conversion = convert(src, **options)
    with torch.device("meta"):
        model = GPTMegLMHeadModel(conversion.config)
    state = {k: v.to(dtype) for k, v in conversion.state_dict.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.generation_config = _generation_config(conversion.config)
    return model.eval(), conversion
