"""GPT-2's surface, where GPTMeg lacked it: config overrides through from_pretrained, the question-answering head,
and a clear refusal of cross-attention inputs (instead of ignoring them)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForQuestionAnswering, GPT2ForQuestionAnswering

from gptmeg import GPTMegForQuestionAnswering, GPTMegForSequenceClassification, GPTMegLMHeadModel
from gptmeg.tiny import save_tiny_model
from tests.conftest import copy_into, gpt2_config


def test_from_pretrained_takes_config_overrides(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    model = GPTMegLMHeadModel.from_pretrained(folder, use_cache=False, output_attentions=True, dtype=torch.float16)
    assert model.config.use_cache is False and model.config.output_attentions is True
    assert model.dtype == torch.float16  # from_pretrained's own argument, not a config override
    classifier = GPTMegForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert classifier.config.num_labels == 3 and classifier.score.out_features == 3
    with torch.no_grad():
        assert classifier(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3)


def test_question_answering_head_equals_gpt2s(tmp_path):
    torch.manual_seed(0)
    gpt2 = GPT2ForQuestionAnswering(gpt2_config()).eval()
    ours = copy_into(GPTMegForQuestionAnswering, gpt2)
    ids = torch.randint(2, 120, (2, 9))
    starts, ends = torch.tensor([1, 3]), torch.tensor([4, 8])
    with torch.no_grad():
        expected = gpt2(ids, start_positions=starts, end_positions=ends)
        got = ours(ids, start_positions=starts, end_positions=ends)
    assert torch.equal(got.start_logits, expected.start_logits)
    assert torch.equal(got.end_logits, expected.end_logits)
    assert torch.equal(got.loss, expected.loss)
    ours.save_pretrained(tmp_path / "qa")
    assert isinstance(AutoModelForQuestionAnswering.from_pretrained(tmp_path / "qa"), GPTMegForQuestionAnswering)


def test_cross_attention_inputs_are_refused():
    torch.manual_seed(0)
    model = copy_into(GPTMegLMHeadModel, __import__("transformers").GPT2LMHeadModel(gpt2_config()).eval())
    with pytest.raises(ValueError, match="without cross-attention"):
        model(torch.tensor([[5, 6]]), encoder_hidden_states=torch.zeros(1, 3, 96))


def test_packed_sequences_longer_than_the_context_run_like_gpt2():
    """Two documents packed in one row, positions restarting at 0: the row (100 tokens) is longer than n_positions
    (64) but no position reaches it. GPT-2 accepts it; so does GPTMeg, with the same logits."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(gpt2_config()).eval()
    ours = copy_into(GPTMegLMHeadModel, gpt2)
    ids = torch.randint(2, 120, (1, 100))
    positions = torch.cat([torch.arange(50), torch.arange(50)])[None]
    with torch.no_grad():
        # fp32 parity limit of the suite: 1e-5 (measured 4.8e-7; baddbmm and GPT-2's matmul accumulate differently)
        difference = (ours(ids, position_ids=positions).logits - gpt2(ids, position_ids=positions).logits).abs()
        assert float(difference.max()) <= 1e-5
        with pytest.raises(ValueError, match="position_ids reach 64"):
            ours(ids[:, :65], position_ids=torch.arange(65)[None])
        with pytest.raises(ValueError, match="Sequence too long"):
            ours(ids[:, :65])


def test_past_key_values_keyword_warns_as_gpt2_does():
    import warnings

    from transformers import GPT2LMHeadModel
    from transformers.cache_utils import DynamicCache

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(gpt2_config()).eval()
    ours = copy_into(GPTMegLMHeadModel, gpt2)

    def warned(model) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                model(torch.tensor([[5, 6]]), past_key_values=DynamicCache(config=model.config), use_cache=True)
        return any("past_key_values" in str(w.message) for w in caught)

    assert warned(ours) == warned(gpt2)


SELECTIONS = [True, False, 0, [0], 1, -1, [0, 2], [-2, 0], [2, 2]]


