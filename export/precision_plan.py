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

A graph exported from a model with ``config.megatron_numerics`` (the "megatron-exact" plan) also carries, per site
the plan turns on:

======================== ===================================================================================
site                     in the graph
======================== ===================================================================================
query_key_layer_scaling  ``Mul(alpha)`` with alpha = 1/(sqrt(d) c_i) before the score's single cast to fp16,
                         then ``Cast(fp32) -> Mul(c_i)`` (none where c_i = 1)
softmax_in_fp32          ``Cast(fp32)`` of the fp16 scores ``->`` mask ``Where(-10000)`` ``-> Softmax`` in fp32
                         ``-> Cast(fp16)``
bias_gelu_fusion         bias-free ``MatMul`` ``-> Cast(fp32) -> Add(bias fp32) ->`` the GELU island
bias_dropout_add_fusion  bias-free ``MatMul`` ``-> Cast(fp32) -> Add(bias fp32) -> Add(fp32 residual)`` ``->``
                         one ``Cast(fp16)`` (two per block)
fp32_residual_connection the sum above stays fp32 and is the next LayerNorm's input (no cast in between)
======================== ===================================================================================

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
           "module_scope", "MEGATRON_SITE_KINDS", "expected_sites_of"]

MEGATRON_SITE_KINDS = ("query_key_layer_scaling", "softmax_in_fp32", "bias_gelu_fusion", "bias_dropout_add_fusion",
                       "fp32_residual_connection")  # = gptmeg.configuration_gptmeg.MEGATRON_NUMERICS_SITES

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
    megatron_numerics: dict | None = None  # the model's megatron-exact plan (None: GPTMeg's plan)
    head_dim: int | None = None  # needed to check the layer-scaling alpha

    @property
    def plan(self) -> str:
        return "gptmeg" if self.megatron_numerics is None else "megatron-exact"

    def coefficients(self) -> list[int]:
        from gptmeg.configuration_gptmeg import layer_coefficient

        scheme = (self.megatron_numerics or {}).get("query_key_layer_scaling")
        return [layer_coefficient(scheme, i) for i in range(self.attention_score)]

    def megatron_counts(self) -> dict[str, int]:
        """How many sites of each megatron-exact kind the plan puts in the graph."""
        plan, n = self.megatron_numerics or {}, self.attention_score
        per_site = {"query_key_layer_scaling": n, "softmax_in_fp32": n, "bias_gelu_fusion": n,
                    "bias_dropout_add_fusion": 2 * n, "fp32_residual_connection": 2 * n}
        return {kind: count for kind, count in per_site.items() if plan.get(kind)}


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
            wanted = {k: v for k, v in asdict(self.expected).items()
                      if k in ("layernorm", "gelu", "attention_score")}
            if self.compute_dtype in ("float16", "bfloat16"):
                wanted.update(self.expected.megatron_counts())
            for kind, want in wanted.items():
                if want is None:
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

    @property
    def plan(self) -> str:
        """Which numerics plan was checked: "gptmeg" (the three divergences) or "megatron-exact"."""
        return self.expected.plan if self.expected is not None else "gptmeg"

    def summary(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) or "no sites"
        state = "intact" if self.ok else f"BROKEN ({len(self.violations)} violation(s))"
        return f"precision plan ({self.plan}) {state} - {self.compute_dtype} graph, {counts}"

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "plan": self.plan,
            "megatron_numerics": self.expected.megatron_numerics if self.expected is not None else None,
            "compute_dtype": self.compute_dtype,
            "ok": self.ok,
            "counts": self.counts,
            "expected": asdict(self.expected) if self.expected else None,
            "sites": [asdict(s) for s in self.sites],
            "violations": [asdict(s) for s in self.violations],
        }


