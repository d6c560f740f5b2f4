"""MatMul → BatchNormalization: scale the weight's columns, add the shift with an Add.

``Y = X W`` with a constant 2-D ``W = [K, C]``: output channel c is column c of W,
on Y's *last* axis. So ``BN(Y) = X (W * s) + t`` only when the affine's channel
axis is Y's last axis: always for a decomposed affine by a ``[C]`` constant, and
for a BatchNormalization (axis 1) only when Y is rank 2. For ``[N, T, C]`` a BN
normalizes T, which no column of W owns, so that is refused (as is an unknown rank).

A MatMul has no bias input, so ``t`` goes into an Add node added after it
(none when ``t = 0``). We keep MatMul + Add rather than rewriting a rank-2
MatMul into a Gemm: it works for every rank, keeps the op the exporter chose,
and onnxruntime fuses MatMul + Add on its own. A lone bias Add/Sub after a
MatMul is left alone: it already is the folded form.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex
from bnfold.rules.base import (
    AddedBias,
    BatchNorm,
    FoldPlan,
    IntoProducer,
    Refusal,
    TensorUpdate,
    cast_or_refuse,
    channel_axis_refusal,
    matmul_output_rank,
    matmul_weight,
)


class MatMulIntoBatchNorm(IntoProducer):
    """``BN(MatMul(X, W))`` → ``Add(MatMul(X, W * s), t)``."""

    name = "matmul-bn"
    producer_ops = frozenset({"MatMul"})

    def plan(self, bn: BatchNorm, graph: GraphIndex) -> FoldPlan | Refusal | None:
        if len(bn.nodes) == 1 and bn.node.op_type in ("Add", "Sub"):
            return None  # folding it would append the same Add again, forever
        planned = super().plan(bn, graph)
        if not isinstance(planned, FoldPlan) or not np.any(bn.t):
            return planned
        shift = cast_or_refuse(planned.target, bn.t, planned.updates[0].values.dtype, "bias")
        if isinstance(shift, Refusal):
            return shift
        planned.added_biases.append(AddedBias(planned.target, shift, "bias"))
        return planned

    def absorb(
        self, producer: onnx.NodeProto, bn: BatchNorm, graph: GraphIndex
    ) -> tuple[list[TensorUpdate], dict[str, float | int]] | Refusal:
        weight = matmul_weight(graph, producer, bn)
        if isinstance(weight, Refusal):
            return weight
        mismatch = channel_axis_refusal(bn, producer, axis=-1, rank=matmul_output_rank(graph, producer))
        if mismatch:
            return mismatch
        scaled = cast_or_refuse(producer, fold_math.scale_along_axis(weight, bn.s, axis=1), weight.dtype, "weight")
        if isinstance(scaled, Refusal):
            return scaled
        return [TensorUpdate(producer, 1, scaled, "weight")], {}
