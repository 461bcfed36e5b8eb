"""The parity harness: every backend against the eager reference, on real prompts and generated token batches.

For each case (a left-padded batch), the backend and the reference run prefill from an empty past and then
``decode_steps`` decode steps, each side chaining its own cache (:func:`export.verify.compare_decoder`). Greedy
generation then runs through the same loop (:func:`engines.generate`) for both, and the exact-match prefix of the
generated tokens is measured. When logits fail their tolerance, :mod:`validate.localize` names the first block and
site that diverges.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engines import GenerationSettings, generate, left_pad
from engines.runtime import DecoderRuntime
from export.precision_plan import ContractReport
from export.verify import OutputMetrics, compare_decoder, export_tolerance_failures, validation_inputs
from gptmeg import GPTMegLMHeadModel

from .eager_runtime import EagerDecoder
from .localize import Localization, localize
from .polygraphy_check import polygraphy_check

__all__ = ["Case", "CaseResult", "GenerationMatch", "BackendResult", "ParityReport", "tolerance_failures",
           "build_cases", "run_parity", "DEFAULT_PROMPTS"]

DEFAULT_PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "In 1905, Albert Einstein published four papers that changed physics:",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Megatron-DeepSpeed trains large language models with tensor and pipeline parallelism",
    "¿Dónde está la biblioteca? 图书馆在哪里？",
    "Once upon a time",
)
PRESENT_RELATIVE = {"fp32": 1e-5, "fp16": 0.02}


@dataclass
class Case:
    name: str
    input_ids: torch.Tensor  # (B, T), left-padded
    attention_mask: torch.Tensor  # (B, T)


@dataclass
class CaseResult:
    case: str
    outputs: list[OutputMetrics]
    failures: list[str]


@dataclass
class GenerationMatch:
    new_tokens: int
    prefix_lengths: list[int]  # per row: how many generated tokens equal the reference's before the first miss

    @property
    def mean_prefix(self) -> float:
        return sum(self.prefix_lengths) / len(self.prefix_lengths)

    @property
    def exact(self) -> bool:
        return all(n == self.new_tokens for n in self.prefix_lengths)


@dataclass
class BackendResult:
    backend: str
    cases: list[CaseResult] = field(default_factory=list)
    generation: GenerationMatch | None = None
    localization: Localization | None = None
    polygraphy: dict | None = None  # teacher-forced per-step check through Polygraphy's Comparator

    @property
    def failures(self) -> list[str]:
        failures = [f"{c.case}: {f}" for c in self.cases for f in c.failures]
        if self.polygraphy and self.polygraphy.get("available") and not self.polygraphy["passed"]:
            broken = [name for name, o in self.polygraphy["outputs"].items() if not o["passed"]]
            failures.append(f"teacher-forced step check (Polygraphy): {', '.join(broken)} outside tolerance")
        return failures

    @property
    def ok(self) -> bool:
        return not self.failures


@dataclass
class ParityReport:
    export_dir: str
    graph_dtype: str
    reference: str
    contract: ContractReport
    backends: list[BackendResult] = field(default_factory=list)
    ablation: list[dict] | None = None
    changed_files: list[str] = field(default_factory=list)  # files that differ from the export's manifest
    graph: str | None = None  # the ONNX file validated, when it is not the folder's own model.onnx

    @property
    def ok(self) -> bool:
        return self.contract.ok and all(b.ok for b in self.backends)

    def to_dict(self) -> dict:
        return {
            "export_dir": self.export_dir,
            "graph_dtype": self.graph_dtype,
            "reference": self.reference,
            "graph": self.graph,
            "changed_files": self.changed_files,
            "ok": self.ok,
            "contract": self.contract.to_dict(),
            "backends": [
                {
                    "backend": b.backend,
                    "ok": b.ok,
                    "failures": b.failures,
                    "cases": [{"case": c.case, "failures": c.failures, "outputs": [asdict(m) for m in c.outputs]}
                              for c in b.cases],
                    "generation": None if b.generation is None else {
                        **asdict(b.generation), "mean_prefix": b.generation.mean_prefix, "exact": b.generation.exact},
                    "localization": None if b.localization is None else b.localization.to_dict(),
                    "polygraphy": b.polygraphy,
                }
                for b in self.backends
            ],
            "ablation": self.ablation,
        }


def tolerance_failures(metrics: list[OutputMetrics], graph_dtype: str, reference: str) -> list[str]:
    """Per-output tolerances. Logits: the export targets of the graph's precision (fp32: max abs <= 1e-4; fp16
    or an fp16 reference: no NaN/Inf, top-1 >= 99 % with near-ties counted, max abs <= 2 % of the largest reference logit). The cache:
    max abs <= 1e-5 (fp32) or 2 % (fp16) of the largest reference value."""
    precision = "fp32" if graph_dtype == "fp32" and reference.endswith("fp32") else "fp16"
    failures = export_tolerance_failures(metrics, precision)
    present = next(m for m in metrics if m.name == "present.*")
    limit = PRESENT_RELATIVE[precision] * present.reference_max
    if not present.max_abs <= limit:
        failures.append(f"present.* max abs error {present.max_abs:.3g} > {limit:.3g} "
                        f"({PRESENT_RELATIVE[precision]:g} of the largest reference value)")
    return failures


def build_cases(tokenizer, prompts: list[str], batch: int, vocab_size: int, pad_token_id: int,
                max_prompt: int) -> list[Case]:
    """Real prompts through the tokenizer (cycled to fill ``batch`` rows, left-padded) and random token batches."""
    cases = []
    if tokenizer is not None and prompts:
        rows = [tokenizer.encode(prompts[i % len(prompts)]).ids[:max_prompt] for i in range(batch)]
        rows = [r or [pad_token_id] for r in rows]
        input_ids, attention_mask = left_pad(rows, pad_token_id)
        cases.append(Case("prompts", torch.from_numpy(input_ids), torch.from_numpy(attention_mask)))
    length = min(48, max_prompt)
    cases.append(Case("random tokens", *validation_inputs(vocab_size, batch=batch, prompt=length, seed=1)))
    return cases


def run_parity(
    reference: GPTMegLMHeadModel,
    backend: DecoderRuntime,
    cases: list[Case],
    *,
    graph_dtype: str,
    reference_name: str,
    onnx_path: Path | None,
    decode_steps: int = 4,
    new_tokens: int = 16,
    provider: str = "cpu",
    progress: Callable[[str], None] = lambda _: None,
) -> BackendResult:
    result = BackendResult(backend=backend.name)
    for case in cases:
        progress(f"{backend.describe()}: {case.name}, prefill + {decode_steps} decode steps")
        metrics = compare_decoder(reference, backend.infer, case.input_ids, case.attention_mask,
                                  graph_dtype=graph_dtype, decode_steps=decode_steps)
        result.cases.append(CaseResult(case.name, metrics, tolerance_failures(metrics, graph_dtype, reference_name)))

    progress(f"{backend.describe()}: greedy generation, {new_tokens} tokens")
    first = cases[0]
    prompts = [row[mask.bool()].tolist() for row, mask in zip(first.input_ids, first.attention_mask)]
    settings = GenerationSettings(max_new_tokens=new_tokens, eos_token_id=-1)
    expected = generate(EagerDecoder(reference, backend.spec), prompts, settings).tokens
    actual = generate(backend, prompts, settings).tokens
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(actual, expected)]
    result.generation = GenerationMatch(new_tokens, prefix)

    progress(f"{backend.name}: teacher-forced step check (Polygraphy Comparator)")
    result.polygraphy = polygraphy_check(EagerDecoder(reference, backend.spec), backend, graph_dtype=graph_dtype,
                                         steps=decode_steps)

    if onnx_path is not None:  # error by layer, on the first failing case (or the first case)
        progress(f"{backend.describe()}: comparing every block site")
        failing = [c for c, r in zip(cases, result.cases) if r.failures]
        case = (failing or cases)[0]
        result.localization = localize(reference, onnx_path, case.input_ids, case.attention_mask,
                                       graph_dtype=graph_dtype, provider=provider)
    return result
