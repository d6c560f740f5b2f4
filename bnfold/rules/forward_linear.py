"""BatchNormalization → Gemm / MatMul, directly or through a Flatten: fold into the next layer.

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

MatMul has no bias input, so ``t B`` is added by a new Add node after it. That is
the one form that is right for every reader of the MatMul output and needs no
second pattern (a following ``Add(const)`` would have to be single-use and
broadcast-compatible); the BN node is replaced by that Add, so the node count
stays and the BN's four parameter vectors shrink to one bias.

Through a plain flatten (``Flatten`` at axis 1, or ``Reshape`` to ``[N | 0 | -1, C*H*W]``)
of a BN output ``[N, C, H, W]`` with static spatial sizes, channel c owns input
columns ``c*H*W ... (c+1)*H*W - 1``: the same fold with ``s`` and ``t`` repeated
``H*W`` times; the Flatten then reads the BN's input.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, attribute, attributes, describe, is_standard
from bnfold.rules.base import Absorbed, IntoConsumer
from bnfold.rules.plan import Affine, Refusal, RuleOptions
from bnfold.rules.weights import (
    added_bias,
    cast_tensor,
    constant_input,
    constant_weight_and_bias,
    matmul_weight,
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


def _into_matmul(matmul: onnx.NodeProto, s: np.ndarray, t: np.ndarray, graph: GraphIndex) -> Absorbed | Refusal:
    weight = matmul_weight(graph, matmul, s.shape[0], axis=0)
    if isinstance(weight, Refusal):
        return weight
    new_weight = scaled_weight(matmul, 1, weight, fold_math.axis_factor(s, 2, axis=0))
    if isinstance(new_weight, Refusal):
        return new_weight
    if not np.any(t):
        return Absorbed([new_weight])  # a scale alone (a Mul): nothing to add after the MatMul
    shift = added_bias(matmul, fold_math.linear_offset(weight, t, input_axis=0), weight.dtype, "bias")
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
    """``Gemm(BN(x), B, C)`` → ``Gemm(x, diag(s) B, C + (alpha/beta) t B)``; MatMul likewise, plus an Add."""

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


def _flatten_refusal(
    flatten: onnx.NodeProto, shape: tuple[int | None, ...], columns: int, graph: GraphIndex
) -> Refusal | None:
    """None when ``flatten`` turns ``[N, C, ...]`` into ``[N, columns]`` keeping the channel order."""
    if flatten.op_type == "Flatten":
        axis = int(attribute(flatten, "axis", 1))
        if axis + (len(shape) if axis < 0 else 0) != 1:
            return Refusal(f"{describe(flatten)} flattens from axis {axis}, not from the channel axis 1")
        return None
    if len(flatten.input) > 1 and graph.constant_value(flatten.input[1]) is None:
        return _runtime_reshape_refusal(flatten, graph)
    target = constant_input(graph, flatten, 1, "shape")
    if target is None or isinstance(target, Refusal):
        return target or Refusal(f"{describe(flatten)} has no shape input")
    dims = [int(d) for d in np.asarray(target).reshape(-1)]
    batch = shape[0]
    keeps_batch = {0, -1} | ({batch} if batch is not None else set())
    plain = len(dims) == 2 and (
        (dims[1] == columns and dims[0] in keeps_batch) or (dims[1] == -1 and dims[0] in keeps_batch - {-1})
    )
    if not plain or (0 in dims and int(attribute(flatten, "allowzero", 0))):
        return Refusal(f"{describe(flatten)} reshapes to {dims}, not to [N, {columns}]")
    return None


def _runtime_reshape_refusal(reshape: onnx.NodeProto, graph: GraphIndex) -> Refusal | None:
    """None when a Reshape to a shape computed at run time (``x.view(x.size(0), -1)``) is a flatten.

    A 2-D result ``[d0, d1]`` read by a Gemm / MatMul whose weight takes exactly the
    ``C*H*W`` columns (checked by :func:`into_linear`) must have ``d1 = C*H*W``, else the
    layer could not run; so ``d0 = N`` and the Reshape is the plain flatten, whatever
    computed its shape. Only the length of the shape tensor is needed.
    """
    length = graph.static_shape(reshape.input[1])
    if length == (2,):
        return None
    known = None if length is None or None in length else [d for d in length if d is not None]
    entries = "an unknown number of" if known is None else f"{math.prod(known)}"
    return Refusal(
        f"{describe(reshape)} reshapes to a shape computed at run time with {entries} entries, not [N, C*H*W]"
    )


class BnFlattenLinear(IntoConsumer):
    """``Gemm(Flatten(BN(x)))`` → ``Gemm(Flatten(x))`` with ``s``, ``t`` repeated per channel's columns."""

    name = "bn-flatten-linear"
    consumer_ops = frozenset({"Flatten", "Reshape"})

    def absorb(
        self, flatten: onnx.NodeProto, affine: Affine, graph: GraphIndex, options: RuleOptions
    ) -> Absorbed | Refusal:
        if affine.channel_axis != 1:
            return Refusal(
                f"the BN normalizes axis {affine.channel_axis}, not the channel axis {describe(flatten)} keeps"
            )
        shape = graph.static_shape(affine.input_name)
        if shape is None or len(shape) < 2 or any(d is None for d in shape[1:]):
            known = "unknown" if shape is None else [d if d is not None else "?" for d in shape]
            return Refusal(
                f"the BN input shape is {known}: without static spatial sizes, the columns "
                f"{describe(flatten)} gives each channel are unknown"
            )
        dims = [d for d in shape[1:] if d is not None]  # all known: checked above
        columns, per_channel = math.prod(dims), math.prod(dims[1:])
        refusal = _flatten_refusal(flatten, shape, columns, graph)
        if refusal:
            return refusal
        flat = flatten.output[0]
        readers = graph.consumers_of(flat)
        if flat in graph.graph_outputs or not readers:
            return Refusal(f"{describe(flatten)} output is a graph output")
        s, t = np.repeat(affine.s, per_channel), np.repeat(affine.t, per_channel)
        folded = Absorbed(updates=[], also_changed=readers)
        for reader in readers:
            if not (is_standard(reader) and reader.op_type in LINEAR_OPS):
                return Refusal(f"{describe(flatten)} output also feeds {describe(reader)}, which cannot absorb the BN")
            if list(reader.input).count(flat) != 1 or reader.input[0] != flat:
                return Refusal(f"{describe(reader)} reads {describe(flatten)} output other than as its data input")
            absorbed = into_linear(reader, s, t, graph)
            if isinstance(absorbed, Refusal):
                return absorbed
            folded.updates += absorbed.updates
            folded.added_biases += absorbed.added_biases
            folded.notes += absorbed.notes
        return folded
