"""Tied ``lm_head`` / ``wte``: one matrix in the ONNX file, read by both the embedding Gather and the lm_head MatMul.

The exporter's optimizer folds constants whose inputs are small (onnxscript: up to 8192 elements), so for a model
with vocab x n_embd <= 8192 it turns ``Transpose(wte)`` into a second, transposed copy of the matrix. This module
counts the copies and undoes that fold: the transposed copy is replaced by a ``Transpose`` node that reads the one
stored matrix, so every size stores the tied weight once.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["count_large_initializers", "refold_tied_transpose"]


def count_large_initializers(model: onnx.ModelProto, shape: tuple[int, int]) -> int:
    """How many initializers of ``shape`` (either orientation) the graph stores: 1 for correctly tied embeddings."""
    wanted = {tuple(shape), tuple(reversed(shape))}
    return sum(1 for init in model.graph.initializer if tuple(init.dims) in wanted)


def refold_tied_transpose(model: onnx.ModelProto, shape: tuple[int, int]) -> int:
    """Replace every initializer that is exactly the transpose of the ``shape`` (vocab, n_embd) initializer by a
    ``Transpose`` of it, in place. ``model`` must hold the initializers' data. Returns how many were replaced."""
    graph = model.graph
    stored = [init for init in graph.initializer if tuple(init.dims) == tuple(shape)]
    copies = [init for init in graph.initializer if tuple(init.dims) == tuple(reversed(shape))]
    if len(stored) != 1 or not copies:
        return 0
    weight = numpy_helper.to_array(stored[0])
    replaced = 0
    for copy in copies:
        if not np.array_equal(numpy_helper.to_array(copy), weight.T):
            continue
        graph.initializer.remove(copy)
        node = helper.make_node("Transpose", [stored[0].name], [copy.name], name=f"tied_transpose_{replaced}",
                                perm=[1, 0])
        graph.node.insert(0, node)  # reads an initializer only, so it may run first
        replaced += 1
    return replaced
