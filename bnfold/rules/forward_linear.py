"""BatchNormalization → Gemm / MatMul: fold into the next layer.

With ``BN(x) = s * x + t`` on the layer's input columns (K of them) and
``Y = alpha * A B + beta * C``::

    alpha * (s * x + t) B + beta * C = alpha * x (diag(s) B) + beta * (C + (alpha / beta) * t B)

so row k of B (column k when ``transB=1``) is scaled by ``s[k]`` and
``C' = C + (alpha / beta) * t B``; alpha and beta stay. Preconditions:

1. Gemm ``transA=0`` (with ``transA=1`` the BN's channels are rows of A', not columns);
2. Gemm ``beta != 0`` (otherwise C cannot carry the shift);
3. the BN normalizes the axis the layer multiplies: the last axis of its input
   (axis 1 of a rank-2 tensor for a BatchNormalization node);
4. B / the MatMul weight is a constant 2-D float tensor with K input rows.

MatMul has no bias input. When its input is known to be a matrix (rank 2), the MatMul
becomes a Gemm whose C is ``t W``, and a bias Add that alone reads the MatMul joins C too:
one node, as onnxruntime's own BatchNormalization + MatMul fusion makes it
(:func:`~bnfold.rules.base.becomes_gemm`). Of any other rank, ``t W`` is added by a new Add
node after it, the one form that is right for every reader of the MatMul output; the BN node
is replaced by that Add, so the node count stays and the BN's four parameter vectors shrink
to one bias.

A BN before a Flatten or a Reshape into ``[N, C·H·W]`` reaches the layer through the
reshape mover (:mod:`bnfold.rules.move_reshape`), which repeats ``s`` and ``t`` once per
column of a channel.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, attributes, describe
from bnfold.rules.base import Absorbed, IntoConsumer, becomes_gemm, gemm_takes_bias
from bnfold.rules.matmul_add import matmul_and_bias_slot
from bnfold.rules.plan import (
    Affine,
    OpTypeUpdate,
    Refusal,
    Replaced,
    RuleOptions,
    TensorUpdate,
)
from bnfold.rules.weights import (
    added_bias,
    cast_tensor,
    constant_weight_and_bias,
    matmul_weight,
    require_float,
    scaled_weight,
)

LINEAR_OPS = frozenset({"Gemm", "MatMul"})


def _into_gemm(gemm: onnx.NodeProto, s: np.ndarray, t: np.ndarray, graph: GraphIndex) -> Absorbed | Refusal:
    found = constant_weight_and_bias(graph, gemm, "B", "C")
    if isinstance(found, Refusal):
        return found
    weight, bias = found
    settings = attributes(gemm)
    if int(settings.get("transA", 0)):
        return Refusal(f"{describe(gemm)} has transA=1, so the BN's channels are not the columns of its input")
    trans_b = int(settings.get("transB", 0))
    input_axis = 1 if trans_b else 0
    if weight.ndim != 2 or weight.shape[input_axis] != s.shape[0]:
        return Refusal(
            f"{describe(gemm)} B shape {list(weight.shape)} (transB={trans_b}) does not take "
            f"the BN's {s.shape[0]} input columns"
        )
    alpha, beta = float(settings.get("alpha", 1.0)), float(settings.get("beta", 1.0))
    if beta == 0.0:
        return Refusal(f"{describe(gemm)} has beta=0, so its C cannot carry the BN's shift")
    offset = fold_math.linear_offset(weight, t, input_axis)
    if bias is not None and (bias.ndim > 2 or bias.shape[-1:] not in ((), (1,), offset.shape)):
        return Refusal(f"{describe(gemm)} C shape {list(bias.shape)} does not broadcast to N={offset.shape[0]}")
    new_weight = scaled_weight(gemm, 1, weight, fold_math.axis_factor(s, 2, input_axis))
    if isinstance(new_weight, Refusal):
        return new_weight
    exact_bias = fold_math.gemm_bias_with_offset(bias, offset, alpha, beta)
    new_bias = cast_tensor(gemm, 2, exact_bias, weight.dtype if bias is None else bias.dtype, "bias")
    return new_bias if isinstance(new_bias, Refusal) else Absorbed([new_weight, new_bias])


def _bias_add_after(matmul: onnx.NodeProto, graph: GraphIndex) -> tuple[onnx.NodeProto, np.ndarray] | None:
    """The Add of a constant bias (at most a matrix) that alone reads ``matmul``, and the bias."""
    readers = graph.consumers_of(matmul.output[0])
    if len(readers) != 1 or graph.use_count(matmul.output[0]) != 1:
        return None
    found = matmul_and_bias_slot(readers[0], graph)
    if found is None:
        return None
    bias = graph.constant_value(readers[0].input[found[1]])
    if bias is None or require_float(bias, readers[0], "bias") or not gemm_takes_bias(graph, matmul, bias):
        return None
    return readers[0], bias


def _into_gemm_from_matmul(
    matmul: onnx.NodeProto, new_weight: TensorUpdate, offset: np.ndarray, dtype: np.dtype, graph: GraphIndex
) -> Absorbed | Refusal:
    """The MatMul as a Gemm whose C is the shift's offset, plus the bias of an Add after it."""
    bias_add = _bias_add_after(matmul, graph)
    exact = offset if bias_add is None else offset + bias_add[1].astype(np.float64)
    new_bias = cast_tensor(matmul, 2, exact, dtype, "bias")
    if isinstance(new_bias, Refusal):
        return new_bias
    notes = [f"{describe(matmul)} becomes a Gemm whose C holds the BN's shift"]
    replaced = []
    if bias_add is not None:
        replaced = [Replaced(bias_add[0], matmul)]
        notes[0] += f" and the bias of {describe(bias_add[0])}"
    return Absorbed([new_weight, new_bias], retyped=[OpTypeUpdate(matmul, "Gemm")], replaced=replaced, notes=notes)


