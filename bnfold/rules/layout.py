"""Folding across a node that only moves axes: Transpose, Squeeze, Unsqueeze.

tf2onnx runs channels-last Keras layers in NCHW between Transposes
(``Transpose(perm=[0, 3, 1, 2]) → Conv → Transpose(perm=[0, 2, 3, 1])``) and a
Conv1D as ``Unsqueeze → Conv (2-D) → Squeeze``. A Keras BatchNormalization that
TensorFlow did not fuse becomes ``Mul → Add`` on whichever side of such a node its
optimizer left it: behind the ``Squeeze`` of a Conv1D, or on the NHWC input in
front of the ``Transpose`` of the first Conv.

Moving values between axes commutes with a per-channel affine: ``M(s * x + t) =
s * M(x) + t`` when the constants are laid along the axis ``M`` moves channel
axis ``a`` to. So the affine is folded by the ordinary layer rules, as if it sat
on the layer's side of ``M``:

* backward, ``layer → M → affine`` becomes ``layer' → M``: the affine on output
  axis ``a`` of ``M`` is the affine on input axis ``axes[a]`` of ``M``, the layer's
  output; ``M`` stays and takes over the affine's output name;
* forward, ``affine → M → layer`` becomes ``M → layer'``: the affine on input axis
  ``a`` of ``M`` is the affine on output axis ``axes.index(a)``; ``M`` reads the
  affine's input instead.

where ``axes[i]`` is the input axis that output axis ``i`` of ``M`` comes from
(:func:`axis_move`). Preconditions, besides those of the layer rule:

1. the value between ``M`` and the affine is read by nothing else and is not a graph
   output (the other readers need the un-normalized values);
2. the axes ``M`` moves are known (constant ``axes``, a known input rank);
3. the affine's axis comes from an axis of the other side (not one ``Unsqueeze`` adds).
"""

from __future__ import annotations

import dataclasses

import onnx
from onnx import helper

from bnfold.graph import GraphIndex, describe
from bnfold.rules.base import BatchNorm, FoldPlan, FoldRule, IntoConsumer, IntoProducer, Refusal, is_standard

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
        return AxisMove(perm, len(perm))
    input_rank = graph.rank_of(node.input[0])
    if input_rank is None:
        return Refusal(f"the rank of the input of {describe(node)} is unknown")
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


def _across(bn: BatchNorm, layout: onnx.NodeProto, reason: str) -> Refusal:
    return Refusal(f"{describe(bn.node)} across {describe(layout)}: {reason}")


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
    """The first layer rule's plan for the affine moved across ``layout``, made to remove
    the real affine's nodes; else the layer rules' refusals, or None if none matched."""
    refusals = []
    for rule in rules:
        planned = rule.plan(moved, graph)
        if isinstance(planned, FoldPlan):
            layer_rule, _, crossed = planned.rule.partition(" across ")  # crossed: layout nodes after this one
            return dataclasses.replace(
                planned, rule=f"{layer_rule} across {', '.join(filter(None, (layout.op_type, crossed)))}", bn=bn,
                notes=[f"across {describe(layout)}", *planned.notes],
            )
        if isinstance(planned, Refusal):
            refusals.append(planned.reason)
    return _across(bn, layout, "; ".join(refusals)) if refusals else None


class LayerAcrossLayout(FoldRule):
    """``affine(M(layer(x)))`` → ``M(layer'(x))`` for ``M`` a Transpose, Squeeze or Unsqueeze."""

    name = "layout-bn"

    def __init__(self, rules: tuple[FoldRule, ...]) -> None:
        self.rules = tuple(rule for rule in rules if isinstance(rule, IntoProducer))

    def plan(self, bn: BatchNorm, graph: GraphIndex) -> FoldPlan | Refusal | None:
        layout = graph.producer_of(bn.input_name)
        if layout is None or not is_standard(layout) or layout.op_type not in LAYOUT_OPS:
            return None
        layer = graph.producer_of(layout.input[0])
        rules = tuple(rule for rule in self.rules if layer is not None and layer.op_type in rule.producer_ops)
        if not rules:
            return None
        other_uses = graph.other_uses(bn.input_name, besides=bn.nodes[0])
        if other_uses:
            return _across(bn, layout, f"{describe(layout)} output also feeds {', '.join(other_uses)}")
        move = axis_move(layout, graph)
        if isinstance(move, Refusal):
            return _across(bn, layout, move.reason)
        axis = move.sources[bn.channel_axis % len(move.sources)]
        if axis is None:
            return _across(bn, layout, f"axis {bn.channel_axis} is one {describe(layout)} adds")
        # The layer rule sees the affine on the layer's output, read by M alone.
        moved = dataclasses.replace(
            bn, nodes=(layout,), input_name=layout.input[0], channel_axis=_as_channel_axis(axis, move.input_rank)
        )
        planned = _plan_moved(rules, moved, bn, layout, graph)
        # M stays between the layer and the affine's readers: it takes over the affine's output.
        return dataclasses.replace(planned, output_node=layout) if isinstance(planned, FoldPlan) else planned


class LayoutAcrossLayer(FoldRule):
    """``layer(M(affine(x)))`` → ``layer'(M(x))`` for ``M`` a Transpose, Squeeze or Unsqueeze.

    ``M`` may be a chain of them (tf2onnx's Conv1D reads its NLC input through
    ``Unsqueeze → Transpose``): the affine is moved across one node at a time.
    """

    name = "bn-layout"

    def __init__(self, rules: tuple[FoldRule, ...]) -> None:
        self.rules = tuple(rule for rule in rules if isinstance(rule, IntoConsumer))

    def plan(self, bn: BatchNorm, graph: GraphIndex) -> FoldPlan | Refusal | None:
        layout = _sole_layout_reader(graph, bn.output_name)
        if layout is None:
            return None
        move = axis_move(layout, graph)
        if isinstance(move, Refusal):
            return _across(bn, layout, move.reason)
        axis = bn.channel_axis % move.input_rank
        if axis not in move.sources:
            return _across(bn, layout, f"{describe(layout)} removes axis {bn.channel_axis}")
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
