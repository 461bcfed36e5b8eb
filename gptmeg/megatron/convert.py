"""Megatron checkpoint -> GPTMeg: in memory (:func:`convert`), as a checkpoint folder (:func:`save_conversion`), or
straight to a model (:func:`load_megatron_model`, what ``python -m export --model MEGATRON_DIR`` uses)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from safeio.digest import sha256_file

from ..configuration_gptmeg import GPTMegConfig
from ..loading import has_tokenizer_files, load_tokenizer_files
from .errors import MegatronCheckpointError
from .hparams import NUMERICS_CHOICES, activation_of, megatron_exact_plan, model_shape, numerics_flags
from .layouts import find_source, open_reader
from .merge import QKV_LAYOUTS, Merger, qkv_layout_for_version
from .stream_writer import SafetensorsStreamWriter

__all__ = ["CONVERSION_FILE", "CONVERSION_FORMAT", "Conversion", "convert", "is_conversion_folder",
           "load_megatron_model", "save_conversion"]

CONVERSION_FILE = "conversion.json"
CONVERSION_FORMAT = "gptmeg-megatron-conversion/1"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_GPT2_BPE_SIZE, _GPT2_EOS = 50257, 50256


class Conversion:
    """A Megatron checkpoint read as GPTMeg: ``config`` and ``record`` at once, the tensors merged block by block as
    :meth:`tensors` is iterated (or all together through :attr:`state_dict`). The record's drift entries and source
    hashes are complete once the tensors have been produced."""

    def __init__(self, config: GPTMegConfig, record: dict, tokenizer, produce):
        self.config, self.record, self.tokenizer = config, record, tokenizer
        self._produce = produce  # a generator function: yields (GPTMeg name, tensor), then completes the record
        self._state: dict[str, torch.Tensor] | None = None
        self._consumed = False

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every GPTMeg tensor (lm_head omitted: tied to transformer.wte.weight) once, in merge order."""
        if self._state is not None:
            yield from self._state.items()
            return
        if self._consumed:
            raise RuntimeError("the tensors of this conversion were already produced; keep the state_dict instead")
        self._consumed = True
        yield from self._produce()

    @property
    def notes(self) -> list[str]:
        """What the user should know: the checkpoint's own notes (drift, positions), then the Megatron numerics
        GPTMeg does not reproduce."""
        return self.record["notes"] + self.record["numerics_not_reproduced"]

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            self._state = dict(self.tensors())
        return self._state

    def tensor_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Name -> (dtype, shape) of every tensor :meth:`tensors` yields, known before any block is merged."""
        from ..modeling_gptmeg import GPTMegLMHeadModel

        with torch.device("meta"):
            model = GPTMegLMHeadModel(self.config)
        dtype = _DTYPES[self.record["dtype"]]
        return {k: (dtype, tuple(v.shape)) for k, v in model.state_dict().items() if k != "lm_head.weight"}


def _find_tokenizer(src: Path, tokenizer_dir: str | os.PathLike | None):
    if tokenizer_dir is not None:
        if not has_tokenizer_files(tokenizer_dir):
            raise MegatronCheckpointError(f"--tokenizer {tokenizer_dir} has no tokenizer.json nor vocab.json + "
                                          "merges.txt.")
        return load_tokenizer_files(tokenizer_dir)
    return load_tokenizer_files(src) if has_tokenizer_files(src) else None


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
    lazy: bool = False,
    numerics: str = "gptmeg",
) -> Conversion:
    """Read a Megatron-LM / Megatron-DeepSpeed checkpoint and build the GPTMeg config and state dict.

    ``qkv_layout`` overrides what ``checkpoint_version`` says about the QKV row order ("blocks" for checkpoints
    written by Megatron-DeepSpeed after its 2024-12 FPDT change, which kept version 3.0); ``tp_replicated`` picks
    rank 0's copy of replicated tensors ("first") or their mean ("average"); ``trim_vocab`` drops the rows Megatron
    padded the vocabulary with. ``progress(text)`` is called as each stage starts. With ``lazy`` the blocks are
    merged only as :meth:`Conversion.tensors` is iterated (what the folder writer does, to hold one block at a
    time); otherwise everything is merged before returning. ``numerics="megatron-exact"`` sets the config's
    ``megatron_numerics`` plan from the checkpoint's recorded flags (see hparams.megatron_exact_plan); the default
    "gptmeg" keeps GPTMeg's three divergences only.
    """
    if numerics not in NUMERICS_CHOICES:
        raise MegatronCheckpointError(f"unknown --numerics {numerics!r}: choose {' or '.join(NUMERICS_CHOICES)}.")
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

    # the embedding and block 0 first: their shapes settle the config (v1.0 args lack the MLP width)
    first = merger.embedding(reader.embedding())
    first_block = merger.block(0, reader.layer(0))
    notes = []
    state = first
    wte = state["transformer.wte.weight"]
    rows, width = wte.shape
    if width != shape.hidden_size:
        raise MegatronCheckpointError(f"the word embedding is {width} wide but hidden_size is {shape.hidden_size}.")
    positions = state["transformer.wpe.weight"].shape[0]
    if shape.max_positions and positions != shape.max_positions:
        notes.append(f"args say {shape.max_positions} positions but the embedding has {positions} rows; using "
                     f"{positions}.")
    ffn = first_block["transformer.h.0.mlp.c_fc.weight"].shape[1]  # the tensors, not args (v1.0 lack it)
    if ffn != shape.ffn_hidden_size:
        notes.append(f"args imply an MLP width of {shape.ffn_hidden_size} but the tensors have {ffn}; using {ffn}.")
    tokenizer = _find_tokenizer(src, tokenizer_dir)
    original, original_from = _original_vocab(reader, args, rows, tokenizer)
    if tokenizer is not None and len(tokenizer) > rows:
        raise MegatronCheckpointError(f"the tokenizer has {len(tokenizer)} tokens but the embedding only {rows} rows: "
                                      "it does not belong to this model.")
    if tokenizer is not None and original is not None and len(tokenizer) != original:
        notes.append(f"the tokenizer has {len(tokenizer)} tokens, the checkpoint records {original} ({original_from})"
                     "; generation stops at the checkpoint's size.")
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
    flags, numerics_notes = numerics_flags(args, reader.pipe_model, shape.tp, numerics)
    plan = megatron_exact_plan(flags) if numerics == "megatron-exact" else None
    if plan is not None and activation_of(args) != "gelu_fast":
        plan["bias_gelu_fusion"] = False  # no fused GELU in this run (bias_gelu_fusion off)

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
        megatron_numerics=plan,
    )
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
        "dtype": str(wte.dtype).removeprefix("torch.") if dtype is None else shape.dtype,
        "activation_function": config.activation_function,
        "numerics": flags,
        "numerics_plan": numerics,
        "megatron_numerics": plan,
        "numerics_not_reproduced": numerics_notes,
        "replicated_drift": merger.drift,
        "notes": notes,
        "files": {},
    }

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        yield from state.items()
        yield from first_block.items()
        first_block.clear()
        for index in range(1, shape.num_layers):
            step(f"merging block {index + 1}/{shape.num_layers}")
            yield from merger.block(index, reader.layer(index)).items()  # the reader lets go of the block's shards
        yield from merger.final_norm(reader.final_norm()).items()
        head = reader.head()
        if head is not None:  # the last stage's tied copy: compared shard by shard, in row chunks (no full copy)
            shards = head["word_embeddings.weight"]
            if sum(s.shape[0] for s in shards) != rows or any(s.shape[1] != width for s in shards):
                raise MegatronCheckpointError("the last stage's word_embeddings_for_head does not have the shape of "
                                              "the word embedding.")
            delta, start = 0.0, 0
            for shard in shards:
                for chunk in shard.split(4096):
                    stop = min(start + chunk.shape[0], kept_rows)
                    if stop > start:
                        delta = max(delta, float((chunk[: stop - start].float() - wte[start:stop].float()).abs().max()))
                    start += chunk.shape[0]
            if delta > 0:
                merger.drift["word_embeddings_for_head"] = delta
        if merger.drift:
            worst = max(merger.drift, key=merger.drift.get)
            notes.append(f"replicated tensors differ across TP ranks in {len(merger.drift)} place(s) (worst: {worst}, "
                         f"max |delta| {merger.drift[worst]:.3g}); used "
                         f"{'rank 0' if tp_replicated == 'first' else 'the mean'}.")
        step("hashing the source files")
        root = src.resolve()
        record["files"] = {str(p.resolve().relative_to(root)) if p.resolve().is_relative_to(root) else str(p.resolve()):
                           sha256_file(p) for p in dict.fromkeys(reader.files)}

    conversion = Conversion(config, record, tokenizer, produce)
    if not lazy:
        conversion.state_dict  # noqa: B018 - merge everything now, so the record is complete on return
    return conversion


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
    from safeio.staging import staged_directory

    out = Path(out)
    with staged_directory(out, overwrite=force, marker=is_conversion_folder, protected=protected,
                          what="a conversion", option="OUT") as staging:
        conversion.config.save_pretrained(staging)
        _generation_config(conversion.config).save_pretrained(staging)
        with SafetensorsStreamWriter(staging / "model.safetensors", conversion.tensor_specs()) as writer:
            for name, tensor in conversion.tensors():
                writer.write(name, tensor)
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
