"""Reading a layer's constant weights, and the one way a rule turns float64 results into the
tensors it writes.

Every tensor a fold writes goes through :func:`scaled_weight` (``W' = W * factor``, the bulk of
every fold) or :func:`cast_tensor` (anything computed whole: biases, offsets, corrections). Both
cast the exact float64 result back to the model's dtype once, refuse a value that would overflow
it, and measure what the report shows per fold: how far the weight moved and what the cast cost.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, describe
from bnfold.rules.plan import AddedBias, Refusal, TensorUpdate


def constant_input(
    graph: GraphIndex, node: onnx.NodeProto, slot: int, role: str
) -> np.ndarray | Refusal | None:
    """The constant value at input ``slot`` of ``node``; None if the slot is empty.

    A value that is fed at run time (a graph input, or computed from one) cannot be folded;
    the refusal says which input it is.
    """
    if slot >= len(node.input) or not node.input[slot]:
        return None
    name = node.input[slot]
    value = graph.constant_value(name)
    if value is None:
        if graph.is_overridable(name):
            origin = "an initializer that is also a graph input, kept overridable by --keep-overridable"
        else:
            origin = "a graph input" if graph.is_runtime_input(name) else "computed at run time"
        return Refusal(f"{describe(node)} {role} '{name}' is not a constant ({origin})")
    dequantize = dequantizing_node(graph, name)
    if dequantize is not None:
        return Refusal(
            f"{describe(node)} {role} is dequantized by {describe(dequantize)}; folding would drop quantization"
        )
    return value


def dequantizing_node(graph: GraphIndex, name: str) -> onnx.NodeProto | None:
    """The DequantizeLinear among the nodes that compute constant ``name``, if any.

    In QDQ models a weight is stored quantized and dequantized in the graph. It is constant,
    but replacing it by folded float values would silently turn a quantized layer into a
    float one, so such weights are not folded. Inside a subgraph, values of the enclosing
    graphs are followed too.
    """
    pending, seen = [(graph, name)], set()
    while pending:
        scope, current = pending.pop()
        while scope.parent is not None and scope.is_outer(current):
            scope = scope.parent
        producer = scope.producer_of(current)
        if producer is None or (id(scope), current) in seen:
            continue
        seen.add((id(scope), current))
        if producer.op_type == "DequantizeLinear":
            return producer
        pending.extend((scope, value) for value in producer.input if value)
    return None


def require_float(values: np.ndarray, node: onnx.NodeProto, role: str) -> Refusal | None:
    """Scales are real numbers: an integer weight cannot absorb one exactly."""
    if values.dtype.kind not in "fV" and values.dtype.name != "bfloat16":
        return Refusal(f"{describe(node)} {role} is {values.dtype.name}; only float weights can absorb a scale")
    return None


def constant_weight_and_bias(
    graph: GraphIndex, node: onnx.NodeProto, weight_role: str, bias_role: str
) -> tuple[np.ndarray, np.ndarray | None] | Refusal:
    """A layer's constant float weight (input 1) and optional constant bias (input 2)."""
    weight = constant_input(graph, node, 1, weight_role)
    if weight is None:
        return Refusal(f"{describe(node)} has no {weight_role} input")
    if isinstance(weight, Refusal):
        return weight
    bias = constant_input(graph, node, 2, bias_role)
    if isinstance(bias, Refusal):
        return bias
    return require_float(weight, node, weight_role) or (weight, bias)


def matmul_weight(graph: GraphIndex, matmul: onnx.NodeProto, columns: int, axis: int) -> np.ndarray | Refusal:
    """A MatMul's constant 2-D float weight whose ``axis`` has ``columns`` entries
    (axis 1: output channels of ``[K, C]``; axis 0: input columns).

    A batched (3-D+) or runtime weight has no single column per channel to scale.
    """
    weight = constant_input(graph, matmul, 1, "weight")
    if weight is None:
        return Refusal(f"{describe(matmul)} has no weight input")
    if isinstance(weight, Refusal):
        return weight
    if weight.ndim != 2 or weight.shape[axis] != columns:
        wanted = f"[K, {columns}]" if axis == 1 else f"[{columns}, N]"
        return Refusal(f"{describe(matmul)} weight shape {list(weight.shape)} is not {wanted}")
    return require_float(weight, matmul, "weight") or weight


def scaled_weight(
    node: onnx.NodeProto, slot: int, weight: np.ndarray, factor: np.ndarray, role: str = "weight"
) -> TensorUpdate | Refusal:
    """``W' = W * factor`` (``factor`` float64, broadcasting to W) for input ``slot`` of
    ``node``, cast back to W's dtype in one blocked pass (:func:`fold_math.scale_with_effect`)."""
    try:
        values, change, rounding = fold_math.scale_with_effect(weight, factor, role)
    except fold_math.FoldOverflowError as error:
        return Refusal(f"{describe(node)}: {error}")
    return TensorUpdate(node, slot, values, role, change, rounding)


def cast_values(node: onnx.NodeProto, exact: np.ndarray, dtype: np.dtype, role: str) -> tuple[np.ndarray, float] | Refusal:
    """A float64 result cast back to ``dtype``, with the largest rounding error of the cast."""
    try:
        values, _, rounding = fold_math.cast_with_effect(exact, dtype, None, role)
    except fold_math.FoldOverflowError as error:
        return Refusal(f"{describe(node)}: {error}")
    return values, rounding


def cast_tensor(
    node: onnx.NodeProto, slot: int, exact: np.ndarray, dtype: np.dtype, role: str
) -> TensorUpdate | Refusal:
    """A float64 result cast back to ``dtype`` as the new input ``slot`` of ``node``."""
    cast = cast_values(node, exact, dtype, role)
    if isinstance(cast, Refusal):
        return cast
    return TensorUpdate(node, slot, cast[0], role, None, cast[1])


def added_bias(node: onnx.NodeProto, exact: np.ndarray, dtype: np.dtype, role: str) -> AddedBias | Refusal:
    """A float64 bias cast back to ``dtype``, to be added after ``node`` by a new Add."""
    cast = cast_values(node, exact, dtype, role)
    if isinstance(cast, Refusal):
        return cast
    return AddedBias(node, cast[0], role, cast[1])


def weight_and_bias_updates(
    node: onnx.NodeProto,
    weight: np.ndarray,
    factor: np.ndarray,
    bias: np.ndarray | None,
    folded_bias: np.ndarray,
    weight_role: str = "weight",
    bias_role: str = "bias",
) -> list[TensorUpdate] | Refusal:
    """New inputs 1 and 2 of a layer: ``W * factor`` and ``folded_bias`` (float64), the bias
    cast to its own dtype, or to the weight's when it is created. A missing bias stays missing
    when the fold adds nothing to it (a piece of an affine with no shift)."""
    new_weight = scaled_weight(node, 1, weight, factor, weight_role)
    if isinstance(new_weight, Refusal):
        return new_weight
    if bias is None and not np.any(folded_bias):
        return [new_weight]
    new_bias = cast_tensor(node, 2, folded_bias, weight.dtype if bias is None else bias.dtype, bias_role)
    if isinstance(new_bias, Refusal):
        return new_bias
    return [new_weight, new_bias]
