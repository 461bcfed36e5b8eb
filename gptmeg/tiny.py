"""The built-in default model: a deterministic tiny GPTMeg with a byte-level tokenizer, no download needed.

head_dim is 24: 1/sqrt(24) is not a power of two, so scaling before or after rounding gives different fp16
scores, and the fp16 divergences show. Weights are drawn from a fixed-seed generator in parameter-name order,
independent of transformers' initialisation code, so the model is the same for every transformers version.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .configuration_gptmeg import GPTMegConfig
from .modeling_gptmeg import GPTMegLMHeadModel
from .tokenization_gptmeg import GPTMegTokenizerFast, byte_level_vocab, write_byte_level_vocab

__all__ = ["TINY_SEED", "tiny_config", "tiny_model", "tiny_tokenizer", "save_tiny_model"]

TINY_SEED = 1234
TINY_NAME = "gptmeg-tiny"


def tiny_config(**overrides) -> GPTMegConfig:
    vocab, _ = byte_level_vocab()
    eos = vocab["<|endoftext|>"]
    settings = dict(
        vocab_size=len(vocab),
        n_positions=256,
        n_embd=96,
        n_layer=3,
        n_head=4,  # head_dim 24
        activation_function="gelu_fast",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        name_or_path=TINY_NAME,
    )
    settings.update(overrides)
    return GPTMegConfig(**settings)


@torch.no_grad()
def _fill_deterministically(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            value = 1.0 + 0.1 * noise  # LayerNorm gains near 1
        elif name.endswith(".bias"):
            value = 0.02 * noise
        elif name.endswith("wpe.weight"):
            value = 0.01 * noise
        else:
            value = 0.08 * noise  # large enough that logits spread over a few units
        param.copy_(value.to(param.dtype))


def tiny_model(seed: int = TINY_SEED, dtype: torch.dtype = torch.float32, **config_overrides) -> GPTMegLMHeadModel:
    """The built-in tiny GPTMeg LM in eval mode. Same seed, same weights, on every machine."""
    model = GPTMegLMHeadModel(tiny_config(**config_overrides))
    _fill_deterministically(model, seed)
    return model.to(dtype).eval()


def tiny_tokenizer() -> GPTMegTokenizerFast:
    """The tiny model's byte-level BPE tokenizer (256 bytes + a few merges + <|endoftext|>)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_byte_level_vocab(tmp)
        tokenizer = GPTMegTokenizerFast.from_pretrained(tmp)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_tiny_model(directory: str | os.PathLike, seed: int = TINY_SEED) -> Path:
    """Write the tiny model and its tokenizer as a normal checkpoint folder; returns the folder."""
    directory = Path(directory)
    tiny_model(seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
