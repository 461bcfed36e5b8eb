"""Post-export check: run the exported decoder in onnxruntime against the eager model on the same inputs.

Inputs: a batch with left padding, prefill from an empty past, then several decode steps fed with the returned
``present.*``. Metrics per output over real (non-padding) positions: max/mean abs error, NaN/Inf counts, and for
logits the top-1 agreement. Targets: fp32 max abs logits error <= 1e-4; fp16 no NaN/Inf, top-1 >= 99 %, max abs
<= 2 % of the reference logits' largest magnitude. (onnxruntime's CPU fp16 kernels round differently from eager
fp16 - about 1-2 fp16 ulps of the logit scale on a small random model - so fp16 on CPU is judged by these, not
bit-exactness.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gptmeg import GPTMegLMHeadModel
from gptmeg._compat import cache_tensors, output_cache

from .decoder import past_name, present_name


__all__ = ["OutputMetrics", "VerifyReport", "verify_export", "validation_inputs"]

FP32_MAX_ABS = 1e-4
FP16_TOP1 = 0.99
FP16_RELATIVE_MAX_ABS = 0.02


@dataclass
class OutputMetrics:
    name: str
    max_abs: float
    mean_abs: float
    nan: int
    inf: int
    count: int
    top1: float | None = None  # logits only
    reference_max: float | None = None


@dataclass
class VerifyReport:
    dtype: str
    provider: str
    reference_device: str
    outputs: list[OutputMetrics] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def validation_inputs(vocab_size: int, batch: int = 4, prompt: int = 48, pads=(0, 5, 2, 9), seed: int = 0):
    """Deterministic prompts: (input_ids, attention_mask), row i left-padded by pads[i] tokens."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, prompt), generator=generator)
    attention_mask = torch.ones(batch, prompt, dtype=torch.long)
    for row, pad in enumerate(pads[:batch]):
        attention_mask[row, :pad] = 0
        input_ids[row, :pad] = 0
    return input_ids, attention_mask


def _positions(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, -new:]


class _Accumulator:
    def __init__(self, name: str):
        self.name, self.diffs, self.refs, self.top1 = name, [], [], []
        self.nan = self.inf = 0

    def add(self, ours: np.ndarray, reference: np.ndarray, real: np.ndarray, logits: bool) -> None:
        ours64, ref64 = ours.astype(np.float64), reference.astype(np.float64)
        self.nan += int(np.isnan(ours64[real]).sum())
        self.inf += int(np.isinf(ours64[real]).sum())
        self.diffs.append(np.abs(ours64 - ref64)[real].ravel())
        self.refs.append(np.abs(ref64[real]).ravel())
        if logits:
            self.top1.append(ours64[real].argmax(-1) == ref64[real].argmax(-1))

    def metrics(self) -> OutputMetrics:
        diffs, refs = np.concatenate(self.diffs), np.concatenate(self.refs)
        finite = diffs[np.isfinite(diffs)]
        return OutputMetrics(
            name=self.name,
            max_abs=float(finite.max()) if finite.size else float("nan"),
            mean_abs=float(finite.mean()) if finite.size else float("nan"),
            nan=self.nan,
            inf=self.inf,
            count=int(diffs.size),
            top1=float(np.concatenate(self.top1).mean()) if self.top1 else None,
            reference_max=float(refs.max()) if refs.size else None,
        )


def verify_export(
    model: GPTMegLMHeadModel,
    run_onnx: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    *,
    dtype: str,
    provider: str,
    decode_steps: int = 4,
    seed: int = 0,
) -> VerifyReport:
    """Compare ``run_onnx`` (feeds -> outputs by name) with the eager ``model`` over prefill + decode steps."""
    config = model.config
    device = model.device
    n_layer, head_dim = config.n_layer, config.n_embd // config.n_head
    input_ids, attention_mask = validation_inputs(config.vocab_size, seed=seed)
    batch = input_ids.shape[0]
    np_dtype = np.float16 if dtype == "fp16" else np.float32

    logits_acc, present_acc = _Accumulator("logits"), _Accumulator("present.*")
    past = [np.zeros((batch, config.n_head, 0, head_dim), dtype=np_dtype) for _ in range(2 * n_layer)]
    eager_cache = None
    step_ids, mask = input_ids, attention_mask
    for step in range(decode_steps + 1):
        positions = _positions(mask, step_ids.shape[1])
        feeds = {
            "input_ids": step_ids.numpy(),
            "attention_mask": mask.numpy(),
            "position_ids": positions.numpy(),
            **{past_name(i): t for i, t in enumerate(past)},
        }
        outputs = run_onnx(feeds)
        with torch.no_grad():
            eager = model(
                step_ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=True,
                cache=eager_cache,
            )
        eager_cache = output_cache(eager)
        real_tokens = mask[:, -step_ids.shape[1]:].bool().numpy()  # (B, T)
        logits_acc.add(outputs["logits"], eager.logits.float().cpu().numpy(), real_tokens, logits=True)
        real_keys = mask.bool().numpy()[:, None, :, None]  # (B, 1, P+T, 1): padded cache slots are skipped
        for i, reference in enumerate(cache_tensors(eager_cache)):
            ours = outputs[present_name(i)]
            real = np.broadcast_to(real_keys, ours.shape)
            present_acc.add(ours, reference.float().cpu().numpy(), real, logits=False)
        past = [outputs[present_name(i)] for i in range(2 * n_layer)]
        next_tokens = eager.logits[:, -1].argmax(-1, keepdim=True).cpu()  # both sides get the same next token
        step_ids = next_tokens
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)

    report = VerifyReport(dtype=dtype, provider=provider, reference_device=str(device))
    report.outputs = [logits_acc.metrics(), present_acc.metrics()]
    logits = report.outputs[0]
    for metrics in report.outputs:
        if metrics.nan or metrics.inf:
            report.failures.append(f"{metrics.name}: {metrics.nan} NaN and {metrics.inf} Inf values")
    if dtype == "fp32":
        if not logits.max_abs <= FP32_MAX_ABS:
            report.failures.append(f"logits max abs error {logits.max_abs:.3g} > {FP32_MAX_ABS:g} (fp32 target)")
    else:
        if logits.top1 is None or logits.top1 < FP16_TOP1:
            report.failures.append(f"logits top-1 agreement {logits.top1:.2%} < {FP16_TOP1:.0%} (fp16 target)")
        limit = FP16_RELATIVE_MAX_ABS * (logits.reference_max or 0.0)
        if not logits.max_abs <= limit:
            report.failures.append(
                f"logits max abs error {logits.max_abs:.3g} > 2% of the largest reference logit ({limit:.3g})"
            )
    return report