def expected_sites(
    n_layer: int, activation_function: str, *, scale_attn_weights: bool = True,
    megatron_numerics: dict | None = None, head_dim: int | None = None,
) -> ExpectedSites:
    """The sites a GPTMeg export of ``n_layer`` blocks has: 2 LayerNorms per block + the final one, a Megatron
    GELU per block (only when the activation is "gelu_fast"; other activations, e.g. GPT-2's "gelu_new", keep
    transformers' half-precision semantics and are not checked), an attention score per block. Without
    ``scale_attn_weights`` (a GPT-2 option) alpha is 1 and the exporter drops the multiplication by it. With the
    model's ``megatron_numerics`` plan (and its ``head_dim``, for the layer-scaling alpha) the megatron-exact sites
    are expected too."""
    return ExpectedSites(
        layernorm=2 * n_layer + 1,
        gelu=n_layer if activation_function == "gelu_fast" else None,
        attention_score=n_layer,
        scaled_scores=bool(scale_attn_weights),
        megatron_numerics=megatron_numerics,
        head_dim=head_dim,
    )


def expected_sites_of(config) -> ExpectedSites:
    """:func:`expected_sites` for a GPTMeg/GPT-2 config object (or a dict of its fields)."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    n_layer, n_embd, n_head = get("n_layer"), get("n_embd"), get("n_head")
    return expected_sites(n_layer, get("activation_function", "gelu_new"),
                          scale_attn_weights=get("scale_attn_weights", True),
                          megatron_numerics=get("megatron_numerics"),
                          head_dim=n_embd // n_head if n_embd and n_head else None)


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


def _layernorm_sites(g: _Graph, low: bool, fp32_stream: bool = False) -> Iterable[Site]:
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
            stream = fp32_stream and (g.producer.get(x) is None or g.producer[x].op_type != "Cast")
            if g.source_dtype(x) not in LOW_PRECISION and not stream:
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
            operands = node.input[1:] if node.op_type == "Where" else node.input  # Where's condition is the mask
            candidates = [x for x in operands if x and not g.is_constant(x)]
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
    plan = (expected.megatron_numerics if expected is not None else None) or {}
    sites = [*_layernorm_sites(g, low, bool(plan.get("fp32_residual_connection"))), *gelu_sites,
             *_attention_sites(g, low, scale_required), *_graph_wide_sites(g)]
    if plan and low:
        sites += _megatron_sites(g, expected)
    return ContractReport(path=path, compute_dtype=_name(compute), sites=sites, expected=expected)


# --- the megatron-exact sites (fp16/bf16 graphs of a model with config.megatron_numerics) -------------------------


def _skip_pass_through(g: _Graph, name: str) -> onnx.NodeProto | None:
    """The producer of ``name``, looking through reshapes/transposes."""
    node = g.producer.get(name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = g.producer.get(node.input[0])
    return node


def _constant_like(g: _Graph, name: str) -> bool:
    """A constant, or a Cast / reshape of one (a bias upcast to fp32)."""
    node = g.producer.get(name)
    while node is not None and (node.op_type == "Cast" or node.op_type in _PASS_THROUGH):
        name = node.input[0]
        node = g.producer.get(name)
    return g.is_constant(name)


def _fp32_of_bias(g: _Graph, name: str) -> bool:
    return _constant_like(g, name) and g.dtype(name) == FLOAT


def _bias_add_problems(g: _Graph, add: onnx.NodeProto) -> list[str]:
    """``add`` must be ``Cast(fp32)(bias-free MatMul) + bias`` in fp32."""
    problems = []
    data = [x for x in add.input if not _constant_like(g, x)]
    bias = [x for x in add.input if _constant_like(g, x)]
    if len(data) != 1 or len(bias) != 1:
        return ["no bias Add of the bias-free GEMM output"]
    if not _fp32_of_bias(g, bias[0]):
        problems.append(f"bias added in {_name(g.dtype(bias[0]))}, not fp32")
    cast = _skip_pass_through(g, data[0])
    if cast is None or cast.op_type != "Cast" or _attr(cast, "to") != FLOAT:
        problems.append("the GEMM output is not Cast to fp32 before the bias add (bias added in fp16)")
    else:
        gemm = _skip_pass_through(g, cast.input[0])
        if gemm is None or gemm.op_type not in ("MatMul", "Gemm") or (gemm.op_type == "Gemm" and len(gemm.input) > 2):
            problems.append("the fp32 bias add does not take a bias-free GEMM output (bias rounded with the GEMM)")
    return problems


def _megatron_sites(g: _Graph, expected: ExpectedSites) -> list[Site]:
    plan = expected.megatron_numerics
    sites: list[Site] = []
    if plan.get("query_key_layer_scaling") or plan.get("softmax_in_fp32"):
        sites += _megatron_softmax_sites(g, expected)
    if plan.get("bias_gelu_fusion"):
        sites += _bias_gelu_sites(g)
    if plan.get("bias_dropout_add_fusion") or plan.get("fp32_residual_connection"):
        sites += _residual_sites(g, plan)
    return sites


def _megatron_softmax_sites(g: _Graph, expected: ExpectedSites) -> Iterable[Site]:
    plan = expected.megatron_numerics
    coefficients = expected.coefficients()
    attention = [(s, *_score_matmul(g, s)) for s in g.nodes if s.op_type == "Softmax"]
    attention = [(s, m, p) for s, m, p in attention if m is not None]
    for i, (softmax, matmul, path) in enumerate(attention):
        scope = module_scope(matmul)
        after = list(reversed(path))  # from the score MatMul to the Softmax
        down = [k for k, n in enumerate(after) if n.op_type == "Cast" and _attr(n, "to") in LOW_PRECISION]
        tail = after[down[0] + 1:] if down else after
        up = next((k for k, n in enumerate(tail) if n.op_type == "Cast" and _attr(n, "to") == FLOAT), None)
        math_ops = [(k, n) for k, n in enumerate(tail) if n.op_type in ("Mul", "Where", "Add", "Sub", "Div")]
        if plan.get("softmax_in_fp32"):
            problems = []
            if g.dtype(softmax.output[0]) != FLOAT:
                problems.append(f"Softmax computes in {_name(g.dtype(softmax.output[0]))}")
            if up is None:
                problems.append("the rounded scores are not Cast to fp32 before the softmax")
            elif any(k < up for k, _ in math_ops):
                problems.append("scale or mask applied to the fp16 scores before the Cast to fp32")
            wheres = [n for _, n in math_ops if n.op_type == "Where"]
            fill = _scalar_constant(g, wheres[0].input[1:]) if wheres else None
            if fill != -10000.0:
                problems.append("mask is not Megatron's fill with -10000 in fp32" if not wheres
                                else f"mask fills {fill}, not -10000")
            target, _ = _forward_to_cast(g, softmax.output[0])
            if target not in LOW_PRECISION:
                problems.append("probabilities are not cast back to fp16 once")
            yield Site("softmax_in_fp32", i, softmax.name or softmax.output[0], not problems,
                       "; ".join(problems) or "fp32 mask (-10000) and softmax, one cast", scope)
        if plan.get("query_key_layer_scaling"):
            problems = []
            c = coefficients[i] if i < len(coefficients) else None
            if c is None:
                problems.append("more attention sites than layers")
            else:
                first_mul = next((n for n in after[: down[0] if down else len(after)] if n.op_type == "Mul"), None)
                alpha = _scalar_constant(g, first_mul.input) if first_mul is not None else None
                if expected.head_dim and (alpha is None or
                                          abs(alpha * expected.head_dim ** 0.5 * c - 1.0) > 1e-6):
                    problems.append(f"score alpha {alpha} is not 1/(sqrt({expected.head_dim}) * {c})")
                muls = [(k, n) for k, n in math_ops if n.op_type == "Mul"]
                factors = [_scalar_constant(g, n.input) for _, n in muls]
                if c != 1:
                    if c not in factors:
                        problems.append(f"no Mul by the coefficient c={c} after the rounding")
                    elif up is None or muls[factors.index(c)][0] < up:
                        problems.append(f"c={c} multiplied in fp16 (two roundings)")
            sites_detail = f"c={c}: scores rounded at 1/(sqrt(d) c), times c in fp32" if c != 1 else "c=1"
            yield Site("query_key_layer_scaling", i, matmul.name or matmul.output[0], not problems,
                       "; ".join(problems) or sites_detail, scope)


def _bias_gelu_sites(g: _Graph) -> Iterable[Site]:
    for i, tanh in enumerate(n for n in g.nodes if n.op_type == "Tanh"):
        seen, stack, adds, entering = set(), [tanh.input[0]], [], []
        while stack and len(seen) < 24:  # the fp32 region before the tanh, up to its Casts
            name = stack.pop()
            if name in seen or _constant_like(g, name):
                continue
            seen.add(name)
            node = g.producer.get(name)
            if node is None:
                continue
            if node.op_type == "Cast":
                entering.append(node)
                continue
            if node.op_type == "Add":
                adds.append(node)
            if node.op_type in ("MatMul", "Gemm"):
                entering.append(node)
                continue
            stack.extend(node.input)
        bias_adds = [a for a in adds if any(_constant_like(g, x) for x in a.input)
                     and any(not _constant_like(g, x) for x in a.input)
                     and any(_skip_pass_through(g, x) is not None and _skip_pass_through(g, x).op_type in
                             ("Cast", "MatMul", "Gemm") for x in a.input)]
        if bias_adds:
            problems = _bias_add_problems(g, bias_adds[-1])
        else:
            problems = ["no fp32 bias Add before the GELU (bias added in the fp16 GEMM, rounded with it)"]
        yield Site("bias_gelu_fusion", i, tanh.name or tanh.output[0], not problems,
                   "; ".join(problems) or "bias-free GEMM, Cast(fp32), bias added in the fp32 GELU island",
                   module_scope(tanh))


def _residual_sites(g: _Graph, plan: dict) -> Iterable[Site]:
    """One site per residual add (two per block), found from the LayerNorm it feeds (every LayerNorm after the
    first reads the stream right after a residual add)."""
    norms = [n for n in g.nodes if n.op_type in LAYERNORM_OPS][1:]
    for i, norm in enumerate(norms):
        x = norm.input[0]
        node, rounded = g.producer.get(x), False
        if node is not None and node.op_type == "Cast":
            inner = _skip_pass_through(g, node.input[0])
            if inner is not None and inner.op_type == "Cast" and _attr(inner, "to") in LOW_PRECISION:
                rounded, add = True, _skip_pass_through(g, inner.input[0])
            else:
                add = inner
        else:
            add = _skip_pass_through(g, x)
        if add is None or add.op_type != "Add":
            problem = f"no residual Add before LayerNorm {norm.name or norm.output[0]}"
            for kind in ("bias_dropout_add_fusion", "fp32_residual_connection"):
                if plan.get(kind):
                    yield Site(kind, i, norm.name or norm.output[0], False, problem, module_scope(norm))
            continue
        scope = module_scope(add)
        if plan.get("bias_dropout_add_fusion"):
            problems = []
            branches = [_skip_pass_through(g, x) for x in add.input]
            bias_adds = [b for b in branches if b is not None and b.op_type == "Add"
                         and any(_constant_like(g, y) for y in b.input)]
            if not bias_adds:
                problems.append("no fp32 bias Add feeding the residual add (bias rounded with the GEMM)")
            else:
                problems += _bias_add_problems(g, bias_adds[0])
                residual = [x for x, b in zip(add.input, branches) if b is not bias_adds[0]]
                if residual and g.dtype(residual[0]) != FLOAT:
                    problems.append(f"residual added in {_name(g.dtype(residual[0]))}, not fp32")
            if g.dtype(add.output[0]) not in (FLOAT, None):
                problems.append(f"residual add computes in {_name(g.dtype(add.output[0]))}")
            if not plan.get("fp32_residual_connection") and not rounded:
                problems.append("the fused sum is not rounded to fp16 before the next LayerNorm")
            yield Site("bias_dropout_add_fusion", i, add.name or add.output[0], not problems,
                       "; ".join(problems) or "residual + (Cast(fp32)(x W) + b) in fp32, one rounding", scope)
        if plan.get("fp32_residual_connection"):
            problems = []
            if rounded:
                problems.append("the residual stream is rounded to fp16 after the add")
            if g.dtype(add.output[0]) not in (FLOAT, None):
                problems.append(f"residual add computes in {_name(g.dtype(add.output[0]))}")
            yield Site("fp32_residual_connection", i, add.name or add.output[0], not problems,
                       "; ".join(problems) or "fp32 residual stream read by the LayerNorm", scope)
