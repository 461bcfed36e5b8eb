"""Build options of a TensorRT engine, checked against the export they are for."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..artifacts import DecoderSpec
from ..errors import EngineError

__all__ = ["BuildOptions"]


@dataclass(frozen=True)
class BuildOptions:
    max_batch: int = 8
    max_seq: int | None = None  # default: the model's context (n_positions)
    opt_batch: int = 1
    opt_seq: int | None = None  # default: min(128, max_seq)
    workspace_mib: int | None = None  # default: TensorRT's (all free device memory)

    def resolved(self, spec: DecoderSpec) -> "BuildOptions":
        """Defaults filled in from ``spec``, every bound checked; raises EngineError with what to change."""
        max_seq = spec.max_sequence if self.max_seq is None else self.max_seq
        opt_seq = min(128, max_seq) if self.opt_seq is None else self.opt_seq
        if not 2 <= max_seq <= spec.max_sequence:
            raise EngineError(f"--max-seq {max_seq} must be between 2 and the model's context {spec.max_sequence}.")
        if not 1 <= opt_seq < max_seq:
            raise EngineError(f"--opt-seq {opt_seq} must be between 1 and --max-seq - 1 ({max_seq - 1}).")
        if self.max_batch < 1 or not 1 <= self.opt_batch <= self.max_batch:
            raise EngineError(f"need 1 <= --opt-batch ({self.opt_batch}) <= --max-batch ({self.max_batch}).")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise EngineError(f"--workspace-mib must be >= 1, got {self.workspace_mib}.")
        return BuildOptions(self.max_batch, max_seq, self.opt_batch, opt_seq, self.workspace_mib)

    def to_dict(self) -> dict:
        return asdict(self)
