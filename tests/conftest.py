"""Shared fixtures: tiny deterministic GPT-2 / GPTMeg pairs built in code (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config

# head_dim 24: 1/sqrt(24) is not a power of two, so fp16 score rounding differs between GPT-2 and GPTMeg.
SMALL = dict(
    n_embd=96,
    n_head=4,
    n_layer=2,
    vocab_size=120,
    n_positions=64,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    summary_first_dropout=0.0,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=1,
)


def gpt2_config(**overrides) -> GPT2Config:
    config = GPT2Config(**{**SMALL, "activation_function": "gelu_fast", **overrides})
    config._attn_implementation = "eager"  # GPT-2's reference path; GPTMeg follows eager semantics
    return config


def copy_into(gptmeg_cls, gpt2_model):
    """A GPTMeg model of class ``gptmeg_cls`` holding exactly the weights of ``gpt2_model``."""
    from gptmeg import GPTMegConfig

    config = GPTMegConfig.from_dict({k: v for k, v in gpt2_model.config.to_dict().items() if k != "model_type"})
    model = gptmeg_cls(config).eval()
    missing, unexpected = model.load_state_dict(gpt2_model.state_dict(), strict=True)
    assert not missing and not unexpected
    return model


@pytest.fixture
def left_padded_batch():
    """(input_ids, attention_mask): two rows, the first left-padded by 3 tokens."""
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(2, SMALL["vocab_size"], (2, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[0, :3] = SMALL["pad_token_id"]
    attention_mask[0, :3] = 0
    return input_ids, attention_mask


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory):
    """Exports of the built-in model, made once per test session: {"fp32": ExportResult, "fp16": ExportResult}."""
    from export import export_model

    root = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(dtype: str):
        if dtype not in cache:
            cache[dtype] = export_model(None, root / f"tiny-{dtype}", dtype=dtype)
        return cache[dtype]

    return get
