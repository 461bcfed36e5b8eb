"""Run an exported decoder against the eager model on the same inputs, and measure how far apart they are.

:func:`compare_decoder` is the harness: a left-padded batch is prefilled from an empty past, then decoded for
several steps, each side feeding back its own cache (``present.*`` for the graph, a ``DynamicCache`` for eager) and
both receiving the same next token (the reference's greedy choice). Metrics per output over real (non-padding)
positions: max / mean / p99 abs error, max / mean relative error (denominators floored at 0.1 % of the output's largest magnitude), NaN/Inf counts, the worst element; for logits
the top-1 agreement and top-5 overlap.

:func:`verify_export` is the post-export check built on it. Targets: fp32 max abs logits error <= 1e-4; fp16 no
NaN/Inf, top-1 >= 99 % counting near-ties as agreement, max abs <= 2 % of the reference logits' largest
magnitude. A near-tie is a position where the graph picks another token than the reference but the reference
scores that token within ``FP16_TIE_ULPS`` fp16 ulps of its own top logit: a gap fp16 rounding alone can close
(seen on an H200: a tiny model's random-token rows agreed 98.96 % with eager CUDA fp16 at a 0.0049 max abs error). (onnxruntime's CPU fp16
kernels round differently from eager fp16 - about 1-2 fp16 ulps of the logit scale on a small random model - so
fp16 on CPU is judged by these, not bit-exactness.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch

from gptmeg import GPTMegLMHeadModel
from gptmeg._compat import cache_tensors, output_cache

from .io_names import past_name, present_name
from .report import top1_text

__all__ = [
    "OutputMetrics",
    "VerifyReport",
    "compare_decoder",
    "verify_export",
    "validation_inputs",
    "position_ids",
    "export_tolerance_failures",
]

VERIFY_PROMPT = 48  # tokens per row of the post-export check (fewer when the context is shorter)
FP32_MAX_ABS = 1e-4
FP16_TOP1 = 0.99
FP16_TIE_ULPS = 4  # a reference top-1 margin this many fp16 ulps wide or less is a near-tie
FP16_RELATIVE_MAX_ABS = 0.02
GraphRunner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class OutputMetrics:
    name: str
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    mean_rel: float
    nan: int
    inf: int
    count: int
    worst: dict  # where max_abs occurs: {"step": k, "index": [...], "value": x, "reference": y}
    reference_max: float
    top1: float | None = None  # logits only: share of positions whose argmax agrees
    top1_near_ties: int | None = None  # logits only: disagreements within FP16_TIE_ULPS of the reference's top logit
    top5_overlap: float | None = None  # logits only: mean |top5(ours) & top5(ref)| / 5
    top1_positions: int | None = None  # logits only: positions compared

    @property
    def top1_tie_aware(self) -> float | None:
        """Top-1 agreement counting near-ties as agreement."""
        if self.top1 is None or not self.top1_positions:
            return self.top1
        return self.top1 + (self.top1_near_ties or 0) / self.top1_positions


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

    def output(self, name: str) -> OutputMetrics:
        return next(m for m in self.outputs if m.name == name)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def validation_inputs(vocab_size: int, batch: int = 4, prompt: int = 48, pads=(0, 5, 2, 9), seed: int = 0):
    """Deterministic random prompts: (input_ids, attention_mask), row i left-padded by pads[i % len(pads)]."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, prompt), generator=generator)
    attention_mask = torch.ones(batch, prompt, dtype=torch.long)
    for row in range(batch):
        pad = min(pads[row % len(pads)], prompt - 1)
        attention_mask[row, :pad] = 0
        input_ids[row, :pad] = 0
    return input_ids, attention_mask


