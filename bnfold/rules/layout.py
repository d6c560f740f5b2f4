"""Transpose, Squeeze, Unsqueeze: ops that only move axes, which an affine crosses in both directions.

tf2onnx runs channels-last Keras layers in NCHW between Transposes
(``Transpose(perm=[0, 3, 1, 2]) → Conv → Transpose(perm=[0, 2, 3, 1])``) and a
Conv1D as ``Unsqueeze → Transpose → Conv (2-D) → Squeeze``. A Keras BatchNormalization
on a model's input, or before a Conv1D, becomes ``Mul → Add`` by ``[C]`` constants on
the channels-last side, in front of those nodes.

Moving values between axes commutes with a per-channel affine: ``M(s * x + t) = s * M(x) + t``
when the constants are laid along the axis ``M`` moves channel axis ``a`` to. :func:`axis_move`
says where each axis goes; with ``z = Transpose_perm(y)``, axis ``a`` of ``z`` is axis
``perm[a]`` of ``y``::

    BN_a(Transpose_perm(y)) = Transpose_perm(BN_perm[a](y))

Preconditions: the axes ``M`` moves are known (a ``perm``, or a known input rank and constant
``axes``), and ``M`` keeps the affine's axis (Unsqueeze adds size-1 axes, which carry no
channels; Squeeze removes only size-1 axes).
"""

from __future__ import annotations

import dataclasses

import onnx

from bnfold.graph import GraphIndex, attribute, describe
from bnfold.rules.plan import Affine, Mover, Refusal


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    found = attribute(node, name)
    return None if found is None else [int(v) for v in found]


def _squeezed_axes(node: onnx.NodeProto, graph: GraphIndex) -> list[int] | None:
    """The ``axes`` of a Squeeze/Unsqueeze: an attribute before opset 13, input 1 from it on."""
    if len(node.input) > 1 and node.input[1]:
        value = graph.constant_value(node.input[1])
        return None if value is None else [int(v) for v in value.reshape(-1)]
    return _ints(node, "axes")


@dataclasses.dataclass(frozen=True)
class AxisMove:
    """How a layout node moves axes: output axis ``i`` is input axis ``sources[i]``
    (None for an axis Unsqueeze adds)."""

    sources: list[int | None]
    input_rank: int


def axis_move(node: onnx.NodeProto, graph: GraphIndex) -> AxisMove | Refusal:
    """Where each output axis of a Transpose, Squeeze or Unsqueeze comes from."""
    perm = _ints(node, "perm") if node.op_type == "Transpose" else None
    if perm is not None:
        return AxisMove(list(perm), len(perm))
    input_rank = graph.rank_of(node.input[0])
    if input_rank is None:
        verb = "reverses the axes" if node.op_type == "Transpose" else "removes or adds axes"
        return Refusal(f"{describe(node)} {verb} of an input of unknown rank")
    if node.op_type == "Transpose":
        return AxisMove(list(reversed(range(input_rank))), input_rank)
    axes = _squeezed_axes(node, graph)
    if node.op_type == "Squeeze":
        if axes is None:
            shape = graph.static_shape(node.input[0])
            if shape is None or None in shape:
                return Refusal(f"{describe(node)} squeezes every size-1 axis of an input of unknown shape")
            axes = [axis for axis, size in enumerate(shape) if size == 1]
        squeezed = {axis % input_rank for axis in axes}
        return AxisMove([axis for axis in range(input_rank) if axis not in squeezed], input_rank)
    if axes is None:
        return Refusal(f"{describe(node)} axes are not a constant")
    output_rank = input_rank + len(axes)
    added = {axis % output_rank for axis in axes}
    kept = iter(range(input_rank))
    return AxisMove([None if axis in added else next(kept) for axis in range(output_rank)], input_rank)


def absolute_axis(axis: int, rank: int | None) -> int | None:
    """A channel axis counted from the start of a rank-``rank`` tensor; None when it is out of
    range, or negative on a tensor of unknown rank."""
    if rank is None:
        return axis if axis >= 0 else None
    return axis % rank if -rank <= axis < rank else None


def channel_axis(axis: int, rank: int) -> int:
    """An absolute axis as the rules name a channel axis: 1 (NCHW) as it is, any other counted
    from the end (-1: the last)."""
    return axis if axis == 1 else axis - rank


class LayoutMover(Mover):
    """``affine(M(x)) = M(affine'(x))`` for M a Transpose, Squeeze or Unsqueeze."""

    ops = frozenset({"Transpose", "Squeeze", "Unsqueeze"})

    def backward(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal | None:
        move = axis_move(node, graph)
        if isinstance(move, Refusal):
            return move
        rank = len(move.sources)
        source = move.sources[affine.channel_axis] if -rank <= affine.channel_axis < rank else None
        if source is None:
            return Refusal(f"{describe(node)} adds the BN's axis {affine.channel_axis}")
        # The layer rules before it compare axes modulo their output's rank: the axis as it is
        # reads best in their refusals ("scales axis 0 of a rank-3 output").
        return dataclasses.replace(affine, channel_axis=source)

    def forward(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal | None:
        move = axis_move(node, graph)
        if isinstance(move, Refusal):
            return move
        axis = affine.channel_axis % move.input_rank
        if axis not in move.sources:
            return Refusal(f"{describe(node)} removes axis {affine.channel_axis}")
        return dataclasses.replace(affine, channel_axis=channel_axis(move.sources.index(axis), len(move.sources)))