def _into_matmul(matmul: onnx.NodeProto, s: np.ndarray, t: np.ndarray, graph: GraphIndex) -> Absorbed | Refusal:
    weight = matmul_weight(graph, matmul, s.shape[0], axis=0)
    if isinstance(weight, Refusal):
        return weight
    new_weight = scaled_weight(matmul, 1, weight, fold_math.axis_factor(s, 2, axis=0))
    if isinstance(new_weight, Refusal):
        return new_weight
    offset = fold_math.linear_offset(weight, t, input_axis=0)
    if becomes_gemm(graph, matmul, weight.dtype):
        return _into_gemm_from_matmul(matmul, new_weight, offset, weight.dtype, graph)
    if not np.any(t):
        # A pure scale (a Mul): no shift to add. An Add of zeros would be read as an affine
        # itself and folded back into the MatMul, reported as a fold of a node bnfold made.
        return Absorbed([new_weight])
    shift = added_bias(matmul, offset, weight.dtype, "bias")
    if isinstance(shift, Refusal):
        return shift
    return Absorbed(
        [new_weight], added_biases=[shift],
        notes=[f"{describe(matmul)} has no bias input: the BN's shift is added after it"],
    )


def into_linear(layer: onnx.NodeProto, s: np.ndarray, t: np.ndarray, graph: GraphIndex) -> Absorbed | Refusal:
    """Fold ``s * x + t`` on the input columns of a Gemm or MatMul into its tensors."""
    return (_into_gemm if layer.op_type == "Gemm" else _into_matmul)(layer, s, t, graph)


class BnLinear(IntoConsumer):
    """``Gemm(BN(x), B, C)`` → ``Gemm(x, diag(s) B, C + (alpha/beta) t B)``; a MatMul likewise
    becomes a Gemm (a matrix input) or gets an Add."""

    name = "bn-linear"
    consumer_ops = LINEAR_OPS

    def absorb(
        self, consumer: onnx.NodeProto, affine: Affine, graph: GraphIndex, options: RuleOptions
    ) -> Absorbed | Refusal:
        if affine.channel_axis != -1:
            # Gemm's A is 2-D by definition; a MatMul input can have any rank.
            shape = (None, None) if consumer.op_type == "Gemm" else graph.static_shape(affine.input_name)
            if shape is None:
                return Refusal(
                    f"the rank of the BN input '{affine.input_name}' is unknown, so it cannot be matched "
                    f"to the columns {describe(consumer)} multiplies"
                )
            if len(shape) != affine.channel_axis + 1:
                return Refusal(
                    f"the BN normalizes axis {affine.channel_axis} of a rank-{len(shape)} tensor, "
                    f"but {describe(consumer)} multiplies its last axis"
                )
        return into_linear(consumer, affine.s, affine.t, graph)
