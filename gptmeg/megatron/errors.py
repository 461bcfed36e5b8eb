"""Errors of the Megatron converter: each message names what is wrong in the checkpoint and what to do."""

from __future__ import annotations

from ..checkpoint import CheckpointError

__all__ = ["MegatronCheckpointError", "UnsafeCheckpointError"]


class MegatronCheckpointError(CheckpointError):
    """A Megatron-LM / Megatron-DeepSpeed checkpoint that cannot be converted (incomplete, unsupported layout or
    architecture); nothing was written."""


class UnsafeCheckpointError(MegatronCheckpointError):
    """A checkpoint file asks the unpickler for something a checkpoint has no reason to hold (code to run)."""
