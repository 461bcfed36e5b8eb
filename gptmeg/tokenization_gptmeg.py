"""Byte-level BPE tokenizers for gptmeg (GPT-2 compatible).

This module provides

* :class:`GPTMegTokenizer` -- a pure-Python ("slow") GPT-2 style byte-level BPE tokenizer built on
  ``transformers.tokenization_python.PythonBackend`` (the slow-tokenizer base class of transformers 5.x);
* :class:`GPTMegTokenizerFast` -- the same tokenizer backed by the Rust ``tokenizers`` library, as a thin
  subclass of ``transformers.GPT2Tokenizer``;
* :func:`byte_level_vocab` / :func:`write_byte_level_vocab` -- a small, deterministic, download-free byte-level
  vocabulary (256 byte symbols + a few merges learned from a built-in English text + ``<|endoftext|>``).

Both tokenizers read and write the GPT-2 file pair ``vocab.json`` (token -> id) and ``merges.txt`` (one merge
``"left right"`` per line, ranked by line order, optionally preceded by a ``#version`` header line).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from functools import lru_cache

import regex
from transformers import GPT2Tokenizer
from transformers.tokenization_python import PythonBackend
from transformers.utils import logging


logger = logging.get_logger(__name__)

__all__ = [
    "GPTMegTokenizer",
    "GPTMegTokenizerFast",
    "VOCAB_FILES_NAMES",
    "ENDOFTEXT",
    "GPT2_SPLIT_PATTERN",
    "bytes_to_unicode",
    "byte_level_vocab",
    "write_byte_level_vocab",
    "load_vocab_file",
    "load_merges_file",
    "write_vocab_files",
]

VOCAB_FILES_NAMES = {"vocab_file": "vocab.json", "merges_file": "merges.txt"}
ENDOFTEXT = "<|endoftext|>"
MERGES_HEADER = "#version: 0.2"

# GPT-2's pre-tokenisation pattern: English contractions, letter runs, digit runs and runs of other symbols (each
# optionally preceded by one space), then whitespace. ``\s+(?!\S)`` leaves the last space of a whitespace run to be
# glued to the following word.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def _byte_table() -> tuple[tuple[int, str], ...]:
    # Bytes that are printable, non-space latin-1 characters stand for themselves; every other byte (controls,
    # space, DEL, NBSP, soft hyphen, ...) is shifted to the code points 256, 257, ... in increasing byte order.
    # Printable bytes come first: this is also the order of the 256 base symbols in GPT-2's vocabulary.
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept_set = set(kept)
    shifted = [b for b in range(256) if b not in kept_set]
    table = [(b, chr(b)) for b in kept] + [(b, chr(256 + i)) for i, b in enumerate(shifted)]
    return tuple(table)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character mapping (insertion order = GPT-2 vocab order)."""
    return dict(_byte_table())


# --------------------------------------------------------------------------------------------------------------------
# vocab.json / merges.txt reading and writing
# --------------------------------------------------------------------------------------------------------------------


def load_vocab_file(vocab_file) -> dict[str, int]:
    """Read a GPT-2 ``vocab.json`` (JSON object token -> non-negative int id), with clear errors."""
    if vocab_file is None:
        raise ValueError(
            "No vocabulary file given: a GPT-2 style byte-level BPE tokenizer needs `vocab_file` "
            f"(`{VOCAB_FILES_NAMES['vocab_file']}`, a JSON object mapping token -> id)."
        )
    vocab_file = os.fspath(vocab_file)
    if not os.path.isfile(vocab_file):
        raise ValueError(
            f"Vocabulary file not found: {vocab_file!r}. Expected `{VOCAB_FILES_NAMES['vocab_file']}`, "
            "a JSON object mapping token -> id."
        )
    try:
        with open(vocab_file, encoding="utf-8") as handle:
            vocab = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"Malformed vocabulary file {vocab_file!r}: not valid UTF-8 JSON ({exc}).") from exc
    return _check_vocab(vocab, source=vocab_file)


