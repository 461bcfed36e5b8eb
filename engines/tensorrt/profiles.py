"""Optimization profiles of the decoder with KV cache: one for prefill, one for decode.

prefill (profile 0): past length 0, 1..max_seq new tokens (opt: opt_seq);
decode  (profile 1): 1 new token, past length 1..max_seq-1 (opt: opt_seq).
Batch 1..max_batch (opt: opt_batch) in both. The attention mask spans past + new tokens.
"""

from __future__ import annotations

from ..artifacts import DecoderSpec
from .options import BuildOptions

__all__ = ["PREFILL", "DECODE", "Shape", "decoder_profiles", "profile_for"]

PREFILL, DECODE = 0, 1
Shape = tuple[int, ...]


def _profile(spec: DecoderSpec, batch: Shape, new: Shape, past: Shape) -> dict[str, tuple[Shape, Shape, Shape]]:
    """{input name: (min, opt, max)} for given (min, opt, max) batch, new-token and past lengths."""
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for name in ("input_ids", "position_ids"):
        shapes[name] = tuple((b, n) for b, n in zip(batch, new))
    shapes["attention_mask"] = tuple((b, p + n) for b, n, p in zip(batch, new, past))
    for name in spec.past_names():
        shapes[name] = tuple((b, spec.n_head, p, spec.head_dim) for b, p in zip(batch, past))
    return shapes


def decoder_profiles(spec: DecoderSpec, options: BuildOptions) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    o = options.resolved(spec)
    batch = (1, o.opt_batch, o.max_batch)
    prefill = _profile(spec, batch, new=(1, o.opt_seq, o.max_seq), past=(0, 0, 0))
    decode = _profile(spec, batch, new=(1, 1, 1), past=(1, o.opt_seq, o.max_seq - 1))
    return [prefill, decode]


def profile_for(past_length: int, new_tokens: int) -> int:
    """Which profile serves a call: prefill from an empty past, or one token on a non-empty past."""
    if past_length == 0:
        return PREFILL
    if new_tokens == 1:
        return DECODE
    from ..errors import EngineError

    raise EngineError(
        f"the TensorRT engine has a prefill profile (empty past) and a decode profile (one new token); a call with "
        f"{new_tokens} new tokens on a past of {past_length} fits neither."
    )
