"""Layer-by-layer localisation: where, inside the exported graph, do the numbers start to leave the eager model?

The dynamo exporter records on every node the torch module it came from (``pkg.torch.onnx.name_scopes``). The
output of a module is the output of the last node traced inside it, so every site of every block -
``ln_1 -> attn -> ln_2 -> mlp -> block`` - and the final ``ln_f`` can be exposed as extra graph outputs. One prefill
pass then runs the exposed graph in onnxruntime and the eager model with forward hooks on the same modules, and
compares site by site over real (non-padding) tokens.
"""

from __future__ import annotations

import ast
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from export.io_names import past_name
from export.verify import position_ids
from gptmeg import GPTMegLMHeadModel

__all__ = ["SiteError", "Localization", "site_tensors", "localize"]

BLOCK_SITES = ("ln_1", "attn", "ln_2", "mlp", "block")
SITE_KIND = {"ln_1": "LayerNorm", "ln_2": "LayerNorm", "ln_f": "LayerNorm", "attn": "attention", "mlp": "MLP",
             "block": "block output"}
# relative error (max abs / largest reference magnitude at that site) above which a site has diverged
THRESHOLD = {"fp32": 1e-4, "fp16": 2e-2}


@dataclass
class SiteError:
    module: str  # e.g. "transformer.h.1.mlp"
    block: int | None  # None for ln_f
    site: str  # ln_1 | attn | ln_2 | mlp | block | ln_f
    max_abs: float
    reference_max: float

    @property
    def relative(self) -> float:
        return self.max_abs / self.reference_max if self.reference_max else float("inf")


@dataclass
class Localization:
    available: bool
    threshold: float
    sites: list[SiteError] = field(default_factory=list)
    note: str = ""

    @property
    def first_divergence(self) -> SiteError | None:
        """The first site (in graph order) whose relative error exceeds the threshold."""
        return next((s for s in self.sites if s.relative > self.threshold), None)

    def describe(self) -> str:
        if not self.available:
            return f"layer-by-layer localisation unavailable: {self.note}"
        first = self.first_divergence
        if first is None:
            worst = max(self.sites, key=lambda s: s.relative)
            return (f"no site diverges (largest relative error {worst.relative:.2g} at {worst.module}, threshold "
                    f"{self.threshold:g})")
        where = f"block {first.block}, {SITE_KIND[first.site]} ({first.module})" if first.block is not None \
            else f"final LayerNorm ({first.module})"
        return f"first divergence at {where}: relative error {first.relative:.3g} > {self.threshold:g}"

    def to_dict(self) -> dict:
        first = self.first_divergence
        return {
            "available": self.available,
            "threshold": self.threshold,
            "note": self.note,
            "first_divergence": first.module if first else None,
            "summary": self.describe(),
            "sites": [{"module": s.module, "block": s.block, "site": s.site, "max_abs": s.max_abs,
                       "reference_max": s.reference_max, "relative": s.relative} for s in self.sites],
        }


def _module_of(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                return [s.removeprefix("model.") for s in ast.literal_eval(prop.value)[:-1]]
            except (ValueError, SyntaxError):
                return []
    return []


def _wanted_modules(n_layer: int) -> list[tuple[str, int | None, str]]:
    wanted = []
    for block in range(n_layer):
        for site in BLOCK_SITES:
            module = f"transformer.h.{block}" + ("" if site == "block" else f".{site}")
            wanted.append((module, block, site))
    wanted.append(("transformer.ln_f", None, "ln_f"))
    return wanted


def site_tensors(model: onnx.ModelProto, n_layer: int) -> dict[str, str]:
    """{module: name of the graph tensor that is its output} for every site found in the node metadata."""
    last_output: dict[str, str] = {}
    for node in model.graph.node:  # graph order is topological: the last node of a module makes its output
        for module in _module_of(node):
            last_output[module] = node.output[0]
    return {module: last_output[module] for module, _, _ in _wanted_modules(n_layer) if module in last_output}


def _exposed_session(path: Path, tensors: dict[str, str], provider: str):
    import onnxruntime as ort

    model = onnx.load(str(path))
    known = {o.name for o in model.graph.output}
    for name in tensors.values():
        if name not in known:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            known.add(name)
    with tempfile.TemporaryDirectory() as tmp:
        exposed = Path(tmp) / "exposed.onnx"
        onnx.save(model, str(exposed), save_as_external_data=True, location="exposed.onnx.data")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else None
        return ort.InferenceSession(str(exposed), options, providers=providers or ["CPUExecutionProvider"])


def _eager_site_outputs(model: GPTMegLMHeadModel, input_ids, attention_mask, positions, modules) -> dict:
    captured, handles = {}, []
    for module_name in modules:
        module = model.get_submodule(module_name)

        def hook(_module, _inputs, output, name=module_name):
            captured[name] = (output[0] if isinstance(output, tuple) else output).float().cpu().numpy()

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                  position_ids=positions.to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def localize(
    model: GPTMegLMHeadModel,
    onnx_path: Path,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    graph_dtype: str,
    provider: str = "cpu",
) -> Localization:
    """Compare every block site of the graph with the eager model on one prefill pass (empty past)."""
    threshold = THRESHOLD[graph_dtype]
    n_layer = model.config.n_layer
    graph = onnx.load(str(onnx_path), load_external_data=False)
    tensors = site_tensors(graph, n_layer)
    if len(tensors) < len(_wanted_modules(n_layer)):
        return Localization(False, threshold, note="the graph lacks torch module metadata for some sites (was it "
                                                     "exported by `python -m export`?)")
    session = _exposed_session(onnx_path, tensors, provider)
    head_dim = model.config.n_embd // model.config.n_head
    batch = input_ids.shape[0]
    np_dtype = np.float16 if graph_dtype == "fp16" else np.float32
    positions = position_ids(attention_mask, attention_mask.shape[1])
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
             "position_ids": positions.numpy()}
    for i in range(2 * n_layer):
        feeds[past_name(i)] = np.zeros((batch, model.config.n_head, 0, head_dim), np_dtype)
    names = list(dict.fromkeys(tensors.values()))
    outputs = dict(zip(names, session.run(names, feeds)))
    eager = _eager_site_outputs(model, input_ids, attention_mask, positions, list(tensors))

    real = attention_mask.bool().numpy()  # (B, T)
    result = Localization(True, threshold)
    for module, block, site in _wanted_modules(n_layer):
        ours = outputs[tensors[module]].astype(np.float64)
        reference = eager[module].astype(np.float64)
        ours = ours.reshape(reference.shape)  # a site's last node may be a flattened view of the module output
        diff = np.abs(ours - reference)[real]
        result.sites.append(SiteError(module, block, site, float(np.nanmax(diff)), float(np.abs(reference[real]).max())))
    return result