def _check_vocab(vocab, source: str = "vocab") -> dict[str, int]:
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(
            f"Malformed vocabulary {source!r}: expected a non-empty JSON object mapping token (str) -> id (int), "
            f"got {type(vocab).__name__}{' (empty)' if isinstance(vocab, dict) else ''}."
        )
    seen: dict[int, str] = {}
    for token, index in vocab.items():
        if not isinstance(token, str) or isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(
                f"Malformed vocabulary {source!r}: entry {token!r}: {index!r} is not a token (str) -> "
                "non-negative id (int) pair."
            )
        if index in seen:
            raise ValueError(
                f"Malformed vocabulary {source!r}: id {index} is used by both {seen[index]!r} and {token!r}."
            )
        seen[index] = token
    return dict(vocab)


def load_merges_file(merges_file, vocab: dict[str, int] | None = None) -> list[tuple[str, str]]:
    """Read a GPT-2 ``merges.txt`` (optional ``#version`` header, then one ``left right`` pair per line)."""
    if merges_file is None:
        raise ValueError(
            "No merges file given: a GPT-2 style byte-level BPE tokenizer needs `merges_file` "
            f"(`{VOCAB_FILES_NAMES['merges_file']}`, one `left right` merge per line)."
        )
    merges_file = os.fspath(merges_file)
    if not os.path.isfile(merges_file):
        raise ValueError(
            f"Merges file not found: {merges_file!r}. Expected `{VOCAB_FILES_NAMES['merges_file']}`, "
            "one `left right` BPE merge per line."
        )
    try:
        with open(merges_file, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"Malformed merges file {merges_file!r}: not valid UTF-8 ({exc}).") from exc
    return _parse_merges(text.split("\n"), vocab=vocab, source=merges_file)


def _parse_merges(lines, vocab: dict[str, int] | None = None, source: str = "merges") -> list[tuple[str, str]]:
    merges: list[tuple[str, str]] = []
    for lineno, line in enumerate(lines, start=1):
        if isinstance(line, (tuple, list)):
            parts = list(line)
        else:
            line = line.rstrip("\r")
            if not line or (line.startswith("#version") and not merges):
                continue
            parts = line.split(" ")
        if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise ValueError(
                f"Malformed merges {source!r}, line {lineno}: expected two space-separated tokens, got {line!r}."
            )
        if vocab is not None:
            for piece in (parts[0], parts[1], parts[0] + parts[1]):
                if piece not in vocab:
                    raise ValueError(
                        f"Malformed merges {source!r}, line {lineno}: {piece!r} (from merge {' '.join(parts)!r}) "
                        "is not in the vocabulary."
                    )
        merges.append((parts[0], parts[1]))
    return merges


def _require_files(owner: str, vocab_file, merges_file, name_or_path=None) -> None:
    given = {"vocab_file": vocab_file, "merges_file": merges_file}
    missing = [VOCAB_FILES_NAMES[key] for key, value in given.items() if value is None]
    if missing:
        where = f" in {os.fspath(name_or_path)!r}" if name_or_path else ""
        raise ValueError(
            f"{owner}: missing {' and '.join(f'`{name}`' for name in missing)}{where}. A GPT-2 style byte-level BPE "
            f"tokenizer needs `{VOCAB_FILES_NAMES['vocab_file']}` (JSON token -> id) and "
            f"`{VOCAB_FILES_NAMES['merges_file']}` (one `left right` merge per line); "
            "`write_byte_level_vocab(directory)` writes a small built-in pair."
        )


def write_vocab_files(
    directory,
    vocab: dict[str, int],
    merges,
    filename_prefix: str | None = None,
) -> tuple[str, str]:
    """Write ``[prefix-]vocab.json`` (ids in increasing order) and ``[prefix-]merges.txt`` (with GPT-2's header)."""
    directory = os.fspath(directory)
    prefix = f"{filename_prefix}-" if filename_prefix else ""
    vocab_path = os.path.join(directory, prefix + VOCAB_FILES_NAMES["vocab_file"])
    merges_path = os.path.join(directory, prefix + VOCAB_FILES_NAMES["merges_file"])
    ordered = dict(sorted(vocab.items(), key=lambda item: item[1]))
    with open(vocab_path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(ordered, indent=2, ensure_ascii=False) + "\n")
    with open(merges_path, "w", encoding="utf-8") as handle:
        handle.write(MERGES_HEADER + "\n")
        for left, right in merges:
            handle.write(f"{left} {right}\n")
    return vocab_path, merges_path


