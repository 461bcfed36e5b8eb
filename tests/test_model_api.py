"""Auto-class registration, save/load, model parallelism on CPU devices, the built-in model, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from gptmeg import (
    CheckpointError,
    GPTMegConfig,
    GPTMegForSequenceClassification,
    GPTMegForTokenClassification,
    GPTMegLMHeadModel,
    GPTMegModel,
    GPTMegTokenizer,
    GPTMegTokenizerFast,
)
from gptmeg.parallel import balanced_device_map
from gptmeg.tiny import save_tiny_model, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_tiny_model_is_deterministic_and_shows_fp16_divergence():
    a, b = tiny_model(), tiny_model()
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name
    assert a.config.n_embd // a.config.n_head == 24  # 1/sqrt(24) is not a power of two
    assert not torch.equal(tiny_model(seed=1).lm_head.weight, a.lm_head.weight)


def test_auto_classes_load_saved_gptmeg(tiny_dir):
    assert type(AutoConfig.from_pretrained(tiny_dir)) is GPTMegConfig
    assert type(AutoModel.from_pretrained(tiny_dir)) is GPTMegModel
    assert type(AutoModelForCausalLM.from_pretrained(tiny_dir)) is GPTMegLMHeadModel
    assert type(AutoModelForSequenceClassification.from_pretrained(tiny_dir)) is GPTMegForSequenceClassification
    assert type(AutoModelForTokenClassification.from_pretrained(tiny_dir)) is GPTMegForTokenClassification
    assert type(AutoTokenizer.from_pretrained(tiny_dir)) is GPTMegTokenizerFast
    assert type(AutoTokenizer.from_pretrained(tiny_dir, use_fast=False)) in (GPTMegTokenizer, GPTMegTokenizerFast)


@torch.no_grad()
def test_save_load_round_trip_stores_tied_weights_once(tiny_dir, tmp_path):
    model = tiny_model()
    reloaded = GPTMegLMHeadModel.from_pretrained(tiny_dir).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids).logits, reloaded(input_ids).logits)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert json.loads((tiny_dir / "config.json").read_text())["model_type"] == "gptmeg"


def test_tiny_tokenizer_round_trips_text():
    tokenizer = tiny_tokenizer()
    text = "GPTMeg keeps fp16 fidelity. ¿Sí? 数字 123\n"
    ids = tokenizer(text)["input_ids"]
    assert max(ids) < tiny_model().config.vocab_size
    assert tokenizer.decode(ids) == text


@torch.no_grad()
def test_parallelize_on_cpu_devices_gives_identical_outputs():
    model = tiny_model()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    expected = model(input_ids, attention_mask=attention_mask).logits
    expected_tokens = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False)

    model.parallelize({"cpu": [0], "cpu:0": [1, 2]})  # two distinct torch devices, both CPU
    assert model.transformer.model_parallel
    assert model.transformer.device_map == {torch.device("cpu"): [0], torch.device("cpu", 0): [1, 2]}
    assert torch.equal(model(input_ids, attention_mask=attention_mask).logits, expected)
    tokens = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, expected_tokens)

    model.deparallelize()
    assert not model.transformer.model_parallel
    assert torch.equal(model(input_ids, attention_mask=attention_mask).logits, expected)


def test_balanced_device_map_and_bad_maps():
    assert balanced_device_map(5, ["cpu", "cuda:0"]) == {
        torch.device("cpu"): [0, 1, 2],
        torch.device("cuda", 0): [3, 4],
    }
    model = tiny_model()
    with pytest.raises(ValueError, match="exactly once"):
        model.parallelize({"cpu": [0, 1]})
    with pytest.raises(ValueError, match="in order"):
        model.parallelize({"cpu": [1, 2], "cpu:0": [0]})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no.*CUDA|none is visible"):
            model.parallelize()


def test_bad_config_errors():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPTMegConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="Unknown activation_function 'swishy'"):
        GPTMegConfig(activation_function="swishy")
    assert GPTMegConfig().activation_function == "gelu_fast"


def test_checkpoint_that_is_neither_gpt2_nor_gptmeg(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="'bert' checkpoint"):
        GPTMegLMHeadModel.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        GPTMegLMHeadModel.from_pretrained(tmp_path / "..")
    with pytest.raises(CheckpointError, match="not a directory"):
        GPTMegLMHeadModel.from_pretrained(tmp_path / "missing")


def test_sequence_longer_than_context_is_refused():
    model = tiny_model()
    too_long = torch.zeros(1, model.config.n_positions + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="n_positions=256"):
        model(too_long)
