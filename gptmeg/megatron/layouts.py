"""Finding and reading the shards of a Megatron checkpoint, whatever its on-disk layout.

Every reader presents the same view, in Megatron's own tensor names, *before* any tensor-parallel merge:

- ``embedding()``: ``{"word_embeddings.weight": [rank0, rank1, ...], "position_embeddings.weight": [...]}``
- ``layer(i)`` for the global block index ``i``: ``{"input_layernorm.weight": [...], "self_attention.
  query_key_value.weight": [...], ...}`` (always the ``self_attention.`` spelling)
- ``final_norm()``: ``{"weight": [...], "bias": [...]}``; ``head()``: the last stage's tied copy, or None

A list holds one tensor per tensor-parallel rank, or a single already-merged tensor (universal checkpoints).
Layouts (see shared/research/megatron-checkpoints.md §1): Megatron-LM legacy ``mp_rank_XX[_YYY]/model_optim_rng.pt``,
Megatron-DeepSpeed pipeline ``layer_XX-model_YY-model_states.pt`` (layer files classified by their keys, never by
their numbers), non-pipeline DeepSpeed ``mp_rank_XX_model_states.pt`` with ``module``, DeepSpeed universal
``zero/<name>/fp32.pt``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import MegatronCheckpointError
from .unpickle import load_pt

__all__ = ["Source", "find_source", "is_megatron_checkpoint", "open_reader"]

Shards = dict  # Megatron key -> list of tensors (one per TP rank, or one merged tensor)

_LM_RANK = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_LM_FILES = ("model_optim_rng.pt", "model_rng.pt")
_DS_LAYER = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
_DS_RANK = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_ZERO3 = re.compile(r"^zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")
_BLOCK_KEYS = ("input_layernorm.weight", "input_layernorm.bias", "self_attention.query_key_value.weight",
               "self_attention.query_key_value.bias", "self_attention.dense.weight", "self_attention.dense.bias",
               "post_attention_layernorm.weight", "post_attention_layernorm.bias", "mlp.dense_h_to_4h.weight",
               "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")


@dataclass
class Source:
    """Where a checkpoint is and which layout it has."""

    root: Path  # what the user passed
    folder: Path  # the folder of one iteration
    kind: str  # "megatron-lm" | "deepspeed-pipe" | "deepspeed" | "universal"
    iteration: str  # "10", "release", ...


def _read_tracker(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise MegatronCheckpointError(f"{path} cannot be read ({error}).") from None


def _kind_of(folder: Path) -> str | None:
    """The layout of one iteration folder, or None when it holds no Megatron checkpoint."""
    if not folder.is_dir():
        return None
    names = [p.name for p in folder.iterdir()]
    if any(n.endswith(".distcp") for n in names) or (folder / "metadata.json").is_file() and any(
            n.startswith("__") for n in names):
        return "megatron-core-dist"
    if (folder / "zero").is_dir() and any((folder / "zero").iterdir()):
        return "universal"
    if any(_DS_LAYER.match(n) for n in names):
        return "deepspeed-pipe"
    if any(_ZERO3.match(n) for n in names):  # ZeRO-3 partitions the weights themselves over the ranks
        return "deepspeed-zero3"
    if any(_DS_RANK.match(n) for n in names):
        return "deepspeed"
    if any(_LM_RANK.match(n) or n.startswith("mp_rank_") for n in names if (folder / n).is_dir()):
        return "megatron-lm"
    return None


def find_source(root: str | Path, iteration: int | str | None = None) -> Source:
    """Locate the iteration folder of a checkpoint: from its tracker file (``latest_checkpointed_iteration.txt``,
    DeepSpeed's ``latest``, ``latest_universal``), from ``iteration``, or ``root`` itself."""
    root = Path(root)
    if not root.is_dir():
        raise MegatronCheckpointError(f"{root} is not a folder.")
    candidates: list[tuple[Path, str]] = []
    if iteration is not None:
        label = str(iteration)
        names = [f"iter_{int(label):07d}" if label.isdigit() else label, f"global_step{label}",
                 f"global_step{label}_universal", label]
        candidates = [(root / n, label) for n in names]
    else:
        tracker = root / "latest_checkpointed_iteration.txt"
        if tracker.is_file():
            label = _read_tracker(tracker)
            candidates.append((root / ("release" if label == "release" else f"iter_{int(label):07d}"
                                       if label.isdigit() else label), label))
        for name in ("latest_universal", "latest"):
            if (root / name).is_file():
                label = _read_tracker(root / name)
                candidates.append((root / label, label.removeprefix("global_step").removesuffix("_universal")))
        candidates.append((root, root.name))
    for folder, label in candidates:
        kind = _kind_of(folder)
        if kind is None:
            continue
        if kind == "megatron-core-dist":
            raise MegatronCheckpointError(f"{folder} is a Megatron-Core distributed checkpoint (torch_dist/zarr); "
                                          "convert it to the legacy format with Megatron-LM's checkpoint tools first.")
        if kind == "deepspeed-zero3":
            raise MegatronCheckpointError(f"{folder} holds ZeRO-3 partitioned weights; run DeepSpeed's zero_to_fp32.py "
                                          "(or ds_to_universal.py) on it first.")
        return Source(root, folder, kind, label)
    iterations = sorted(p.name for p in root.iterdir() if p.is_dir() and (p.name.startswith(("iter_", "global_step"))
                                                                         or p.name == "release"))
    if iteration is not None:
        raise MegatronCheckpointError(f"{root} has no checkpoint for iteration {iteration} (found: "
                                      f"{', '.join(iterations) or 'none'}).")
    if iterations:
        raise MegatronCheckpointError(f"{root} has no tracker file naming its latest iteration; pass --iteration "
                                      f"(found: {', '.join(iterations)}).")
    raise MegatronCheckpointError(f"{root} holds no Megatron-LM or Megatron-DeepSpeed checkpoint.")


def is_megatron_checkpoint(folder: str | Path) -> bool:
    """True for a folder this package reads (and not a transformers folder with a config.json)."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "config.json").is_file():
        return False
    trackers = ("latest_checkpointed_iteration.txt", "latest", "latest_universal")
    return any((folder / t).is_file() for t in trackers) or _kind_of(folder) is not None or any(
        _kind_of(p) is not None for p in folder.iterdir() if p.is_dir() and p.name.startswith(("iter_", "global_step"))
    )


# --- readers ------------------------------------------------------------------------------------------------------


@dataclass
class Reader:
    source: Source
    args: object
    checkpoint_version: float | None  # None: the key is absent (Megatron's loader treats that as 0)
    meta: dict = field(default_factory=dict)  # checkpoint_info, universal_checkpoint_info, iteration
    files: list[Path] = field(default_factory=list)  # every file read
    pipe_model: bool = False  # built as DeepSpeed's GPTModelPipe (numbers its attention layers from 0)

    def embedding(self) -> Shards: ...
    def layer(self, index: int) -> Shards: ...
    def final_norm(self) -> Shards: ...
    def head(self) -> Shards | None:
        return None


def _check_same(values: dict[Path, object], what: str) -> None:
    distinct = {repr(v) for v in values.values()}
    if len(distinct) > 1:
        listing = ", ".join(f"{p.parent.name}/{p.name}: {v}" for p, v in list(values.items())[:4])
        raise MegatronCheckpointError(f"the shards disagree on {what} ({listing}): files from different saves are "
                                      "mixed in one folder. Use the files of one save only.")


def _block_name(key: str) -> str:
    return key.replace("attention.", "self_attention.", 1) if key.startswith("attention.") else key


def _refuse_core_names(keys, where: str) -> None:
    core = [k for k in keys if k.startswith(("decoder.", "embedding.word_embeddings")) or ".linear_qkv." in k
            or ".linear_fc1." in k]
    if core:
        raise MegatronCheckpointError(f"{where} uses Megatron-Core parameter names ({core[0]}, ...); convert it with "
                                      "Megatron-LM's tools to the legacy layout first.")


class MegatronLMReader(Reader):
    """``mp_rank_XX[_YYY]/model_optim_rng.pt``: one file per (TP, PP) rank, local layer indices per stage."""

    def __init__(self, source: Source):
        folder = source.folder
        ranks = {}
        for path in sorted(folder.iterdir()):
            if not path.is_dir() or not path.name.startswith("mp_rank_"):
                continue
            match = _LM_RANK.match(path.name)
            if match is None:
                raise MegatronCheckpointError(f"{path} is an expert-parallel or unknown shard folder; mixtures of "
                                              "experts are not GPT-2 models.")
            file = next((path / n for n in _LM_FILES if (path / n).is_file()), None)
            if file is None:
                raise MegatronCheckpointError(f"{path} has no {_LM_FILES[0]}: the shard is missing.")
            ranks[(int(match.group(1)), int(match.group(2) or 0))] = file
        states = {key: load_pt(path) for key, path in ranks.items()}
        first = states[min(states)]
        if not isinstance(first, dict) or "args" not in first:
            raise MegatronCheckpointError(f"{ranks[min(states)]} has no `args`: not saved by Megatron's "
                                          "save_checkpoint.")
        super().__init__(source, first.get("args"), first.get("checkpoint_version"), files=sorted(ranks.values()))
        _check_same({ranks[k]: s.get("iteration") for k, s in states.items()}, "the iteration")
        _check_same({ranks[k]: s.get("checkpoint_version") for k, s in states.items()}, "checkpoint_version")
        from .hparams import model_shape

        shape = model_shape(self.args)
        self.tp, self.pp, self.vpp, self.layers = shape.tp, shape.pp, shape.vpp, shape.num_layers
        wanted = {(t, p) for t in range(self.tp) for p in range(self.pp)}
        missing = sorted(wanted - set(ranks))
        if missing:
            names = [f"mp_rank_{t:02d}" + (f"_{p:03d}" if self.pp > 1 else "") for t, p in missing]
            raise MegatronCheckpointError(f"{folder} lacks {len(missing)} shard(s) of its TP={self.tp} x PP={self.pp} "
                                          f"layout: {', '.join(names[:5])}.")
        extra = sorted(set(ranks) - wanted)
        if extra:
            raise MegatronCheckpointError(f"{folder} has shards beyond TP={self.tp} x PP={self.pp} from its args "
                                          f"(e.g. {ranks[extra[0]].parent.name}).")
        self.meta = {"iteration": first.get("iteration"), "checkpoint_info": first.get("checkpoint_info")}
        # keep only the model tensors, by block; the rest of each file (optimizer state) is never touched, and a
        # stage's memory-mapped file is let go once its last block is merged
        self._by_layer: dict[int, dict[int, dict]] = {}
        self._embedding: dict[int, dict] = {}
        self._final: dict[int, dict] = {}
        self._head: dict[int, dict] = {}
        for (t, p), state in list(states.items()):
            chunks = self._chunks(state, ranks[(t, p)])
            if p == 0:
                self._embedding[t] = chunks[0]["language_model"].get("embedding", {})
            if p == self.pp - 1:
                self._final[t] = self._encoder(chunks[-1], ranks[(t, p)])
                self._head[t] = chunks[-1].get("word_embeddings_for_head")
            for v, language_model in enumerate(chunks):
                encoder = self._encoder(language_model, ranks[(t, p)])
                for key, tensor in encoder.items():
                    match = re.match(r"^layers\.(\d+)\.(.+)$", key)
                    if match is None:
                        continue
                    index = self._global_index(p, v, int(match.group(1)))
                    self._by_layer.setdefault(index, {}).setdefault(t, {})[_block_name(match.group(2))] = tensor
            del states[(t, p)], state, chunks
        del first  # nothing of the files is held beyond the model tensors
        found = sorted(self._by_layer)
        if found != list(range(self.layers)):
            absent = sorted(set(range(self.layers)) - set(found))
            raise MegatronCheckpointError(f"{folder} holds blocks {found[:3]}...{found[-1:]} but args say "
                                          f"{self.layers} layers (missing: {absent[:5]}).")

    def _chunks(self, state: dict, path: Path) -> list[dict]:
        if "model" in state:
            chunks = [state["model"]]
        else:
            keys = sorted((k for k in state if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
            if not keys:
                raise MegatronCheckpointError(f"{path} has no `model` entry.")
            if not self.vpp:
                raise MegatronCheckpointError(f"{path} holds virtual-pipeline chunks ({', '.join(keys)}) but its args "
                                              "set no virtual_pipeline_model_parallel_size.")
            chunks = [state[k] for k in keys]
        out = []
        for chunk in chunks:
            if not isinstance(chunk, dict):
                raise MegatronCheckpointError(f"{path}: the model entry is not a state dict.")
            _refuse_core_names(chunk.keys(), str(path))
            if "language_model" not in chunk:
                raise MegatronCheckpointError(f"{path}: the model has no language_model entry (not a Megatron GPT "
                                              "model).")
            out.append(chunk)
        return out

    @staticmethod
    def _encoder(chunk: dict, path: Path) -> dict:
        language_model = chunk["language_model"]
        encoder = language_model.get("encoder", language_model.get("transformer"))
        if encoder is None:
            return {}
        return encoder

    def _global_index(self, stage: int, chunk: int, local: int) -> int:
        if self.vpp:
            per_chunk = self.layers // self.pp // self.vpp
            return chunk * (self.layers // self.vpp) + stage * per_chunk + local
        return stage * (self.layers // self.pp) + local

    def embedding(self) -> Shards:
        out: Shards = {}
        for t in range(self.tp):
            embedding = self._embedding.pop(t)
            if embedding.get("tokentype_embeddings"):
                raise MegatronCheckpointError("the model has token-type embeddings, which GPT-2 does not have.")
            for name in ("word_embeddings", "position_embeddings"):
                if name not in embedding:
                    raise MegatronCheckpointError(f"the first pipeline stage of TP rank {t} has no {name}.")
                out.setdefault(f"{name}.weight", []).append(embedding[name]["weight"])
        return out

    def layer(self, index: int) -> Shards:
        ranks = self._by_layer.pop(index)  # taken once: the shards are freed after the merge
        out: Shards = {}
        for t in range(self.tp):
            if t not in ranks:
                raise MegatronCheckpointError(f"block {index} is missing from TP rank {t}.")
            for key, tensor in ranks[t].items():
                out.setdefault(key, []).append(tensor)
        return out

    def final_norm(self) -> Shards:
        out: Shards = {}
        for t in range(self.tp):
            encoder = self._final.pop(t)
            for name in ("weight", "bias"):
                if f"final_layernorm.{name}" not in encoder:
                    raise MegatronCheckpointError(f"the last pipeline stage of TP rank {t} has no final_layernorm.")
                out.setdefault(name, []).append(encoder[f"final_layernorm.{name}"])
        return out

    def head(self) -> Shards | None:
        copies = [self._head.pop(t, None) for t in range(self.tp)]
        if self.pp == 1 or any(c is None for c in copies):
            return None
        return {"word_embeddings.weight": [c["weight"] for c in copies]}


class DeepSpeedPipeReader(Reader):
    """``layer_XX-model_YY-model_states.pt`` per (spec index, TP rank) + ``mp_rank_XX_model_states.pt`` for args."""

    def __init__(self, source: Source):
        folder = source.folder
        rank_files = sorted(p for p in folder.iterdir() if _DS_RANK.match(p.name))
        if not rank_files:
            raise MegatronCheckpointError(f"{folder} has layer files but no mp_rank_XX_model_states.pt (the args).")
        states = {p: load_pt(p) for p in rank_files}
        first = states[rank_files[0]]
        super().__init__(source, first.get("args"), first.get("checkpoint_version"), pipe_model=True)
        _check_same({p: s.get("iteration") for p, s in states.items()}, "the iteration")
        from .hparams import model_shape

        shape = model_shape(self.args)
        self.tp, self.layers = shape.tp, shape.num_layers
        wanted = shape.tp * shape.pp
        names = {p.name for p in rank_files}
        missing = [f"mp_rank_{r:02d}_model_states.pt" for r in range(wanted) if f"mp_rank_{r:02d}_model_states.pt"
                   not in names]
        if missing:
            raise MegatronCheckpointError(f"{folder} lacks {', '.join(missing[:5])} (TP={shape.tp} x PP={shape.pp}).")
        self.meta = {"iteration": first.get("iteration"), "checkpoint_info": first.get("checkpoint_info"),
                     "universal_checkpoint_info": first.get("universal_checkpoint_info")}
        by_index: dict[int, dict[int, Path]] = {}
        for path in folder.iterdir():
            match = _DS_LAYER.match(path.name)
            if match:
                by_index.setdefault(int(match.group(1)), {})[int(match.group(2))] = path
        for index, ranks in sorted(by_index.items()):
            absent = [t for t in range(self.tp) if t not in ranks]
            if absent:
                raise MegatronCheckpointError(f"{folder} lacks layer_{index:02d}-model_{absent[0]:02d}-model_states.pt "
                                              f"(TP={self.tp}).")
        self.files = sorted(rank_files) + sorted(p for ranks in by_index.values() for p in ranks.values())
        self._embedding, self._blocks, self._final = None, [], None
        for _index, ranks in sorted(by_index.items()):  # by number, classified by keys
            paths = [ranks[t] for t in range(self.tp)]
            keys = set(load_pt(paths[0]))  # memory-mapped: the tensors are not read here
            path = ranks[0]
            _refuse_core_names(keys, str(path))
            if "lm_head.weight" in keys:
                raise MegatronCheckpointError(f"{path} holds an untied output layer (lm_head.weight); GPT-2 ties it to "
                                              "the word embedding.")
            if any(k.startswith("word_embeddings.norm") for k in keys):
                raise MegatronCheckpointError(f"{path} holds a LayerNorm after the word embedding "
                                              "(word_embeddings.norm), which GPT-2 does not have.")
            if "word_embeddings.weight" in keys:
                self._embedding = paths
            elif "input_layernorm.weight" in keys or "attention.query_key_value.weight" in keys:
                self._blocks.append(paths)
            elif keys == {"weight", "bias"}:
                self._final = paths
            else:
                raise MegatronCheckpointError(f"{path} holds {sorted(keys)[:4]}: not an embedding, a GPT block or a "
                                              "final LayerNorm.")
        if self._embedding is None or self._final is None:
            raise MegatronCheckpointError(f"{folder} lacks the {'embedding' if self._embedding is None else 'final norm'} "
                                          "layer file.")
        if len(self._blocks) != self.layers:
            raise MegatronCheckpointError(f"{folder} holds {len(self._blocks)} block layer files but args say "
                                          f"{self.layers} layers.")

    def embedding(self) -> Shards:
        parts = [load_pt(p) for p in self._embedding]
        return {key: [part[key] for part in parts] for key in ("word_embeddings.weight", "position_embeddings.weight")}

    def layer(self, index: int) -> Shards:
        out: Shards = {}
        for path in self._blocks[index]:
            for key, tensor in load_pt(path).items():
                out.setdefault(_block_name(key), []).append(tensor)
        return out

    def final_norm(self) -> Shards:
        parts = [load_pt(p) for p in self._final]
        return {key: [part[key] for part in parts] for key in ("weight", "bias")}


class DeepSpeedReader(Reader):
    """Non-pipeline DeepSpeed (``--no-pipeline-parallel``): ``mp_rank_XX_model_states.pt`` with a flat ``module``."""

    def __init__(self, source: Source):
        folder = source.folder
        rank_files = sorted(p for p in folder.iterdir() if _DS_RANK.match(p.name))
        states = {p: load_pt(p) for p in rank_files}
        first = states[rank_files[0]]
        super().__init__(source, first.get("args"), first.get("checkpoint_version"), files=rank_files)
        _check_same({p: s.get("iteration") for p, s in states.items()}, "the iteration")
        if any(not isinstance(s.get("module"), dict) for s in states.values()):
            raise MegatronCheckpointError(f"{folder}: mp_rank_XX_model_states.pt holds no module weights and there are "
                                          "no layer files; the model weights are not in this folder.")
        from .hparams import model_shape

        shape = model_shape(self.args)
        self.tp, self.layers = shape.tp, shape.num_layers
        if len(rank_files) != self.tp:
            raise MegatronCheckpointError(f"{folder} has {len(rank_files)} mp_rank files for TP={self.tp}.")
        self.meta = {"iteration": first.get("iteration"), "checkpoint_info": first.get("checkpoint_info")}
        self._modules = [self._strip(states[p]["module"], p) for p in rank_files]

    @staticmethod
    def _strip(module: dict, path: Path) -> dict:
        keys = list(module)
        _refuse_core_names(keys, str(path))
        return {k.removeprefix("module.").removeprefix("language_model."): v for k, v in module.items()}

    def _gather(self, prefix: str) -> Shards:
        out: Shards = {}
        for module in self._modules:
            for key, tensor in module.items():
                if key.startswith(prefix):
                    out.setdefault(_block_name(key[len(prefix):]), []).append(tensor)
        return out

    def embedding(self) -> Shards:
        return self._gather("embedding.")

    def layer(self, index: int) -> Shards:
        shards = self._gather(f"encoder.layers.{index}.") or self._gather(f"transformer.layers.{index}.")
        if not shards:
            raise MegatronCheckpointError(f"block {index} is missing from the module weights.")
        return shards

    def final_norm(self) -> Shards:
        return self._gather("encoder.final_layernorm.") or self._gather("transformer.final_layernorm.")


class UniversalReader(Reader):
    """DeepSpeed universal checkpoints: one fp32 master tensor per parameter, already merged across TP ranks."""

    def __init__(self, source: Source):
        folder = source.folder
        zero = folder / "zero"
        self._params = {p.name: p / "fp32.pt" for p in zero.iterdir() if (p / "fp32.pt").is_file()}
        rank_files = sorted(p for p in folder.iterdir() if _DS_RANK.match(p.name))
        if not rank_files:
            raise MegatronCheckpointError(f"{folder} has no mp_rank_XX_model_states.pt, so the model's args are "
                                          "unknown.")
        first = load_pt(rank_files[0])
        super().__init__(source, first.get("args"), first.get("checkpoint_version"))
        from .hparams import model_shape

        shape = model_shape(self.args)
        self.layers, self.tp = shape.num_layers, shape.tp
        self.meta = {"iteration": first.get("iteration"), "checkpoint_info": first.get("checkpoint_info"),
                     "universal_checkpoint_info": first.get("universal_checkpoint_info")}
        self.files = [rank_files[0]]
        pipe = "tied_modules.embed.word_embeddings.weight" in self._params
        self.pipe_model = pipe
        if pipe:
            indices = sorted({int(n.split(".")[0]) for n in self._params if n.split(".")[0].isdigit()})
            blocks = [i for i in indices if f"{i}.input_layernorm.weight" in self._params]
            finals = [i for i in indices if f"{i}.weight" in self._params and f"{i}.input_layernorm.weight" not in
                      self._params]
            if len(blocks) != self.layers or len(finals) != 1:
                raise MegatronCheckpointError(f"{zero} holds {len(blocks)} blocks and {len(finals)} final norms; args "
                                              f"say {self.layers} layers.")
            self._prefix = {"embedding": "tied_modules.embed.", "final": f"{finals[0]}."}
            self._block_prefix = [f"{i}." for i in blocks]
        else:
            self._prefix = {"embedding": "language_model.embedding.", "final": "language_model.encoder.final_layernorm."}
            self._block_prefix = [f"language_model.encoder.layers.{i}." for i in range(self.layers)]

    def _tensor(self, name: str) -> torch.Tensor:
        path = self._params.get(name)
        if path is None and name.endswith("position_embeddings.weight"):
            raise MegatronCheckpointError(f"{self.source.folder / 'zero'} has no position embeddings (bigscience's "
                                          "ds_to_universal.py skips them): convert the DeepSpeed checkpoint the "
                                          "universal one was made from instead.")
        if path is None:
            raise MegatronCheckpointError(f"{self.source.folder / 'zero'} has no {name}/fp32.pt.")
        self.files.append(path)
        content = load_pt(path)
        return content["param"] if isinstance(content, dict) else content

    def _gather(self, prefix: str, keys) -> Shards:
        return {_block_name(k): [self._tensor(prefix + k)] for k in keys}

    def embedding(self) -> Shards:
        return self._gather(self._prefix["embedding"], ("word_embeddings.weight", "position_embeddings.weight"))

    def layer(self, index: int) -> Shards:
        prefix = self._block_prefix[index]
        old = f"{prefix}attention.query_key_value.weight" in self._params
        keys = [k.replace("self_attention.", "attention.") if old else k for k in _BLOCK_KEYS]
        shards = self._gather(prefix, keys)
        # the universal merge concatenated the TP slices of QKV on dim 0: present them as the TP slices again, so
        # the per-partition reorder applies as for any other layout
        for key in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            shards[key] = list(shards[key][0].chunk(self.tp, dim=0))
        return shards

    def final_norm(self) -> Shards:
        return self._gather(self._prefix["final"], ("weight", "bias"))


_READERS = {"megatron-lm": MegatronLMReader, "deepspeed-pipe": DeepSpeedPipeReader, "deepspeed": DeepSpeedReader,
            "universal": UniversalReader}


def open_reader(source: Source) -> Reader:
    return _READERS[source.kind](source)
