"""The fp16 precision plan of an exported GPTMeg graph, and the checker that proves a graph follows it.

An fp16 export must carry, at every site (DESIGN.md, "The fp16 precision plan"):

=============== =========================================================================================
site            in the graph
=============== =========================================================================================
LayerNorm       ``Cast(fp32) -> LayerNormalization`` (fp32 scale/bias) ``-> Cast(fp16)``
Megatron GELU   ``Cast(fp32) ->`` the tanh formula in fp32 ``-> Cast(fp16)``
attention score ``MatMul`` in fp32, ``Mul(alpha)`` in fp32, then the single ``Cast(fp16)`` - no ``Div``
                after the score MatMul
anywhere        no fused attention op (SDPA), no ``Mul`` of a tensor by a constant zero
=============== =========================================================================================

:func:`check_precision_plan` walks any ONNX graph, finds every site, and reports each one as data: intact or
not, and why. It reads only the ONNX file, so it works on any export, ours or not.
"""

from __future__ import annotations

import ast
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = ["Site", "ContractReport", "ExpectedSites", "check_precision_plan", "expected_sites", "implied_sites",
           "module_scope"]

FLOAT, FLOAT16, BFLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
LOW_PRECISION = (FLOAT16, BFLOAT16)
DTYPE_NAMES = {FLOAT: "float32", FLOAT16: "float16", BFLOAT16: "bfloat16", TensorProto.DOUBLE: "float64"}
FUSED_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention"}
LAYERNORM_OPS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"}
GELU_OPS = {"Tanh", "Gelu", "FastGelu", "BiasGelu"}
_FUSED_GELU_OPS = {"Gelu", "FastGelu", "BiasGelu"}
_NOT_TYPE_PRESERVING = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin", "Equal", "Less", "LessOrEqual", "Greater",
                        "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "ConstantOfShape", "Range",
                        "Cast", "CastLike", "Constant"}
_COMPUTE_OPS = {"MatMul", "Gemm", "Attention", "MultiHeadAttention"}
_LAYERNORM_IN_FP16 = {  # a LayerNorm op fed fp16: what it rounds that the fp32 island would not
    "SkipLayerNormalization": "SkipLayerNormalization adds the residual and normalises in float16",
    "LayerNormalization": "normalises in float16 (stash_type keeps only the statistics in fp32; scale and bias are "
                          "applied in float16)",
}
# ops that move or reshape a score tensor between its MatMul and the Softmax without computing on it
_PASS_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Expand", "Slice"}


@dataclass(frozen=True)
class Site:
    kind: str  # "layernorm" | "gelu" | "attention_score" | "graph"
    index: int  # order of appearance in the graph, per kind
    node: str  # the node that defines the site (LayerNormalization / Tanh / score MatMul)
    intact: bool
    detail: str  # what was found; for a broken site, what is wrong
    scope: str = ""  # the torch module the node came from (e.g. "transformer.h.1.ln_2"), when the graph says


@dataclass(frozen=True)
class ExpectedSites:
    layernorm: int
    gelu: int | None  # None: the model has no Megatron GELU, so its activation is not part of the contract
    attention_score: int
    scaled_scores: bool = True  # False (scale_attn_weights=False): alpha may be 1, so a score needs no Mul(alpha)


