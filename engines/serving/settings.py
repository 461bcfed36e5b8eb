"""From a request's generation fields to :class:`ChoiceSettings`, the same for every front end (``engines serve``'s
``/v1/completions`` and the Triton model): OpenAI's defaults and vLLM's context-length rule."""

from __future__ import annotations

from typing import Sequence

from ..sampling import SamplingSettings
from .scheduler import ChoiceSettings

__all__ = ["ContextOverflow", "choice_settings"]


class ContextOverflow(ValueError):
    """The prompt, or the prompt plus ``max_tokens``, does not fit the context (vLLM's message)."""

    def __init__(self, context: int, prompt: int, completion: int):
        super().__init__(
            f"This model's maximum context length is {context} tokens. However, you requested {prompt + completion} "
            f"tokens ({prompt} in the messages, {completion} in the completion). Please reduce the length of the "
            "messages or completion.")


def choice_settings(
    longest_prompt: int,
    context: int,
    *,
    max_tokens: int | None = None,
    default_max_tokens: int = 16,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
) -> ChoiceSettings:
    """Settings for prompts of at most ``longest_prompt`` tokens. ``max_tokens`` omitted: ``default_max_tokens`` (16,
    OpenAI's) cut to the room left; given, prompt + max_tokens over the context is a :class:`ContextOverflow`.
    ``temperature`` omitted samples at 1.0 (OpenAI's default), 0 is greedy; ``top_k`` 0 or -1 is off. A bad value
    is a ValueError saying which."""
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
    if longest_prompt >= context:
        raise ContextOverflow(context, longest_prompt, max_tokens or 1)
    if max_tokens is None:
        max_tokens = min(default_max_tokens, context - longest_prompt)
    elif longest_prompt + max_tokens > context:
        raise ContextOverflow(context, longest_prompt, max_tokens)
    temperature = 1.0 if temperature is None else temperature
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    sampling = SamplingSettings(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=top_k if top_k and top_k > 0 else 0,
        top_p=1.0 if top_p is None else top_p,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
    )
    return ChoiceSettings(max_new_tokens=max_tokens, sampling=sampling, seed=seed, stop=tuple(stop),
                          ignore_eos=ignore_eos)
