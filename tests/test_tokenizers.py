"""Tests for gptmeg's byte-level BPE tokenizers (slow pure-Python vs fast `tokenizers`-backed)."""

import json
import os
import random

import pytest
from transformers import GPT2Tokenizer

from gptmeg.tokenization_gptmeg import (
    ENDOFTEXT,
    GPTMegTokenizer,
    GPTMegTokenizerFast,
    byte_level_vocab,
    bytes_to_unicode,
    write_byte_level_vocab,
)


TEXTS = [
    "",
    " ",
    "  ",
    "\n",
    "Hello world",
    " Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! What's up? (a) [b] {c} <d> @#$%^&*_-+=~`|\\/",
    "don't can't I'll we're they've she'd I'm it's DON'T",
    "123 4567.89 -42 3.14159e10 1,000,000",
    "two  spaces,   three   spaces    and trailing   ",
    "   leading spaces",
    "line one\nline two\n\nline four\r\nwindows\ttab\t\tdouble tab",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "中文字符 日本語のテキスト 한국어",
    "Ünïcödé àccénts ñ ß ø Ωμέγα кириллица",
    "\u00a0nbsp\u2009thin\u3000ideographic\u2028sep\x85nel\x1cfs\x0bvt",
    "x<|endoftext|>y",
    "<|endoftext|>",
    "start <|endoftext|> middle <|endoftext|><|endoftext|> end",
    "<|endoftext|> leading and trailing <|endoftext|>",
    "<|endoftext",
    "ab" * 50 + " the the the then there",
]


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("byte_level_vocab")
    write_byte_level_vocab(directory)
    return str(directory)


@pytest.fixture(scope="module")
def big_vocab_dir(tmp_path_factory):
    # More merges (multi-character tokens, chains of merges) to exercise the BPE loop harder.
    directory = tmp_path_factory.mktemp("byte_level_vocab_big")
    write_byte_level_vocab(directory, num_merges=150)
    return str(directory)


def _load_all(directory, **kwargs):
    return (
        GPTMegTokenizer.from_pretrained(directory, **kwargs),
        GPTMegTokenizerFast.from_pretrained(directory, **kwargs),
        GPT2Tokenizer.from_pretrained(directory, **kwargs),
    )


@pytest.fixture(scope="module", params=[False, True], ids=["no_prefix_space", "prefix_space"])
def tokenizers(request, vocab_dir):
    return request.param, _load_all(vocab_dir, add_prefix_space=request.param)


# ---------------------------------------------------------------------------------------------------------------------
# Built-in vocabulary
# ---------------------------------------------------------------------------------------------------------------------


def test_bytes_to_unicode_is_a_printable_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    chars = list(table.values())
    assert len(set(chars)) == 256
    assert all(c.isprintable() and not c.isspace() for c in chars)
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    # GPT-2 order: the printable bytes first ("!" is id 0), then the remapped ones.
    assert chars[0] == "!" and chars[93] == "~" and chars[188] == "Ā"