@dataclass
class ContractReport:
    path: str
    compute_dtype: str  # the graph's activation dtype: float16 for an fp16 export
    sites: list[Site] = field(default_factory=list)
    expected: ExpectedSites | None = None

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(s.kind for s in self.sites if s.kind != "graph"))

    @property
    def violations(self) -> list[Site]:
        broken = [s for s in self.sites if not s.intact]
        if not any(s.kind != "graph" for s in self.sites):
            broken.append(Site("graph", -1, "-", False, "no LayerNorm, GELU or attention-score site found: this is "
                                                         "not a GPTMeg/GPT-2 graph, so nothing was proven"))
        if self.expected is not None:
            for kind, want in asdict(self.expected).items():
                if want is None or kind == "scaled_scores":
                    continue
                have = self.counts.get(kind, 0)
                if have != want:
                    broken.append(
                        Site(kind, -1, "-", False, f"expected {want} {kind} site(s) in this model, found {have}")
                    )
        return broken

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) or "no sites"
        state = "intact" if self.ok else f"BROKEN ({len(self.violations)} violation(s))"
        return f"precision plan {state} - {self.compute_dtype} graph, {counts}"

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "compute_dtype": self.compute_dtype,
            "ok": self.ok,
            "counts": self.counts,
            "expected": asdict(self.expected) if self.expected else None,
            "sites": [asdict(s) for s in self.sites],
            "violations": [asdict(s) for s in self.violations],
        }


def expected_sites(
    n_layer: int, activation_function: str, *, scale_attn_weights: bool = True
) -> ExpectedSites:
    """The sites a GPTMeg export of ``n_layer`` blocks has: 2 LayerNorms per block + the final one, a Megatron
    GELU per block (only when the activation is "gelu_fast"; other activations, e.g. GPT-2's "gelu_new", keep
    transformers' half-precision semantics and are not checked), an attention score per block. Without
    ``scale_attn_weights`` (a GPT-2 option) alpha is 1 and the exporter drops the multiplication by it."""
    return ExpectedSites(
        layernorm=2 * n_layer + 1,
        gelu=n_layer if activation_function == "gelu_fast" else None,
        attention_score=n_layer,
        scaled_scores=bool(scale_attn_weights),
    )


