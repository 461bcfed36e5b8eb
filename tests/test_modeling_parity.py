"""fp32: GPTMeg computes what transformers' GPT-2 computes (same weights), for every head class."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2DoubleHeadsModel,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)

from gptmeg import (
    GPTMegDoubleHeadsModel,
    GPTMegForSequenceClassification,
    GPTMegForTokenClassification,
    GPTMegLMHeadModel,
    GPTMegModel,
)
from gptmeg._compat import CACHE_FIELD, cache_tensors
from tests.conftest import copy_into, gpt2_config

TOL = 1e-5
HEADS = [
    (GPT2Model, GPTMegModel, "last_hidden_state"),
    (GPT2LMHeadModel, GPTMegLMHeadModel, "logits"),
    (GPT2ForSequenceClassification, GPTMegForSequenceClassification, "logits"),
    (GPT2ForTokenClassification, GPTMegForTokenClassification, "logits"),
]


def _pair(gpt2_cls, gptmeg_cls, **config):
    torch.manual_seed(0)
    gpt2 = gpt2_cls(gpt2_config(**config)).eval()
    return gpt2, copy_into(gptmeg_cls, gpt2)


def _max_abs(a, b) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("gpt2_cls,gptmeg_cls,field", HEADS, ids=[h[1].__name__ for h in HEADS])
@torch.no_grad()
def test_head_matches_gpt2_fp32(gpt2_cls, gptmeg_cls, field, left_padded_batch):
    gpt2, ours = _pair(gpt2_cls, gptmeg_cls)
    input_ids, attention_mask = left_padded_batch
    kwargs = dict(attention_mask=attention_mask, output_hidden_states=True, output_attentions=True, use_cache=True)
    expected, actual = gpt2(input_ids, **kwargs), ours(input_ids, **kwargs)

    assert _max_abs(getattr(expected, field), getattr(actual, field)) <= TOL
    assert len(expected.hidden_states) == len(actual.hidden_states) == gpt2.config.n_layer + 1
    for e, a in zip(expected.hidden_states, actual.hidden_states):
        assert _max_abs(e, a) <= TOL
    if gpt2_cls is not GPT2ForTokenClassification:  # GPT-2's token classifier returns no cache
        for e, a in zip(cache_tensors(getattr(expected, CACHE_FIELD)), cache_tensors(getattr(actual, CACHE_FIELD))):
            assert _max_abs(e, a) <= TOL


@torch.no_grad()
def test_double_heads_match_gpt2_fp32():
    gpt2, ours = _pair(GPT2DoubleHeadsModel, GPTMegDoubleHeadsModel)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(2, 120, (2, 3, 7), generator=generator)  # (batch, choices, tokens)
    mc_token_ids = torch.tensor([[6, 4, 5], [2, 6, 6]])
    mc_labels = torch.tensor([1, 2])
    expected = gpt2(input_ids, mc_token_ids=mc_token_ids, mc_labels=mc_labels, labels=input_ids)
    actual = ours(input_ids, mc_token_ids=mc_token_ids, mc_labels=mc_labels, labels=input_ids)
    assert _max_abs(expected.logits, actual.logits) <= TOL
    assert _max_abs(expected.mc_logits, actual.mc_logits) <= TOL
    assert abs(float(expected.mc_loss - actual.mc_loss)) <= TOL
    assert abs(float(expected.loss - actual.loss)) <= TOL


@torch.no_grad()
def test_cached_continuation_matches_gpt2_and_full_pass(left_padded_batch):
    gpt2, ours = _pair(GPT2LMHeadModel, GPTMegLMHeadModel)
    input_ids, attention_mask = left_padded_batch
    prefix, rest = 6, input_ids.shape[1] - 6
    full = ours(input_ids, attention_mask=attention_mask).logits

    results = []
    for model in (gpt2, ours):
        first = model(input_ids[:, :prefix], attention_mask=attention_mask[:, :prefix], use_cache=True)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, prefix:]
        second = model(
            input_ids[:, prefix:],
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{CACHE_FIELD: getattr(first, CACHE_FIELD)},
        )
        results.append(second.logits)
        assert second.logits.shape == (2, rest, 120)
    assert _max_abs(results[0], results[1]) <= TOL
    # row 1 is unpadded: its cached continuation (default position ids) equals the full pass
    first = ours(input_ids[1:, :prefix], use_cache=True)
    second = ours(input_ids[1:, prefix:], use_cache=True, **{CACHE_FIELD: getattr(first, CACHE_FIELD)})
    assert _max_abs(second.logits[0], full[1, prefix:]) <= TOL


@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_greedy_generate_matches_gpt2(batch):
    gpt2, ours = _pair(GPT2LMHeadModel, GPTMegLMHeadModel)
    generator = torch.Generator().manual_seed(11 + batch)
    input_ids = torch.randint(2, 120, (batch, 6), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if batch > 1:
        input_ids[1, :2] = 0
        attention_mask[1, :2] = 0
    settings = dict(attention_mask=attention_mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    reference = gpt2.generate(input_ids, **settings)
    with_cache = ours.generate(input_ids, **settings)
    without_cache = ours.generate(input_ids, use_cache=False, **settings)
    assert torch.equal(reference, with_cache)
    assert torch.equal(with_cache, without_cache)


@torch.no_grad()
def test_gpt2_checkpoint_directory_loads_and_computes_gpt2(tmp_path, left_padded_batch):
    torch.manual_seed(5)
    config = gpt2_config(activation_function="gelu_new")  # GPT-2's own default activation
    gpt2 = GPT2LMHeadModel(config).eval()
    gpt2.save_pretrained(tmp_path)
    ours = GPTMegLMHeadModel.from_pretrained(tmp_path).eval()
    assert ours.config.model_type == "gptmeg"
    assert ours.config.activation_function == "gelu_new"
    input_ids, attention_mask = left_padded_batch
    expected = gpt2(input_ids, attention_mask=attention_mask).logits
    actual = ours(input_ids, attention_mask=attention_mask).logits
    assert _max_abs(expected, actual) <= TOL


@torch.no_grad()
def test_fp16_model_differs_from_gpt2_fp16():
    """Same weights in fp16: GPTMeg's rounding differs from GPT-2's (the divergences are live in the model)."""
    gpt2, ours = _pair(GPT2LMHeadModel, GPTMegLMHeadModel)
    gpt2, ours = gpt2.half(), ours.half()
    input_ids = torch.randint(2, 120, (2, 16), generator=torch.Generator().manual_seed(2))
    a, b = gpt2(input_ids).logits, ours(input_ids).logits
    assert not torch.equal(a, b)
    assert _max_abs(a.float(), b.float()) < 0.05 * float(a.float().abs().max())  # but the same model
