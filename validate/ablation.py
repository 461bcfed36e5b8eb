"""Ablation: how much each fp32 island matters. The model is exported again with one divergence at a time switched
back to GPT-2's half-precision rounding (:func:`gptmeg.megatron_ops.gpt2_numerics`), and each variant is compared
with the eager GPTMeg reference on the same inputs as the export under test. For a megatron-exact model
(``config.megatron_numerics``) each site its plan turns on is a variant too, switched back to GPTMeg's rounding. On a GPU runtime the islands show in
the numbers; onnxruntime's CPU fp16 kernels round differently from eager fp16 by about as much as an island
changes (DESIGN.md), so on CPU the table is small differences and the graph contract is what proves the islands.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable


from engines import make_runtime, open_export
from export.onnx_export import export_decoder
from export.precision_plan import check_precision_plan, expected_sites_of
from export.manifest import graph_io, write_manifest
from gptmeg import GPTMegLMHeadModel
from gptmeg.megatron_ops import DIVERGENCES, MEGATRON_SITES, gpt2_numerics

from .parity import Case
from export.verify import compare_decoder

__all__ = ["run_ablation"]


def _export_variant(model: GPTMegLMHeadModel, folder: Path, manifest: dict, removed: tuple[str, ...]) -> Path:
    """An fp16 export of ``model`` with ``removed`` islands switched to GPT-2 rounding, as a runnable folder."""
    import onnx

    with gpt2_numerics(*removed):
        path = export_decoder(model, folder, manifest.get("opset", 18))
    write_manifest(folder, {**{k: manifest[k] for k in ("source", "dtype", "config", "kv_cache")},
                            "model_file": path.name, **graph_io(onnx.load(str(path), load_external_data=False))})
    return path


def run_ablation(
    export_model_cpu: GPTMegLMHeadModel,
    reference: GPTMegLMHeadModel,
    manifest: dict,
    case: Case,
    *,
    decode_steps: int,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict]:
    """Rows: variant, islands removed, whether the graph contract still holds, logits/present metrics."""
    rows = []
    config = export_model_cpu.config
    plan = config.megatron_numerics or {}
    sites = DIVERGENCES + tuple(s for s in MEGATRON_SITES if plan.get(s))
    everything = "all islands (megatron-exact)" if plan else "all islands (GPTMeg)"
    variants = [(everything, ())] + [(f"without {d}", (d,)) for d in sites]
    variants.append(("no islands (GPT-2 rounding)", sites))
    with tempfile.TemporaryDirectory(prefix="gptmeg-ablation-") as tmp:
        for name, removed in variants:
            progress(f"ablation: exporting {name}")
            folder = Path(tmp) / f"variant-{len(rows)}"
            folder.mkdir()
            path = _export_variant(export_model_cpu, folder, manifest, removed)
            contract = check_precision_plan(path, expected_sites_of(config))
            runtime = make_runtime(open_export(folder, verify=False))
            metrics = compare_decoder(reference, runtime.infer, case.input_ids, case.attention_mask,
                                      graph_dtype="fp16", decode_steps=decode_steps)
            logits, present = metrics
            rows.append({
                "variant": name,
                "removed": list(removed),
                "plan": contract.plan,
                "contract_ok": contract.ok,
                "broken_sites": len(contract.violations),
                "logits_max_abs": logits.max_abs,
                "logits_mean_abs": logits.mean_abs,
                "logits_top1": logits.top1,
                "present_max_abs": present.max_abs,
                "present_mean_abs": present.mean_abs,
            })
    return rows