@pytest.mark.parametrize("selection", SELECTIONS, ids=[str(s) for s in SELECTIONS])
@torch.no_grad()
def test_output_hidden_states_selects_layers_as_gpt2(selection):
    """output_hidden_states=True returns every layer; an index or a list of indices (negative ones counted from the
    end) keeps those and leaves None in the others - whatever GPT-2 returns for the same selection."""
    from transformers import GPT2LMHeadModel, GPT2Model

    from gptmeg import GPTMegModel

    torch.manual_seed(0)
    ids = torch.randint(2, 120, (2, 9))
    for gpt2_cls, gptmeg_cls in ((GPT2Model, GPTMegModel), (GPT2LMHeadModel, GPTMegLMHeadModel)):
        gpt2 = gpt2_cls(gpt2_config(n_layer=3)).eval()
        ours = copy_into(gptmeg_cls, gpt2)
        try:
            expected = gpt2(ids, output_hidden_states=selection, output_attentions=True)
        except Exception as refusal:  # noqa: BLE001 - older transformers refuse some selections for some heads
            with pytest.raises(type(refusal)):
                ours(ids, output_hidden_states=selection, output_attentions=True)
            continue
        got = ours(ids, output_hidden_states=selection, output_attentions=True)
        if selection is False or selection == 0:  # GPT-2 reads the index 0 as False: no hidden states; so does GPTMeg
            assert expected.hidden_states is None and got.hidden_states is None
            continue
        # what GPT-2 returns for this selection (transformers 5.24: every layer's slot, None where not selected;
        # 5.17 returns only the selected layers for a list, every layer for an int)
        assert [h is None for h in got.hidden_states] == [h is None for h in expected.hidden_states]
        for a, b in zip(expected.hidden_states, got.hidden_states):
            if a is not None:
                assert float((a - b).abs().max()) <= 1e-5
        assert len(got.attentions) == len(expected.attentions) == 3
        for a, b in zip(expected.attentions, got.attentions):
            assert float((a - b).abs().max()) <= 1e-5
        # the same from the config, and as a tuple (where the config takes a selection: transformers 5.17's refuses)
        try:
            ours.config.output_hidden_states = selection
        except Exception as refusal:  # noqa: BLE001
            with pytest.raises(type(refusal)):
                gpt2.config.output_hidden_states = selection
            continue
        as_tuple = ours(ids, return_dict=False)
        assert [h is None for h in as_tuple[-1]] == [h is None for h in expected.hidden_states]


@torch.no_grad()
def test_reorder_and_upcast_attn_is_gpt2s():
    """config.reorder_and_upcast_attn: Q and K upcast to fp32, baddbmm and softmax in fp32 - GPT-2's meaning. In fp16
    GPTMeg's attention then equals GPT-2's bit for bit, and differs from GPTMeg's default (scores rounded once)."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    from gptmeg.modeling_gptmeg import GPTMegAttention

    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 96).half()
    causal = torch.zeros(9, 9).masked_fill(~torch.tril(torch.ones(9, 9, dtype=torch.bool)), -65504.0)
    mask = causal.half()[None, None]
    outputs = {}
    for upcast in (True, False):
        config = gpt2_config(reorder_and_upcast_attn=upcast)
        reference = GPT2Attention(config, layer_idx=1).half().eval()
        ours = GPTMegAttention(config, layer_idx=1).half().eval()
        ours.load_state_dict(reference.state_dict())
        outputs[upcast] = ours(hidden, mask, None)
        if upcast:
            expected = reference(hidden, attention_mask=mask)
            assert torch.equal(outputs[upcast][0], expected[0]) and torch.equal(outputs[upcast][1], expected[1])
    assert not torch.equal(outputs[True][1], outputs[False][1])

    # whole models in fp32: GPT-2 with the flag (1e-5, the suite's fp32 limit)
    from transformers import GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(gpt2_config(reorder_and_upcast_attn=True)).eval()
    model = copy_into(GPTMegLMHeadModel, gpt2)
    assert model.config.reorder_and_upcast_attn is True
    ids = torch.randint(2, 120, (2, 9))
    assert float((model(ids).logits - gpt2(ids).logits).abs().max()) <= 1e-5