def test_byte_level_vocab_is_deterministic_and_well_formed(vocab_dir):
    vocab, merges = byte_level_vocab()
    vocab2, merges2 = byte_level_vocab()
    assert vocab == vocab2 and merges == merges2
    assert list(vocab.items()) == list(vocab2.items())
    assert len(merges) == 30
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert list(vocab)[:256] == list(bytes_to_unicode().values())
    assert vocab[ENDOFTEXT] == len(vocab) - 1
    for left, right in merges:
        assert left in vocab and right in vocab and left + right in vocab
    # Learned from English text: the most frequent pair is a space followed by "t", and " the" is learned.
    assert merges[0] == ("Ġ", "t")
    assert "Ġthe" in vocab

    with open(os.path.join(vocab_dir, "vocab.json"), encoding="utf-8") as handle:
        assert json.load(handle) == vocab
    with open(os.path.join(vocab_dir, "merges.txt"), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert lines[0] == "#version: 0.2"
    assert [tuple(line.split(" ")) for line in lines[1:]] == merges


# ---------------------------------------------------------------------------------------------------------------------
# Slow / fast / transformers GPT2Tokenizer equivalence
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_slow_fast_reference_encode_decode_identical(tokenizers, text):
    add_prefix_space, (slow, fast, reference) = tokenizers
    ids = slow.encode(text)
    assert ids == fast.encode(text)
    assert ids == reference.encode(text)
    assert slow.tokenize(text) == fast.tokenize(text)
    assert slow.convert_ids_to_tokens(ids) == fast.convert_ids_to_tokens(ids)
    assert slow.decode(ids) == fast.decode(ids)
    assert slow.decode(ids, skip_special_tokens=True) == fast.decode(ids, skip_special_tokens=True)
    if not add_prefix_space:
        assert slow.decode(ids) == text
        assert fast.decode(ids) == text
    elif ENDOFTEXT not in text:
        assert slow.decode(ids) == (text if not text or text.startswith(" ") else " " + text)


def test_endoftext_is_a_single_special_token(tokenizers):
    _, (slow, fast, _) = tokenizers
    eot = slow.convert_tokens_to_ids(ENDOFTEXT)
    assert eot == fast.convert_tokens_to_ids(ENDOFTEXT) == slow.vocab_size - 1
    for tok in (slow, fast):
        assert tok.eos_token == tok.bos_token == tok.unk_token == ENDOFTEXT
        assert tok.eos_token_id == tok.bos_token_id == tok.unk_token_id == eot
        assert tok.pad_token is None
        assert tok.encode("a<|endoftext|>b").count(eot) == 1
        assert tok.decode(tok.encode("a<|endoftext|>b"), skip_special_tokens=True).strip() in ("ab", "a b")
    assert len(slow) == len(fast) == slow.vocab_size == fast.vocab_size
    assert slow.get_vocab() == fast.get_vocab()


def test_random_strings_match_with_many_merges(big_vocab_dir):
    slow, fast, reference = _load_all(big_vocab_dir)
    rng = random.Random(1234)
    alphabet = list("abcdefghijklmnopqrstuvwxyz THEthe   \n\t'.,!?0123456789") + [
        "é", "😀", "中", "\u00a0", ENDOFTEXT, "'s", "'ll", " the", "ing",
    ]  # fmt: skip
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        ids = slow.encode(text)
        assert ids == fast.encode(text) == reference.encode(text), repr(text)
        assert slow.decode(ids) == fast.decode(ids) == text
    # The BPE cache is used and does not change results.
    assert slow.cache
    assert slow.encode(TEXTS[6]) == fast.encode(TEXTS[6])


def test_invalid_utf8_decodes_with_replacement(vocab_dir):
    slow, fast, _ = _load_all(vocab_dir)
    lone = slow.convert_tokens_to_ids(bytes_to_unicode()[0xE4])  # first byte of a 3-byte sequence
    assert slow.decode([lone]) == fast.decode([lone]) == "\ufffd"
    strict = GPTMegTokenizer.from_pretrained(vocab_dir, errors="strict")
    with pytest.raises(UnicodeDecodeError):
        strict.decode([lone])


def test_split_into_words_and_pairs_and_bos_eos(vocab_dir):
    for add_prefix_space in (False, True):
        slow, fast, _ = _load_all(vocab_dir, add_prefix_space=add_prefix_space)
        words = ["Hello", "world", "!"]
        assert (
            slow(words, is_split_into_words=True)["input_ids"] == fast(words, is_split_into_words=True)["input_ids"]
        )
    all_flags = ({}, {"add_bos_token": True}, {"add_eos_token": True}, {"add_bos_token": True, "add_eos_token": True})
    for flags in all_flags:
        slow = GPTMegTokenizer.from_pretrained(vocab_dir, **flags)
        fast = GPTMegTokenizerFast.from_pretrained(vocab_dir, **flags)
        for args in (("hello there",), ("hello", "world")):
            expected = fast(*args, return_special_tokens_mask=True)
            got = slow(*args, return_special_tokens_mask=True)
            assert got["input_ids"] == expected["input_ids"], flags
            assert got["special_tokens_mask"] == expected["special_tokens_mask"], flags
            assert got["attention_mask"] == expected["attention_mask"], flags


def test_batch_left_padding_matches(vocab_dir):
    batch = ["a", "The quick brown fox", "", "emoji 😀 and <|endoftext|> token", "  spaces  "]
    slow = GPTMegTokenizer.from_pretrained(vocab_dir, pad_token=ENDOFTEXT, padding_side="left")
    fast = GPTMegTokenizerFast.from_pretrained(vocab_dir, pad_token=ENDOFTEXT, padding_side="left")
    out_slow = slow(batch, padding=True)
    out_fast = fast(batch, padding=True)
    assert out_slow["input_ids"] == out_fast["input_ids"]
    assert out_slow["attention_mask"] == out_fast["attention_mask"]
    lengths = [len(slow.encode(text)) for text in batch]
    width = max(lengths)
    for ids, mask, length in zip(out_slow["input_ids"], out_slow["attention_mask"], lengths):
        assert len(ids) == width
        assert mask == [0] * (width - length) + [1] * length
        assert ids[: width - length] == [slow.pad_token_id] * (width - length)
    # padding side set after construction + max_length padding + truncation
    for tok in (slow, fast):
        tok.padding_side = "left"
    kwargs = dict(padding="max_length", max_length=6, truncation=True)
    assert slow(batch, **kwargs)["input_ids"] == fast(batch, **kwargs)["input_ids"]
    assert slow(batch, **kwargs)["attention_mask"] == fast(batch, **kwargs)["attention_mask"]


# ---------------------------------------------------------------------------------------------------------------------
# Saving / loading
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("saver", [GPTMegTokenizer, GPTMegTokenizerFast])
@pytest.mark.parametrize("loader", [GPTMegTokenizer, GPTMegTokenizerFast])
def test_save_pretrained_round_trip(vocab_dir, tmp_path, saver, loader):
    original = saver.from_pretrained(vocab_dir, add_prefix_space=True, pad_token=ENDOFTEXT, padding_side="left")
    original.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= files
    reloaded = loader.from_pretrained(tmp_path)
    assert isinstance(reloaded, loader)
    assert reloaded.add_prefix_space is True
    assert reloaded.pad_token == ENDOFTEXT and reloaded.padding_side == "left"
    assert reloaded.get_vocab() == original.get_vocab()
    for text in TEXTS:
        assert reloaded.encode(text) == original.encode(text), repr(text)
    batch = ["a", "hello there world"]
    assert reloaded(batch, padding=True)["input_ids"] == original(batch, padding=True)["input_ids"]


def test_fast_loads_tokenizer_json_only(vocab_dir, tmp_path):
    fast = GPTMegTokenizerFast.from_pretrained(vocab_dir)
    fast.save_pretrained(tmp_path, legacy_format=False)
    assert "tokenizer.json" in os.listdir(tmp_path)
    assert "vocab.json" not in os.listdir(tmp_path)
    reloaded = GPTMegTokenizerFast.from_pretrained(tmp_path)
    for text in TEXTS:
        assert reloaded.encode(text) == fast.encode(text)


@pytest.mark.parametrize("cls", [GPTMegTokenizer, GPTMegTokenizerFast])
def test_save_vocabulary(vocab_dir, tmp_path, cls):
    tok = cls.from_pretrained(vocab_dir)
    files = tok.save_vocabulary(str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["vocab.json", "merges.txt"]
    for name in ("vocab.json", "merges.txt"):
        with open(os.path.join(vocab_dir, name), encoding="utf-8") as a, open(tmp_path / name, encoding="utf-8") as b:
            assert a.read() == b.read(), name
    prefixed = tok.save_vocabulary(str(tmp_path), filename_prefix="pre")
    assert [os.path.basename(f) for f in prefixed] == ["pre-vocab.json", "pre-merges.txt"]

    for loader in (GPTMegTokenizer, GPTMegTokenizerFast):
        for vocab_file, merges_file in (files, prefixed):
            reloaded = loader(vocab_file=vocab_file, merges_file=merges_file)
            for text in TEXTS:
                assert reloaded.encode(text) == tok.encode(text), repr(text)


def test_fast_from_in_memory_vocab(vocab_dir):
    vocab, merges = byte_level_vocab()
    fast = GPTMegTokenizerFast(vocab=vocab, merges=merges)
    slow = GPTMegTokenizer.from_pretrained(vocab_dir)
    for text in TEXTS:
        assert fast.encode(text) == slow.encode(text)
    assert GPTMegTokenizerFast.slow_tokenizer_class is GPTMegTokenizer
    assert fast.is_fast and not slow.is_fast


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [GPTMegTokenizer, GPTMegTokenizerFast])
def test_missing_vocab_file_errors(vocab_dir, tmp_path, cls):
    with pytest.raises(ValueError, match=r"vocab\.json"):
        cls.from_pretrained(str(tmp_path))  # empty directory
    only_merges = tmp_path / "only_merges"
    only_merges.mkdir()
    (only_merges / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing `vocab\.json`"):
        cls.from_pretrained(str(only_merges))
    with pytest.raises(ValueError, match=r"Vocabulary file not found"):
        cls(vocab_file=str(tmp_path / "nope.json"), merges_file=os.path.join(vocab_dir, "merges.txt"))
    with pytest.raises(ValueError, match=r"Merges file not found"):
        cls(vocab_file=os.path.join(vocab_dir, "vocab.json"), merges_file=str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("cls", [GPTMegTokenizer, GPTMegTokenizerFast])
def test_malformed_files_error(vocab_dir, tmp_path, cls):
    good_vocab = os.path.join(vocab_dir, "vocab.json")
    good_merges = os.path.join(vocab_dir, "merges.txt")

    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="Malformed vocabulary"):
        cls(vocab_file=str(bad_json), merges_file=good_merges)

    not_a_mapping = tmp_path / "list.json"
    not_a_mapping.write_text("[1, 2, 3]", encoding="utf-8")
    with pytest.raises(ValueError, match="Malformed vocabulary"):
        cls(vocab_file=str(not_a_mapping), merges_file=good_merges)

    bad_ids = tmp_path / "ids.json"
    bad_ids.write_text(json.dumps({"a": 0, "b": "one"}), encoding="utf-8")
    with pytest.raises(ValueError, match="Malformed vocabulary"):
        cls(vocab_file=str(bad_ids), merges_file=good_merges)

    bad_merges = tmp_path / "merges3.txt"
    bad_merges.write_text("#version: 0.2\nĠ t h\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"Malformed merges .*line 2"):
        cls(vocab_file=good_vocab, merges_file=str(bad_merges))

    unknown = tmp_path / "unknown.txt"
    unknown.write_text("#version: 0.2\nĠ t\nzz q\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        cls(vocab_file=good_vocab, merges_file=str(unknown))
