"""The few places where transformers 5.17 and later 5.x releases spell things differently."""

from __future__ import annotations

from dataclasses import fields

from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

# transformers renamed `past_key_values` to `cache` (kwarg and output field) during 5.x.
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithCrossAttentions)} else "past_key_values"


def pick_cache(cache, past_key_values):
    """The cache a caller passed under either name; both at once is an error."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the KV cache once: either `cache` or `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


def output_cache(output):
    """The KV cache of a model output, whatever this transformers version names the field."""
    return getattr(output, CACHE_FIELD)


def cache_tensors(cache) -> list:
    """[key_0, value_0, key_1, value_1, ...] of a DynamicCache, each (B, H, P, D)."""
    return [t for layer in cache.layers for t in (layer.keys, layer.values)]


def deprecated_past_key_values(forward):
    """Wrap a forward with GPT-2's own deprecation of the ``past_key_values`` keyword, on the transformers versions
    that renamed it to ``cache`` (GPT-2 warns there; on earlier versions neither does)."""
    if CACHE_FIELD != "cache":
        return forward
    from transformers.utils.deprecation import deprecate_kwarg

    return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)
