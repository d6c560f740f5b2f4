"""Layer → Transpose → BatchNormalization: fold through the Transpose into the layer.

Sequence models apply BatchNorm1d to a Linear's output by transposing its
features onto axis 1: ``bn(fc(x).transpose(1, 2))``, exported as
``MatMul → Add → Transpose(perm=[0, 2, 1]) → BatchNormalization``; tf2onnx writes
an NHWC BN after a Conv as ``Conv → Transpose(perm=[0, 2, 3, 1]) → Mul → Add``.

A Transpose only moves axes: with ``z = Transpose_perm(y)``, axis ``a`` of ``z`` is
axis ``perm[a]`` of ``y``, so an affine scaling axis ``a`` of ``z`` equals the
Transpose of the same affine scaling axis ``perm[a]`` of ``y``::

    BN_a(Transpose_perm(y)) = Transpose_perm(BN_perm[a](y))

The right-hand affine sits directly after the layer, so the ordinary backward
rules fold it; the Transpose then writes the BN's output. Preconditions: the
Transpose output feeds only the BN, and the layer's rule accepts the moved axis
(e.g. a MatMul's channels are its last axis, a Conv's axis 1). Gemm is not offered:
its output is 2-D, and the only Transpose of it moves the channels to axis 0.
"""

from __future__ import annotations

import dataclasses

from onnx import helper

from bnfold.graph import GraphIndex, describe
from bnfold.rules.base import BatchNorm, FoldPlan, FoldRule, Refusal, is_standard
from bnfold.rules.conv import ConvIntoBatchNorm
from bnfold.rules.convtranspose import ConvTransposeIntoBatchNorm
from bnfold.rules.matmul import MatMulIntoBatchNorm
from bnfold.rules.matmul_add import MatMulAddIntoBatchNorm

# Backward rules whose plans change only tensors (no attributes of their target).
LAYER_RULES: tuple[FoldRule, ...] = (
    ConvIntoBatchNorm(), ConvTransposeIntoBatchNorm(), MatMulIntoBatchNorm(), MatMulAddIntoBatchNorm(),
)


class TransposedLayerIntoBatchNorm(FoldRule):
    """``BN(Transpose(layer(x)))`` → ``Transpose(layer'(x))``."""

    name = "layer-transpose-bn"

    def plan(self, bn: BatchNorm, graph: GraphIndex) -> FoldPlan | Refusal | None:
        transpose = graph.producer_of(bn.input_name)
        if transpose is None or transpose.op_type != "Transpose" or not is_standard(transpose):
            return None
        other_uses = graph.other_uses(bn.input_name, besides=bn.nodes[0])
        if other_uses:
            return Refusal(f"{describe(transpose)} output also feeds {', '.join(other_uses)}")
        perm = next((list(helper.get_attribute_value(a)) for a in transpose.attribute if a.name == "perm"), None)
        if perm is None:
            rank = graph.rank_of(transpose.input[0])
            if rank is None:
                return Refusal(f"{describe(transpose)} reverses the axes of an input of unknown rank")
            perm = list(reversed(range(rank)))
        moved = dataclasses.replace(
            bn, nodes=(transpose,), input_name=transpose.input[0], output_name=transpose.output[0],
            channel_axis=perm[bn.channel_axis],
        )
        refusals = []
        for rule in LAYER_RULES:
            inner = rule.plan(moved, graph)
            if isinstance(inner, FoldPlan):
                return FoldPlan(
                    rule=f"{inner.rule} through Transpose",
                    bn=bn,
                    target=transpose,
                    direction="backward",
                    updates=inner.updates,
                    notes=[*inner.notes, f"{describe(inner.target)} absorbs the BN; {describe(transpose)} "
                                         "now writes the BN's output"],
                    also_targets=[inner.target],
                    added_biases=inner.added_biases,
                )
            if isinstance(inner, Refusal):
                refusals.append(f"through {describe(transpose)}: {inner.reason}")
        return Refusal("; ".join(refusals)) if refusals else None
