"""Nodes that only move axes (Transpose, Squeeze, Unsqueeze), and the forward fold through them.

tf2onnx runs channels-last Keras layers in NCHW between Transposes
(``Transpose(perm=[0, 3, 1, 2]) → Conv → Transpose(perm=[0, 2, 3, 1])``) and a
Conv1D as ``Unsqueeze → Transpose → Conv (2-D) → Squeeze``. A Keras BatchNormalization
on a model's input, or before a Conv1D, becomes ``Mul → Add`` by ``[C]`` constants on
the channels-last side, in front of those nodes.

Moving values between axes commutes with a per-channel affine: ``M(s * x + t) =
s * M(x) + t`` when the constants are laid along the axis ``M`` moves channel axis
``a`` to. :func:`axis_move` says where each axis goes; the backward fold through such
a node is :mod:`bnfold.rules.transpose`. Forward, ``layer(M(affine(x)))`` becomes
``layer'(M(x))``: the affine on input axis ``a`` of ``M`` is the affine on output axis
``sources.index(a)``, which the ordinary forward rules fold; ``M`` then reads the
affine's input. Preconditions, besides those of the layer rule:

1. the affine's output is read by ``M`` alone and is not a graph output;
2. the axes ``M`` moves are known (a ``perm`` or a known input rank, constant ``axes``);
3. ``M`` keeps the affine's axis (Squeeze removes only size-1 axes, so it always does).

A chain of such nodes (Unsqueeze → Transpose) is crossed one node at a time.
"""

from __future__ import annotations

import dataclasses

import onnx
from onnx import helper

from bnfold.graph import GraphIndex, describe
from bnfold.rules.base import BatchNorm, FoldPlan, FoldRule, IntoConsumer, Refusal, is_standard

LAYOUT_OPS = frozenset({"Transpose", "Squeeze", "Unsqueeze"})


def _attribute(node: onnx.NodeProto, name: str) -> list[int] | None:
    found = next((a for a in node.attribute if a.name == name), None)
    return None if found is None else [int(v) for v in helper.get_attribute_value(found)]


def _squeezed_axes(node: onnx.NodeProto, graph: GraphIndex) -> list[int] | None:
    """The ``axes`` of a Squeeze/Unsqueeze: an attribute before opset 13, input 1 from it on."""
    if len(node.input) > 1 and node.input[1]:
        value = graph.constant_value(node.input[1])
        return None if value is None else [int(v) for v in value.reshape(-1)]
    return _attribute(node, "axes")


@dataclasses.dataclass(frozen=True)
class AxisMove:
    """How a layout node moves axes: output axis ``i`` is input axis ``sources[i]``
    (None for an axis Unsqueeze adds)."""

    sources: list[int | None]
    input_rank: int


def axis_move(node: onnx.NodeProto, graph: GraphIndex) -> AxisMove | Refusal:
    """Where each output axis of a Transpose, Squeeze or Unsqueeze comes from."""
    perm = _attribute(node, "perm") if node.op_type == "Transpose" else None
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


def _as_channel_axis(axis: int, rank: int) -> int:
    """Axis 1 as the rules' NCHW channel axis, any other as counted from the end (-1: last)."""
    return axis if axis == 1 else axis - rank


def _through(layout: onnx.NodeProto, reason: str) -> Refusal:
    return Refusal(f"through {describe(layout)}: {reason}")


def _sole_layout_reader(graph: GraphIndex, value: str) -> onnx.NodeProto | None:
    """The standard-domain Transpose/Squeeze/Unsqueeze that is the only reader of ``value``."""
    readers = graph.consumers_of(value)
    if len(readers) != 1 or value in graph.graph_outputs:
        return None
    reader = readers[0]
    if not (is_standard(reader) and reader.op_type in LAYOUT_OPS and reader.input[0] == value):
        return None
    return reader


def _plan_moved(
    rules: tuple[FoldRule, ...], moved: BatchNorm, bn: BatchNorm, layout: onnx.NodeProto, graph: GraphIndex
) -> FoldPlan | Refusal | None:
    """The first layer rule's plan for the affine moved through ``layout``, made to remove
    the real affine's nodes; else the layer rules' refusals, or None if none matched."""
    refusals = []
    for rule in rules:
        planned = rule.plan(moved, graph)
        if isinstance(planned, FoldPlan):
            layer_rule, _, crossed = planned.rule.partition(" through ")  # crossed: layout nodes after this one
            return dataclasses.replace(
                planned, rule=f"{layer_rule} through {', '.join(filter(None, (layout.op_type, crossed)))}", bn=bn,
                notes=[f"through {describe(layout)}", *planned.notes],
            )
        if isinstance(planned, Refusal):
            refusals.append(planned.reason)
    return _through(layout, "; ".join(refusals)) if refusals else None


class ThroughLayoutIntoConsumer(FoldRule):
    """``layer(M(affine(x)))`` → ``layer'(M(x))`` for ``M`` a Transpose, Squeeze or Unsqueeze,
    or a chain of them (the rule tries itself on the node after ``M``)."""

    name = "bn-layout-layer"

    def __init__(self, rules: tuple[FoldRule, ...]) -> None:
        self.rules = tuple(rule for rule in rules if isinstance(rule, IntoConsumer))

    def plan(self, bn: BatchNorm, graph: GraphIndex) -> FoldPlan | Refusal | None:
        layout = _sole_layout_reader(graph, bn.output_name)
        if layout is None:
            return None
        move = axis_move(layout, graph)
        if isinstance(move, Refusal):
            return _through(layout, move.reason)
        axis = bn.channel_axis % move.input_rank
        if axis not in move.sources:
            return _through(layout, f"{describe(layout)} removes axis {bn.channel_axis}")
        # The layer rules see the affine on M's output; its readers already read that value.
        moved = dataclasses.replace(
            bn,
            input_name=layout.output[0],
            output_name=layout.output[0],
            channel_axis=_as_channel_axis(move.sources.index(axis), len(move.sources)),
        )
        planned = _plan_moved((*self.rules, self), moved, bn, layout, graph)
        if not isinstance(planned, FoldPlan):
            return planned
        # M now reads the affine's input (the rewrite rewires every target reading its output).
        return dataclasses.replace(planned, also_targets=[*planned.also_targets, layout])
