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
