"""GPTMeg: GPT-2 with Megatron-DeepSpeed's fp16 numerics (fp32 LayerNorm, Megatron GELU, baddbmm attention).

Importing this package registers the classes with transformers' Auto classes (model_type "gptmeg").
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from .checkpoint import CheckpointError, load_config
from .configuration_gptmeg import MEGATRON_GELU, GPTMegConfig
from .loading import IncompleteCheckpointError, LoadReport, load_pretrained
from .modeling_gptmeg import (
    GPTMegDoubleHeadsModel,
    GPTMegDoubleHeadsModelOutput,
    GPTMegForQuestionAnswering,
    GPTMegForSequenceClassification,
    GPTMegForTokenClassification,
    GPTMegLMHeadModel,
    GPTMegModel,
    GPTMegPreTrainedModel,
)
from .tokenization_gptmeg import GPTMegTokenizer, GPTMegTokenizerFast

__version__ = "0.1.0"

__all__ = [
    "MEGATRON_GELU",
    "CheckpointError",
    "IncompleteCheckpointError",
    "LoadReport",
    "GPTMegConfig",
    "GPTMegTokenizer",
    "GPTMegTokenizerFast",
    "GPTMegPreTrainedModel",
    "GPTMegModel",
    "GPTMegLMHeadModel",
    "GPTMegDoubleHeadsModel",
    "GPTMegDoubleHeadsModelOutput",
    "GPTMegForQuestionAnswering",
    "GPTMegForSequenceClassification",
    "GPTMegForTokenClassification",
    "load_config",
    "load_pretrained",
]


def _register_auto_classes() -> None:
    AutoConfig.register(GPTMegConfig.model_type, GPTMegConfig, exist_ok=True)
    AutoModel.register(GPTMegConfig, GPTMegModel, exist_ok=True)
    AutoModelForCausalLM.register(GPTMegConfig, GPTMegLMHeadModel, exist_ok=True)
    AutoModelForSequenceClassification.register(GPTMegConfig, GPTMegForSequenceClassification, exist_ok=True)
    AutoModelForQuestionAnswering.register(GPTMegConfig, GPTMegForQuestionAnswering, exist_ok=True)
    AutoModelForTokenClassification.register(GPTMegConfig, GPTMegForTokenClassification, exist_ok=True)
    AutoTokenizer.register(
        GPTMegConfig, slow_tokenizer_class=GPTMegTokenizer, fast_tokenizer_class=GPTMegTokenizerFast, exist_ok=True
    )


_register_auto_classes()