def position_ids(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    """Positions of the last ``new`` tokens, counting real tokens only (transformers' convention)."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)[:, -new:]


class _Accumulator:
    """Collects (ours, reference) pairs over steps for one output and reduces them to OutputMetrics."""

    def __init__(self, name: str, logits: bool):
        self.name, self.logits = name, logits
        self.diffs, self.rels, self.refs, self.top1, self.top5, self.ties = [], [], [], [], [], []
        self.nan = self.inf = 0
        self.worst = {"step": None, "index": None, "value": None, "reference": None}
        self._worst_abs = -1.0

    def add(self, step: int, ours: np.ndarray, reference: np.ndarray, real: np.ndarray) -> None:
        ours64, ref64 = ours.astype(np.float64), reference.astype(np.float64)
        real = np.broadcast_to(real, ours.shape)
        self.nan += int(np.isnan(ours64[real]).sum())
        self.inf += int(np.isinf(ours64[real]).sum())
        diff = np.where(real, np.abs(ours64 - ref64), 0.0)
        finite = np.where(np.isfinite(diff), diff, -1.0)
        index = np.unravel_index(int(finite.argmax()), diff.shape)
        if finite[index] > self._worst_abs:
            self._worst_abs = float(finite[index])
            self.worst = {"step": step, "index": [int(i) for i in index], "value": float(ours64[index]),
                          "reference": float(ref64[index])}
        self.diffs.append(diff[real])
        self.refs.append(np.abs(ref64[real]))
        magnitude = np.abs(ref64[real])
        floor = 1e-3 * magnitude.max() if magnitude.size else 1.0  # relative error below 0.1% of the scale is noise
        self.rels.append(diff[real] / np.maximum(magnitude, max(floor, 1e-30)))
        if self.logits:
            rows = real.all(axis=-1)  # (B, T) real positions
            o, r = ours64[rows], ref64[rows]  # (N, V)
            ours_top, ref_top = o.argmax(-1), r.argmax(-1)
            self.top1.append(ours_top == ref_top)
            self.ties.append(_near_ties(r, ours_top, ref_top))
            o5, r5 = np.argsort(-o, axis=-1)[:, :5], np.argsort(-r, axis=-1)[:, :5]
            self.top5.append(np.array([len(set(a) & set(b)) / 5 for a, b in zip(o5, r5)]))

    def metrics(self) -> OutputMetrics:
        diffs, refs, rels = (np.concatenate(x) for x in (self.diffs, self.refs, self.rels))
        finite, finite_rel = diffs[np.isfinite(diffs)], rels[np.isfinite(rels)]
        nan = float("nan")
        return OutputMetrics(
            name=self.name,
            max_abs=float(finite.max()) if finite.size else nan,
            mean_abs=float(finite.mean()) if finite.size else nan,
            p99_abs=float(np.percentile(finite, 99)) if finite.size else nan,
            max_rel=float(finite_rel.max()) if finite_rel.size else nan,
            mean_rel=float(finite_rel.mean()) if finite_rel.size else nan,
            nan=self.nan,
            inf=self.inf,
            count=int(diffs.size),
            worst=self.worst,
            reference_max=float(refs.max()) if refs.size else nan,
            top1=float(np.concatenate(self.top1).mean()) if self.top1 else None,
            top5_overlap=float(np.concatenate(self.top5).mean()) if self.top5 else None,
            top1_near_ties=int(np.concatenate(self.ties).sum()) if self.ties else None,
            top1_positions=int(sum(len(t) for t in self.top1)) if self.top1 else None,
        )


def _near_ties(reference: np.ndarray, ours_top: np.ndarray, ref_top: np.ndarray) -> np.ndarray:
    """(N,) bool: the graph's pick differs, yet the reference scores it within FP16_TIE_ULPS fp16 ulps of the
    reference's own top logit."""
    rows = np.arange(len(reference))
    best, picked = reference[rows, ref_top], reference[rows, ours_top]
    band = FP16_TIE_ULPS * np.spacing(np.abs(best).astype(np.float16)).astype(np.float64)
    return (ours_top != ref_top) & (best - picked <= band)


def compare_decoder(
    model: GPTMegLMHeadModel,
    run_graph: GraphRunner,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    graph_dtype: str,
    decode_steps: int = 4,
) -> list[OutputMetrics]:
    """Metrics of ``logits`` and ``present.*`` (all layers together) between the graph and the eager model."""
    config = model.config
    device = model.device
    n_layer, head_dim = config.n_layer, config.n_embd // config.n_head
    batch = input_ids.shape[0]
    np_dtype = np.float16 if graph_dtype == "fp16" else np.float32

    logits_acc, present_acc = _Accumulator("logits", logits=True), _Accumulator("present.*", logits=False)
    past = [np.zeros((batch, config.n_head, 0, head_dim), dtype=np_dtype) for _ in range(2 * n_layer)]
    eager_cache = None
    step_ids, mask = input_ids, attention_mask
    for step in range(decode_steps + 1):
        positions = position_ids(mask, step_ids.shape[1])
        feeds = {
            "input_ids": step_ids.numpy(),
            "attention_mask": mask.numpy(),
            "position_ids": positions.numpy(),
            **{past_name(i): t for i, t in enumerate(past)},
        }
        outputs = run_graph(feeds)
        with torch.no_grad():
            eager = model(step_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                          use_cache=True, cache=eager_cache)
        eager_cache = output_cache(eager)
        real_tokens = mask[:, -step_ids.shape[1]:].bool().numpy()[:, :, None]  # (B, T, 1)
        logits_acc.add(step, outputs["logits"], eager.logits.float().cpu().numpy(), real_tokens)
        real_keys = mask.bool().numpy()[:, None, :, None]  # (B, 1, P+T, 1): padded cache slots are skipped
        for i, reference in enumerate(cache_tensors(eager_cache)):
            present_acc.add(step, outputs[present_name(i)], reference.float().cpu().numpy(), real_keys)
        past = [outputs[present_name(i)] for i in range(2 * n_layer)]
        step_ids = eager.logits[:, -1].argmax(-1, keepdim=True).cpu()  # both sides get the same next token
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
    return [logits_acc.metrics(), present_acc.metrics()]


def export_tolerance_failures(metrics: list[OutputMetrics], graph_dtype: str) -> list[str]:
    """The post-export targets (see module docstring), as failure sentences; empty when all are met."""
    failures = [f"{m.name}: {m.nan} NaN and {m.inf} Inf values" for m in metrics if m.nan or m.inf]
    logits = next(m for m in metrics if m.name == "logits")
    if graph_dtype == "fp32":
        if not logits.max_abs <= FP32_MAX_ABS:
            failures.append(f"logits max abs error {logits.max_abs:.3g} > {FP32_MAX_ABS:g} (fp32 target)")
    else:
        if logits.top1 is None or logits.top1_tie_aware < FP16_TOP1:
            agreement = top1_text(logits.top1, logits.top1_near_ties, logits.top1_positions)
            failures.append(f"logits top-1 agreement {agreement} < {FP16_TOP1:.0%} (fp16 target)")
        limit = FP16_RELATIVE_MAX_ABS * logits.reference_max
        if not logits.max_abs <= limit:
            failures.append(f"logits max abs error {logits.max_abs:.3g} > 2% of the largest reference logit "
                            f"({limit:.3g})")
    return failures


def verify_export(
    model: GPTMegLMHeadModel,
    run_graph: GraphRunner,
    *,
    dtype: str,
    provider: str,
    decode_steps: int = 4,
    seed: int = 0,
) -> VerifyReport:
    """The post-export check: ``run_graph`` vs the eager ``model`` (same dtype) on the standard inputs, shortened
    to fit the model's context (``n_positions``) when it is below 48 prompt tokens + the decode steps."""
    context = model.config.n_positions
    decode_steps = min(decode_steps, max(0, context - 2))
    prompt = min(VERIFY_PROMPT, context - decode_steps)
    input_ids, attention_mask = validation_inputs(model.config.vocab_size, prompt=prompt, seed=seed)
    metrics = compare_decoder(model, run_graph, input_ids, attention_mask, graph_dtype=dtype,
                              decode_steps=decode_steps)
    report = VerifyReport(dtype=dtype, provider=provider, reference_device=str(model.device), outputs=metrics)
    report.failures = export_tolerance_failures(metrics, dtype)
    return report
