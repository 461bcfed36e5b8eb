"""GPTMeg configuration: GPT-2's config with Megatron's GELU as the default activation."""

from __future__ import annotations

from transformers import GPT2Config
from transformers.activations import ACT2CLS

__all__ = ["GPTMegConfig", "MEGATRON_GELU"]

MEGATRON_GELU = "gelu_fast"
"""Activation name that means Megatron's GELU in GPTMeg (converted Megatron checkpoints use it)."""


class GPTMegConfig(GPT2Config):
    """Configuration of a GPTMeg model. Same fields and meaning as ``GPT2Config`` except:

    - ``model_type`` is ``"gptmeg"``;
    - ``activation_function`` defaults to ``"gelu_fast"``, which GPTMeg computes as Megatron's fused GELU
      (fp32, one rounding); every other name keeps transformers' meaning.
    """

    model_type = "gptmeg"
    activation_function: str = MEGATRON_GELU

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._check_gptmeg()

    def _check_gptmeg(self) -> None:
        if self.n_head <= 0 or self.n_embd <= 0 or self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be a positive multiple of n_head ({self.n_head}): each attention "
                "head gets n_embd / n_head channels. Change n_embd or n_head."
            )
        if self.activation_function != MEGATRON_GELU and self.activation_function not in ACT2CLS:
            known = ", ".join(sorted(ACT2CLS))
            raise ValueError(
                f"Unknown activation_function {self.activation_function!r}. Use {MEGATRON_GELU!r} (Megatron's GELU, "
                f"the GPTMeg default) or one of transformers' activations: {known}."
            )
        if self.add_cross_attention:
            raise ValueError(
                "GPTMeg is a decoder-only model and has no cross-attention: set add_cross_attention=False."
            )