# --------------------------------------------------------------------------------------------------------------------
# Built-in deterministic vocabulary
# --------------------------------------------------------------------------------------------------------------------

_BUILTIN_CORPUS = (
    "The quick brown fox jumps over the lazy dog. The dog was not amused, and the fox ran into the forest.\n"
    "In the beginning there was only the text, and the text was short. Then the tokenizer learned that the most "
    "common pairs of letters in the English language are the ones that start and end the words we use: the, and, "
    "in, on, at, to, of, is, it, that, this, there, then.\n"
    "She said that she would read the book on the train to the station, and then she would write a letter to her "
    "mother. It is the best thing to do on a long morning in the winter.\n"
    "Numbers like 1, 2, 3 and 2024 are rarer than words, so they are not merged often.\n"
)


def _train_byte_level_bpe(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Tiny deterministic BPE trainer over GPT-2 pre-tokens (ties broken by the lexicographically smallest pair)."""
    byte_encoder = bytes_to_unicode()
    pattern = regex.compile(GPT2_SPLIT_PATTERN)
    word_counts = Counter("".join(byte_encoder[b] for b in piece.encode("utf-8")) for piece in pattern.findall(text))
    words = [(list(word), count) for word, count in sorted(word_counts.items())]
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pair_counts: Counter = Counter()
        for symbols, count in words:
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts.items(), key=lambda item: (-item[1], item[0]))[0]
        merges.append(best)
        words = [(_apply_merge(symbols, best), count) for symbols, count in words]
    return merges


def _apply_merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    left, right = pair
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == left and symbols[i + 1] == right:
            out.append(left + right)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def byte_level_vocab(num_merges: int = 30, corpus: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Deterministic, download-free byte-level BPE vocabulary.

    Ids ``0..255`` are the 256 byte symbols in GPT-2's byte->unicode order, followed by the results of
    ``num_merges`` merges learned from a short built-in English text (or ``corpus``), followed by
    ``<|endoftext|>`` as the last id. Returns ``(vocab, merges)``.
    """
    merges = _train_byte_level_bpe(_BUILTIN_CORPUS if corpus is None else corpus, num_merges)
    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab[ENDOFTEXT] = len(vocab)
    return vocab, merges


def write_byte_level_vocab(directory, num_merges: int = 30, corpus: str | None = None) -> tuple[str, str]:
    """Write the :func:`byte_level_vocab` vocabulary to ``directory/vocab.json`` and ``directory/merges.txt``."""
    os.makedirs(directory, exist_ok=True)
    vocab, merges = byte_level_vocab(num_merges=num_merges, corpus=corpus)
    return write_vocab_files(directory, vocab, merges)


# --------------------------------------------------------------------------------------------------------------------
# Slow (pure Python) tokenizer
# --------------------------------------------------------------------------------------------------------------------


class GPTMegTokenizer(PythonBackend):
    """GPT-2 style byte-level BPE tokenizer implemented in pure Python.

    Text is split with GPT-2's pre-tokenisation regex, every piece is UTF-8 encoded and its bytes are mapped to
    printable characters (GPT-2's byte->unicode table), then BPE merges from ``merges.txt`` are applied by rank.
    As with GPT-2, a word is tokenized differently at the start of a text (no leading space) than after a space;
    ``add_prefix_space=True`` inserts a space in front of each chunk of text (between added tokens) that does not
    already start with one, exactly like the ``tokenizers`` ByteLevel pre-tokenizer.

    Args:
        vocab_file: path to ``vocab.json`` (token -> id).
        merges_file: path to ``merges.txt``.
        errors: how to handle invalid UTF-8 when decoding (see ``bytes.decode``).
        unk_token / bos_token / eos_token: default to ``<|endoftext|>`` like GPT-2.
        pad_token: optional padding token (GPT-2 has none by default).
        add_prefix_space: prepend a space to text that does not start with one.
        add_bos_token / add_eos_token: wrap encoded sequences with bos/eos (default False, like GPT-2).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    _cache_max_size = 100_000

    def __init__(
        self,
        vocab_file,
        merges_file,
        errors="replace",
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token=None,
        add_prefix_space=False,
        **kwargs,
    ):
        # Everything `get_vocab` needs must exist before `PythonBackend.__init__` registers the special tokens.
        _require_files(type(self).__name__, vocab_file, merges_file, kwargs.get("name_or_path"))
        self.encoder = load_vocab_file(vocab_file)
        self.decoder = {index: token for token, index in self.encoder.items()}
        merges = load_merges_file(merges_file, vocab=self.encoder)
        self.bpe_ranks = {pair: rank for rank, pair in reversed(list(enumerate(merges)))}
        self.errors = errors
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {char: byte for byte, char in self.byte_encoder.items()}
        self.add_prefix_space = add_prefix_space
        self.pat = regex.compile(GPT2_SPLIT_PATTERN)
        self.cache: dict[str, tuple[str, ...]] = {}
        self.vocab_file = vocab_file
        self.merges_file = merges_file
        self._add_bos_token = bool(kwargs.pop("add_bos_token", False))
        self._add_eos_token = bool(kwargs.pop("add_eos_token", False))
        kwargs.pop("backend", None)  # a config saved by the fast tokenizer says "tokenizers"
        kwargs.setdefault("token_type_ids_pattern", "all_zeros")
        kwargs.setdefault("special_tokens_pattern", "none")
        super().__init__(
            errors=errors,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_prefix_space=add_prefix_space,
            **kwargs,
        )

    # ---- vocabulary -------------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self.encoder)
        vocab.update(self._added_tokens_encoder if hasattr(self, "_added_tokens_encoder") else {})
        return vocab

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value: bool):
        self._add_bos_token = bool(value)

    @property
    def add_eos_token(self) -> bool:
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value: bool):
        self._add_eos_token = bool(value)

    # ---- BPE --------------------------------------------------------------------------------------------------------

    def bpe(self, word: str) -> tuple[str, ...]:
        """Apply the BPE merges (lowest rank first) to one byte-level pre-token; returns its symbols."""
        cached = self.cache.get(word)
        if cached is not None:
            return cached
        symbols = list(word)
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best_rank = None
            best_pair = None
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_pair = rank, pair
            if best_pair is None:
                break
            symbols = _apply_merge(symbols, best_pair)
        result = tuple(symbols)
        if len(self.cache) >= self._cache_max_size:
            self.cache.clear()
        self.cache[word] = result
        return result

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        # `PythonBackend.tokenize` calls this once per chunk of text between added tokens; the `tokenizers`
        # ByteLevel pre-tokenizer likewise adds the prefix space to each such chunk.
        if self.add_prefix_space and not text.startswith(" "):
            text = " " + text
        tokens: list[str] = []
        for piece in self.pat.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            tokens.extend(self.bpe(mapped))
        return tokens

    def prepare_for_tokenization(self, text: str, is_split_into_words: bool = False, **kwargs):
        # Per-call override, kept for compatibility with the transformers 4.x GPT-2 slow tokenizer.
        add_prefix_space = kwargs.pop("add_prefix_space", None)
        if add_prefix_space and not self.add_prefix_space and text and not text.startswith(" "):
            text = " " + text
        return text, kwargs

    def _convert_token_to_id(self, token: str) -> int:
        index = self.encoder.get(token)
        if index is None:
            index = self.encoder.get(str(self.unk_token)) if self.unk_token is not None else None
        return index

    def _convert_id_to_token(self, index: int) -> str:
        return self.decoder.get(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytearray()
        for token in tokens:
            if token is None:
                continue
            if token in self._added_tokens_encoder and token not in self.encoder:
                # Added tokens that are not part of the byte-level vocabulary are plain text.
                data.extend(token.encode("utf-8"))
                continue
            for char in token:
                byte = self.byte_decoder.get(char)
                if byte is None:
                    data.extend(char.encode("utf-8"))
                else:
                    data.append(byte)
        return data.decode("utf-8", errors=self.errors)

    # ---- special tokens (same layout as the fast tokenizer's post-processor) --------------------------------------

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self._add_bos_token and self.bos_token_id is not None else []
        eos = [self.eos_token_id] if self._add_eos_token and self.eos_token_id is not None else []
        output = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            output += bos + list(token_ids_1) + eos
        return output

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        bos = [1] if self._add_bos_token and self.bos_token_id is not None else []
        eos = [1] if self._add_eos_token and self.eos_token_id is not None else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    # ---- saving ---------------------------------------------------------------------------------------------------

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary path ({save_directory}) should be an existing directory.")
        merges = [pair for pair, _ in sorted(self.bpe_ranks.items(), key=lambda item: item[1])]
        return write_vocab_files(save_directory, self.encoder, merges, filename_prefix=filename_prefix)


# --------------------------------------------------------------------------------------------------------------------
# Fast (Rust `tokenizers`) tokenizer
# --------------------------------------------------------------------------------------------------------------------


class GPTMegTokenizerFast(GPT2Tokenizer):
    """:class:`GPTMegTokenizer` backed by the ``tokenizers`` library (a ``transformers.GPT2Tokenizer``).

    Can be built from ``vocab``/``merges`` objects, from ``vocab_file``/``merges_file`` paths, from a directory with
    ``vocab.json`` + ``merges.txt`` and/or ``tokenizer.json`` (``from_pretrained``). ``save_pretrained`` writes
    ``tokenizer.json`` *and* ``vocab.json`` + ``merges.txt`` so the slow tokenizer can load the same directory.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    slow_tokenizer_class = GPTMegTokenizer

    def __init__(
        self,
        vocab=None,
        merges=None,
        errors="replace",
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token=None,
        add_prefix_space=False,
        vocab_file=None,
        merges_file=None,
        **kwargs,
    ):
        has_backend = kwargs.get("tokenizer_object") is not None or kwargs.get("tokenizer_file") is not None
        if vocab is None:
            vocab = vocab_file
        if merges is None:
            merges = merges_file
        if isinstance(vocab, dict):
            # In-memory vocabulary: like `GPT2Tokenizer`, no merges means a pure byte/character-level BPE.
            vocab = _check_vocab(vocab)
            merges = [] if merges is None else merges
        elif not has_backend or vocab is not None:
            # Files (directly or through `from_pretrained`): both are required.
            _require_files(type(self).__name__, vocab, merges, kwargs.get("name_or_path"))
            vocab = load_vocab_file(vocab)
        if isinstance(merges, (str, os.PathLike)):
            merges = load_merges_file(merges, vocab=vocab)
        elif merges is not None:
            merges = _parse_merges(merges, vocab=vocab)
        kwargs.pop("backend", None)  # a config saved by the slow tokenizer says "custom"
        if vocab_file is not None:
            kwargs["vocab_file"] = vocab_file
        if merges_file is not None:
            kwargs["merges_file"] = merges_file
        super().__init__(
            vocab=vocab,
            merges=merges,
            errors=errors,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_prefix_space=add_prefix_space,
            **kwargs,
        )

    def _bpe_model_state(self) -> tuple[dict[str, int], list[tuple[str, str]]]:
        model = json.loads(self.backend_tokenizer.to_str())["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"Expected a BPE model in the backend tokenizer, got {model.get('type')!r}.")
        vocab = model["vocab"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        return vocab, merges

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary path ({save_directory}) should be an existing directory.")
        vocab, merges = self._bpe_model_state()
        return write_vocab_files(save_directory, vocab, merges, filename_prefix=filename_prefix)

    def _save_pretrained(self, save_directory, file_names, legacy_format=None, filename_prefix=None):
        file_names = super()._save_pretrained(
            save_directory, file_names, legacy_format=legacy_format, filename_prefix=filename_prefix
        )
        if legacy_format is False:
            return file_names
        return tuple(file_names) + tuple(self.save_vocabulary(str(save_directory), filename_prefix=filename_prefix))
