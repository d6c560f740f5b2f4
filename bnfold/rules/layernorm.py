"""Recognising a LayerNorm's own affine (γ, β) among decomposed affines, for the report.

Exporters before opset 17 (and tf2onnx) write LayerNorm as ``ReduceMean → Sub → Pow → ReduceMean
→ Add(ε) → Sqrt → Div`` followed by ``Mul(γ) → Add(β)`` by ``[C]`` constants; some write
LayerNormalization and apply γ and β after it. Those two nodes are a per-channel affine on the
last axis, which folds into the Linear after them like any other (``W′ = diag(γ) W``,
``b′ = β W + b``); the report says it was the LayerNorm's affine, since folding it changes what a
reader of the graph expects to find there. Nothing here decides whether a fold happens.
"""

from __future__ import annotations

import onnx

from bnfold.graph import GraphIndex, describe, is_standard


def _standard_producer(graph: GraphIndex, name: str, op_types: tuple[str, ...]) -> onnx.NodeProto | None:
    node = graph.producer_of(name)
    return node if node is not None and is_standard(node) and node.op_type in op_types else None


def layernorm_before(data: str, graph: GraphIndex) -> onnx.NodeProto | None:
    """The node that ends a LayerNorm's normalization and writes ``data``, if there is one: a
    LayerNormalization, or the ``Div`` of ``(x - ReduceMean(x)) / Sqrt(...)``."""
    normalized = _standard_producer(graph, data, ("LayerNormalization", "Div"))
    if normalized is None or normalized.op_type == "LayerNormalization":
        return normalized
    centered = _standard_producer(graph, normalized.input[0], ("Sub",))
    spread = _standard_producer(graph, normalized.input[1], ("Sqrt",))
    if centered is None or spread is None:
        return None
    mean = _standard_producer(graph, centered.input[1], ("ReduceMean",))
    return normalized if mean is not None and mean.input[0] == centered.input[0] else None


def layernorm_note(data: str, channel_axis: int, graph: GraphIndex) -> str:
    """The report's note for a per-channel affine on ``data``: that it is a LayerNorm's γ and β
    when a LayerNorm's normalization writes ``data`` and the affine scales its last axis."""
    normalization = layernorm_before(data, graph) if channel_axis == -1 else None
    return "" if normalization is None else f"LayerNorm affine (γ, β) after {describe(normalization)}"
