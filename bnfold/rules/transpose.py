"""Layer → Transpose / Squeeze / Unsqueeze / Identity / Dropout → BatchNormalization: fold through
the middle node.

Sequence models apply BatchNorm1d to a Linear's output by transposing its
features onto axis 1: ``bn(fc(x).transpose(1, 2))``, exported as
``MatMul → Add → Transpose(perm=[0, 2, 1]) → BatchNormalization``; tf2onnx writes
an NHWC BN after a Conv as ``Conv → Transpose(perm=[0, 2, 3, 1]) → Mul → Add``;
tf2onnx writes a BN after a Conv1D as ``Conv → Squeeze → Mul → Add``; older exporters
leave an ``Identity`` or an inference ``Dropout`` after a layer.

A Transpose only moves axes: with ``z = Transpose_perm(y)``, axis ``a`` of ``z`` is
axis ``perm[a]`` of ``y``, so an affine scaling axis ``a`` of ``z`` equals the
Transpose of the same affine scaling axis ``perm[a]`` of ``y``::

    BN_a(Transpose_perm(y)) = Transpose_perm(BN_perm[a](y))

(Squeeze and Unsqueeze move axes too: :func:`~bnfold.rules.layout.axis_move`;
Identity and inference Dropout move nothing: ``perm[a] = a``.) The right-hand
affine sits directly after the layer, so the ordinary backward rules fold it; the
middle node then writes the BN's output. Preconditions: the middle node's output
feeds only the BN, a Dropout is in inference mode with its mask unused, and the
layer's rule accepts the moved axis (e.g. a MatMul's channels are its last axis,
a Conv's axis 1). A Gemm whose fold would change its ``beta`` (C absent or ignored,
``beta != 1``) is refused: plan attributes apply to the plan's target, the middle node.
"""

from __future__ import annotations

import dataclasses

import onnx

from bnfold.graph import GraphIndex, describe
from bnfold.rules.base import BatchNorm, FoldPlan, FoldRule, Refusal, is_standard
from bnfold.rules.conv import ConvIntoBatchNorm
from bnfold.rules.convtranspose import ConvTransposeIntoBatchNorm
from bnfold.rules.gemm import GemmIntoBatchNorm
from bnfold.rules.layout import LAYOUT_OPS, axis_move
from bnfold.rules.matmul import MatMulIntoBatchNorm
from bnfold.rules.matmul_add import MatMulAddIntoBatchNorm

# The backward rules, tried on the affine moved before the middle node.
LAYER_RULES: tuple[FoldRule, ...] = (
    ConvIntoBatchNorm(), GemmIntoBatchNorm(), ConvTransposeIntoBatchNorm(), MatMulIntoBatchNorm(),
    MatMulAddIntoBatchNorm(),
)


def _moved_axis(node: onnx.NodeProto, bn: BatchNorm, graph: GraphIndex) -> int | Refusal | None:
    """The axis of ``node``'s input that the BN's channel axis comes from, or None if
    ``node`` is not a Transpose, Squeeze, Unsqueeze, Identity or inference Dropout."""
    if not is_standard(node):
        return None
    if node.op_type == "Identity":
        return bn.channel_axis
    if node.op_type == "Dropout":
        mask_used = len(node.output) > 1 and node.output[1] and graph.use_count(node.output[1])
        training = graph.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else False
        if mask_used or training is None or bool(training):
            return Refusal(f"{describe(node)} may drop values (training mode or its mask is used)")
        return bn.channel_axis
    if node.op_type not in LAYOUT_OPS:
        return None
    move = axis_move(node, graph)
    if isinstance(move, Refusal):
        return move
    axis = move.sources[bn.channel_axis]
    return Refusal(f"{describe(node)} adds the BN's axis {bn.channel_axis}") if axis is None else axis


class TransposedLayerIntoBatchNorm(FoldRule):
    """``BN(Transpose(layer(x)))`` → ``Transpose(layer'(x))``; likewise through Squeeze, Unsqueeze,
    Identity or Dropout."""

    name = "layer-transpose-bn"

    def plan(self, bn: BatchNorm, graph: GraphIndex) -> FoldPlan | Refusal | None:
        middle = graph.producer_of(bn.input_name)
        if middle is None:
            return None
        axis = _moved_axis(middle, bn, graph)
        if axis is None or isinstance(axis, Refusal):
            return axis
        other_uses = graph.other_uses(bn.input_name, besides=bn.nodes[0])
        if other_uses:
            return Refusal(f"{describe(middle)} output also feeds {', '.join(other_uses)}")
        moved = dataclasses.replace(
            bn, nodes=(middle,), input_name=middle.input[0], output_name=middle.output[0], channel_axis=axis
        )
        refusals = []
        for rule in LAYER_RULES:
            inner = rule.plan(moved, graph)
            if isinstance(inner, FoldPlan) and inner.attributes:
                inner = Refusal(f"{describe(inner.target)} would need {', '.join(inner.attributes)} changed")
            if isinstance(inner, FoldPlan):
                if inner.added_biases and len(bn.nodes) == 1 and bn.node.op_type in ("Add", "Sub"):
                    return None  # it would only move a bias Add before the middle node
                return FoldPlan(
                    rule=f"{inner.rule} through {middle.op_type}",
                    bn=bn,
                    target=middle,
                    direction="backward",
                    updates=inner.updates,
                    notes=[*inner.notes, f"{describe(inner.target)} absorbs the BN; {describe(middle)} "
                                         "now writes the BN's output"],
                    also_targets=[inner.target],
                    added_biases=inner.added_biases,
                )
            if isinstance(inner, Refusal):
                refusals.append(f"through {describe(middle)}: {inner.reason}")
        return Refusal("; ".join(refusals)) if refusals else None
