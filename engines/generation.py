"""The generation loop over any :class:`DecoderRuntime`: prefill, then token-by-token decode with the KV cache.

Batches are left-padded; position ids count real tokens only (as transformers does), so a padded row generates
exactly what it would alone. Stops per row on EOS, a stop string, ``max_new_tokens`` or the context length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .errors import EngineError
from .artifacts import DecoderSpec
from .runtime import DecoderRuntime
from .sampling import SamplingSettings, select_next_tokens

__all__ = ["GenerationSettings", "GenerationResult", "check_prompts", "generate", "left_pad"]


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 32
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    seed: int | None = 0
    eos_token_id: int | None = None  # None: the export's EOS; pass -1 to never stop on EOS (benchmarks)
    stop_strings: tuple[str, ...] = ()  # need ``decode``

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}.")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}.")
        if any(not s for s in self.stop_strings):
            raise ValueError("a stop string must not be empty (it would stop at once).")


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per row (stop string / EOS included, nothing after)
    finish_reasons: list[str]  # "eos" | "stop_string" | "length" | "context"
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int  # forward calls after the prefill

    @property
    def decode_tokens_per_second(self) -> float:
        """Aggregate decode throughput: tokens produced by decode steps across the batch, per second."""
        produced = self.decode_steps * len(self.tokens)
        return produced / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 (B, max_len), shorter prompts padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise EngineError("every prompt needs at least one token.")
    width = max(len(p) for p in prompts)
    input_ids = np.full((len(prompts), width), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = prompt
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def check_prompts(spec: DecoderSpec, prompts: Sequence[Sequence[int]]) -> None:
    """EngineError naming the prompt (and the id) that cannot run: empty, too long for the context, or an id
    outside the vocabulary. Cheap: call it before printing anything."""
    if not prompts:
        raise EngineError("no prompt given.")
    many = len(prompts) > 1
    for number, prompt in enumerate(prompts, start=1):
        which = f"prompt {number} of {len(prompts)}" if many else "the prompt"
        if len(prompt) == 0:
            raise EngineError(f"{which} is empty: every prompt needs at least one token.")
        if len(prompt) >= spec.max_sequence:
            raise EngineError(
                f"{which} has {len(prompt)} tokens but the model's context is {spec.max_sequence} tokens, leaving no "
                "room to generate. Shorten the prompt."
            )
        bad = next((t for t in prompt if not 0 <= t < spec.vocab_size), None)
        if bad is not None:
            raise EngineError(f"{which} has token id {bad}; ids must be in [0, {spec.vocab_size}).")


def generate(
    runtime: DecoderRuntime,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings = GenerationSettings(),
    *,
    on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> GenerationResult:
    """Generate for a batch of token-id prompts.

    ``on_tokens(tokens, active)`` is called after every step with the (B,) new tokens and which rows were still
    generating (for streaming). ``decode`` turns ids into text; it is needed for ``stop_strings``.
    """
    spec = runtime.spec
    if settings.stop_strings and decode is None:
        raise EngineError("stop strings need a tokenizer to decode the generated text.")
    check_prompts(spec, prompts)
    eos = spec.eos_token_id if settings.eos_token_id is None else settings.eos_token_id
    rng = np.random.default_rng(settings.seed)

    input_ids, attention_mask = left_pad(prompts, spec.pad_token_id)
    batch = input_ids.shape[0]
    seen = np.zeros((batch, spec.vocab_size), dtype=bool)
    np.put_along_axis(seen, input_ids, attention_mask.astype(bool), axis=-1)
    positions = np.maximum(attention_mask.cumsum(-1) - 1, 0)
    next_position = positions[:, -1] + 1

    generated: list[list[int]] = [[] for _ in range(batch)]
    reasons = ["length"] * batch
    active = np.ones(batch, dtype=bool)
    budget = min(settings.max_new_tokens, spec.max_sequence - input_ids.shape[1])

    started = time.perf_counter()
    out = runtime.step(input_ids, attention_mask, positions, runtime.empty_cache(batch))
    prefill_seconds = time.perf_counter() - started
    decode_steps = 0
    decode_started = time.perf_counter()
    for produced in range(budget):
        logits = out.logits
        if spec.emit_vocab_size is not None:  # padding rows of a Megatron vocabulary are never a token
            logits = logits.copy()
            logits[:, spec.emit_vocab_size:] = -np.inf
        tokens = select_next_tokens(logits, seen, settings.sampling, rng)
        tokens = np.where(active, tokens, spec.pad_token_id)
        was_active = active.copy()
        for row in np.flatnonzero(active):
            token = int(tokens[row])
            generated[row].append(token)
            seen[row, token] = True
            if token == eos:
                active[row], reasons[row] = False, "eos"
            elif settings.stop_strings and any(s in decode(generated[row]) for s in settings.stop_strings):
                active[row], reasons[row] = False, "stop_string"
        if on_tokens is not None:
            on_tokens(tokens, was_active)
        if not active.any() or produced == budget - 1:
            break
        attention_mask = np.concatenate([attention_mask, was_active[:, None].astype(np.int64)], axis=1)
        out = runtime.step(tokens[:, None].astype(np.int64), attention_mask, next_position[:, None], out.cache)
        next_position = next_position + 1
        decode_steps += 1
    decode_seconds = time.perf_counter() - decode_started
    if budget < settings.max_new_tokens:
        reasons = [r if r != "length" else "context" for r in reasons]
    return GenerationResult(generated, reasons, prefill_seconds, decode_seconds, decode_steps)
