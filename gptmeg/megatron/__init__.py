"""Megatron-LM and Megatron-DeepSpeed checkpoints in: layouts detected from the folder, shards merged by their
tensor-/pipeline-parallel rules, QKV reordered by checkpoint version, pickles read without running code.

    from gptmeg.megatron import convert, save_conversion, load_megatron_model
    python -m gptmeg.convert SRC OUT
"""

from .convert import (
    CONVERSION_FILE,
    Conversion,
    convert,
    is_conversion_folder,
    load_megatron_model,
    save_conversion,
)
from .errors import MegatronCheckpointError, UnsafeCheckpointError
from .layouts import find_source, is_megatron_checkpoint
from .unpickle import load_pt

__all__ = ["CONVERSION_FILE", "Conversion", "MegatronCheckpointError", "UnsafeCheckpointError", "convert",
           "find_source", "is_conversion_folder", "is_megatron_checkpoint", "load_megatron_model", "load_pt",
           "save_conversion"]