def implied_sites(model: onnx.ModelProto) -> ExpectedSites | None:
    """The sites a decoder graph must have, from its KV-cache inputs alone (``past_key_values.{i}.key``: one per
    block), so that a graph with sites missing is caught without a manifest. The GELU count stays open (the
    activation is not visible from the inputs). None for a graph without a KV cache."""
    layers = sum(1 for i in model.graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key"))
    if not layers:
        return None
    return ExpectedSites(layernorm=2 * layers + 1, gelu=None, attention_score=layers)


class _Graph:
    """Producer/consumer maps and element types of one ONNX graph."""

    def __init__(self, model: onnx.ModelProto):
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - an un-inferable graph still has declared types to use
            pass
        graph = model.graph
        self.nodes = list(graph.node)
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for name in n.input:
                self.consumers.setdefault(name, []).append(n)
        self.types: dict[str, int] = {}
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            self.types[vi.name] = vi.type.tensor_type.elem_type
        self.constants: dict[str, np.ndarray] = {}
        for init in graph.initializer:
            self.types[init.name] = init.data_type
            external = init.data_location == TensorProto.EXTERNAL
            self.constants[init.name] = np.empty(0) if external else numpy_helper.to_array(init)
        for n in self.nodes:
            if n.op_type == "Constant":
                for attr in n.attribute:
                    if attr.name == "value":
                        self.constants[n.output[0]] = numpy_helper.to_array(attr.t)
                        self.types[n.output[0]] = attr.t.data_type
            if n.op_type == "Cast":
                self.types.setdefault(n.output[0], _attr(n, "to"))

    def dtype(self, name: str) -> int | None:
        """The element type of a value. onnxruntime's contrib ops (FastGelu, SkipLayerNormalization, ...) stop
        ONNX's shape inference, so downstream of one the types are derived here: an op's output has the type of
        its data input (the first, or Where's second), except ops that make indices, shapes or booleans."""
        known = self.types.get(name)
        seen = set()
        while known is None and name not in seen:
            seen.add(name)
            node = self.producer.get(name)
            if node is None or node.op_type in _NOT_TYPE_PRESERVING or not node.input:
                return None
            name = node.input[1] if node.op_type == "Where" else node.input[0]
            known = self.types.get(name)
        return known

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def source_dtype(self, name: str) -> int | None:
        """dtype of ``name`` before a Cast, when it is a Cast's output; its own dtype otherwise."""
        node = self.producer.get(name)
        if node is not None and node.op_type == "Cast":
            return self.dtype(node.input[0])
        return self.dtype(name)

    def cast_consumers(self, name: str) -> list[onnx.NodeProto]:
        return [n for n in self.consumers.get(name, []) if n.op_type == "Cast"]


def module_scope(node: onnx.NodeProto) -> str:
    """The torch module a node was traced from, from the dynamo exporter's metadata ("" when absent)."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ""
            module = scopes[-2] if len(scopes) >= 2 else ""
            return module.removeprefix("model.")
    return ""


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _name(dtype: int | None) -> str:
    return DTYPE_NAMES.get(dtype, "unknown" if dtype is None else TensorProto.DataType.Name(dtype).lower())


def _graph_compute_dtype(g: _Graph, model: onnx.ModelProto) -> int:
    """The graph's precision: low (fp16/bf16) when any of its GEMMs or outputs is, since an fp32 graph has none
    (an optimizer may keep fp32 inputs and outputs around fp16 compute); fp32 otherwise."""
    gemms = [g.dtype(n.output[0]) for n in g.nodes if n.op_type in _COMPUTE_OPS]
    outputs = [g.dtype(o.name) for o in model.graph.output]
    low = [d for d in (*gemms, *outputs) if d in LOW_PRECISION]
    return low[0] if low else FLOAT


# --- site finders ----------------------------------------------------------------------------------------------


def _layernorm_sites(g: _Graph, low: bool) -> Iterable[Site]:
    for i, node in enumerate(n for n in g.nodes if n.op_type in LAYERNORM_OPS):
        x = node.input[0]
        # SkipLayerNormalization(input, skip, gamma, beta, bias): the residual add is fused in
        scale_index = 2 if node.op_type == "SkipLayerNormalization" else 1
        scale = node.input[scale_index] if len(node.input) > scale_index else ""
        bias_index = scale_index + 1
        bias = node.input[bias_index] if len(node.input) > bias_index and node.input[bias_index] else None
        problems = []
        if low and g.dtype(x) in LOW_PRECISION and node.op_type in _LAYERNORM_IN_FP16:
            yield Site("layernorm", i, node.name or node.output[0], False, _LAYERNORM_IN_FP16[node.op_type],
                       module_scope(node))
            continue
        if g.dtype(x) != FLOAT:
            problems.append(f"normalises in {_name(g.dtype(x))}")
        if g.dtype(scale) != FLOAT or (bias is not None and g.dtype(bias) != FLOAT):
            problems.append("scale/bias not fp32")
        if low:
            if g.source_dtype(x) not in LOW_PRECISION:
                problems.append("input is not a Cast(fp32) of the fp16 activation")
            if not any(_attr(c, "to") in LOW_PRECISION for c in g.cast_consumers(node.output[0])):
                problems.append("output is not cast back to fp16")
        yield Site("layernorm", i, node.name or node.output[0], not problems, "; ".join(problems) or "fp32 island",
                   module_scope(node))


def _fp32_region_sources(g: _Graph, start: str, limit: int = 24) -> tuple[set[int], list[str]]:
    """Walk back from ``start`` through elementwise math until Casts or constants: the dtypes entering the
    region through Casts, and the ops inside it that are not fp32."""
    entered, not_fp32, seen, stack = set(), [], set(), [start]
    while stack and len(seen) < limit:
        name = stack.pop()
        if name in seen or g.is_constant(name):
            continue
        seen.add(name)
        node = g.producer.get(name)
        if node is None:
            not_fp32.append(f"graph input {name}")
            continue
        if node.op_type == "Cast":
            entered.add(g.dtype(node.input[0]))
            continue
        if g.dtype(name) != FLOAT:
            not_fp32.append(f"{node.op_type} in {_name(g.dtype(name))}")
        stack.extend(node.input)
    return entered, not_fp32


def _forward_to_cast(g: _Graph, start: str, limit: int = 8) -> tuple[int | None, list[str]]:
    """Follow the elementwise chain after ``start`` to the first Cast: (its target dtype, ops on the way)."""
    name, ops = start, []
    for _ in range(limit):
        consumers = g.consumers.get(name, [])
        if not consumers:
            return None, ops
        node = consumers[0]
        if node.op_type == "Cast":
            return _attr(node, "to"), ops
        ops.append(node.op_type)
        name = node.output[0]
    return None, ops


def _gelu_sites(g: _Graph, low: bool) -> Iterable[Site]:
    for i, node in enumerate(n for n in g.nodes if n.op_type in GELU_OPS):
        problems = []
        if g.dtype(node.output[0]) != FLOAT:
            problems.append(f"{node.op_type} computes in {_name(g.dtype(node.output[0]))}")
        if low and node.op_type in _FUSED_GELU_OPS:  # one fused op: its inputs must be the Cast(fp32) of fp16
            if not problems:
                if g.source_dtype(node.input[0]) not in LOW_PRECISION:
                    problems.append("input is not a Cast(fp32) of the fp16 activation")
                target, _ = _forward_to_cast(g, node.output[0])
                if target not in LOW_PRECISION:
                    problems.append("result is not cast back to fp16 once")
        elif low:
            entered, not_fp32 = _fp32_region_sources(g, node.input[0])
            if not_fp32:
                problems.append("non-fp32 math before the tanh: " + ", ".join(sorted(set(not_fp32))))
            if not entered & set(LOW_PRECISION):
                problems.append("no Cast(fp32) of the fp16 activation before the tanh")
            target, _ = _forward_to_cast(g, node.output[0])
            if target not in LOW_PRECISION:
                problems.append("result is not cast back to fp16 once")
        yield Site("gelu", i, node.name or node.output[0], not problems, "; ".join(problems) or "fp32 island",
                   module_scope(node))


def _score_matmul(g: _Graph, softmax: onnx.NodeProto) -> tuple[onnx.NodeProto | None, list[onnx.NodeProto]]:
    """The MatMul whose product reaches ``softmax`` through the score path (mask Add, scale, casts, reshapes)
    and the nodes on that path, MatMul excluded (closest to the Softmax first)."""
    path, name = [], softmax.input[0]
    for _ in range(16):
        node = g.producer.get(name)
        if node is None:
            return None, path
        if node.op_type in ("MatMul", "Gemm", "Einsum"):
            return node, path
        path.append(node)
        if node.op_type in ("Add", "Mul", "Div", "Sub", "Where"):
            # follow the operand that is not a constant or a mask (masks come from Where / graph inputs)
            candidates = [x for x in node.input if x and not g.is_constant(x)]
            candidates = [x for x in candidates if g.producer.get(x) is not None and g.producer[x].op_type != "Where"]
            if not candidates:
                return None, path
            name = candidates[0]
        elif node.op_type == "Cast" or node.op_type in _PASS_THROUGH:
            name = node.input[0]
        else:
            return None, path
    return None, path


def _scalar_constant(g: _Graph, names: Iterable[str]) -> float | None:
    for n in names:
        value = g.constants.get(n)
        if value is not None and value.size == 1:
            return float(value.reshape(()))
    return None


def _fused_attention_sites(g: _Graph, first_index: int) -> Iterable[Site]:
    """onnxruntime's fused attention ops computing in fp32: an fp32 graph's score sites (fp16 ones are violations,
    see _graph_wide_sites)."""
    fused = [n for n in g.nodes if n.op_type in FUSED_ATTENTION_OPS and g.dtype(n.output[0]) == FLOAT]
    for i, node in enumerate(fused, start=first_index):
        yield Site("attention_score", i, node.name or node.output[0], True, f"fused {node.op_type} in float32",
                   module_scope(node))


def _attention_sites(g: _Graph, low: bool, scale_required: bool = True) -> Iterable[Site]:
    sites = list(_softmax_attention_sites(g, low, scale_required))
    return sites + list(_fused_attention_sites(g, len(sites)))


def _softmax_attention_sites(g: _Graph, low: bool, scale_required: bool = True) -> Iterable[Site]:
    for i, softmax in enumerate(n for n in g.nodes if n.op_type == "Softmax"):
        matmul, path = _score_matmul(g, softmax)
        if matmul is None:
            continue
        after = list(reversed(path))  # from the MatMul towards the Softmax
        ops = [n.op_type for n in after]
        problems = []
        if "Div" in ops:
            problems.append("Div after the score MatMul (scale applied by division, after rounding)")
        scale_index = next((k for k, n in enumerate(after) if n.op_type == "Mul"), None)
        alpha = _scalar_constant(g, after[scale_index].input) if scale_index is not None else None
        if scale_index is None and scale_required:
            problems.append("no Mul(alpha) after the score MatMul")
        casts_down = [k for k, n in enumerate(after) if n.op_type == "Cast" and _attr(n, "to") in LOW_PRECISION]
        if low:
            if g.dtype(matmul.output[0]) != FLOAT:
                problems.append(f"score MatMul computes in {_name(g.dtype(matmul.output[0]))}, not fp32")
            if len(casts_down) != 1:
                problems.append(f"{len(casts_down)} casts to fp16 between MatMul and Softmax, expected 1")
            elif scale_index is not None and scale_index > casts_down[0]:
                problems.append("alpha applied after the cast to fp16 (two roundings)")
        scale = "alpha=1 (unscaled)" if scale_index is None else f"alpha={alpha:.9g}"
        detail = "; ".join(problems) or (f"fp32 MatMul x {scale} then one cast" if low else f"MatMul x {scale}")
        yield Site("attention_score", i, matmul.name or matmul.output[0], not problems, detail, module_scope(matmul))


def _graph_wide_sites(g: _Graph) -> Iterable[Site]:
    for node in g.nodes:
        if node.op_type in FUSED_ATTENTION_OPS and g.dtype(node.output[0]) in LOW_PRECISION:
            yield Site("graph", 0, node.name or node.output[0], False,
                       f"fused attention op {node.op_type} in {_name(g.dtype(node.output[0]))}: its kernel decides "
                       "how the scores are rounded", module_scope(node))
        if node.op_type == "Mul":
            for operand in node.input:
                value = g.constants.get(operand)
                if value is not None and value.size and not np.any(value):
                    yield Site("graph", 0, node.name or node.output[0], False,
                               "Mul by constant zero (beta=0 buffer term)", module_scope(node))


def check_precision_plan(
    model: onnx.ModelProto | str | os.PathLike, expected: ExpectedSites | None = None
) -> ContractReport:
    """Find every LayerNorm, GELU and attention-score site of ``model`` and check each against the plan.

    For an fp16/bf16 graph every site must be an fp32 island as in the module docstring; for an fp32 graph the
    dtype rules hold trivially and only the structural ones (no Div after the score MatMul, no SDPA, no zero
    Mul) apply. With ``expected`` the number of sites per kind must match too (a removed island counts);
    ``expected.gelu is None`` leaves tanh sites out (a model whose activation is not Megatron's GELU).
    """
    path = "<in-memory>"
    if not isinstance(model, onnx.ModelProto):
        path = str(model)
        model = onnx.load(path, load_external_data=False)
    check_gelu = expected is None or expected.gelu is not None  # the caller's word on the activation
    if expected is None:
        expected = implied_sites(model)
    g = _Graph(model)
    compute = _graph_compute_dtype(g, model)
    low = compute in LOW_PRECISION
    gelu_sites = list(_gelu_sites(g, low)) if check_gelu else []
    scale_required = expected is None or expected.scaled_scores
    sites = [*_layernorm_sites(g, low), *gelu_sites, *_attention_sites(g, low, scale_required), *_graph_wide_sites(g)]
    return ContractReport(path=path, compute_dtype=_name(compute), sites=sites, expected=expected)
