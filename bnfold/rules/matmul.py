"""MatMul → BatchNormalization: scale the weight's columns, add the shift with an Add.

``Y = X W`` with a constant 2-D ``W = [K, C]``: output channel c is column c of W, on Y's
*last* axis. So ``BN(Y) = X (W * s) + t`` only when the affine's channel axis is Y's last
axis: always for a decomposed affine by a ``[C]`` constant, and for a BatchNormalization
(axis 1) only when Y is rank 2. For ``[N, T, C]`` a BN normalizes T, which no column of W
owns, so that is refused (as is an unknown rank).

A MatMul has no bias input, so ``t`` goes into an Add node added after it (none when
``t = 0``). We keep MatMul + Add rather than rewriting a rank-2 MatMul into a Gemm: it works
for every rank, keeps the op the exporter chose, and onnxruntime fuses MatMul + Add on its
own. A lone bias Add/Sub after a MatMul is left alone: it already is the folded form (the
driver never lets a fold merely move a bias Add).
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex
from bnfold.rules.base import Absorbed, IntoProducer, channel_axis_refusal, matmul_output_rank
from bnfold.rules.plan import Affine, Refusal
from bnfold.rules.weights import added_bias, matmul_weight, scaled_weight


class MatMulBn(IntoProducer):
    """``BN(MatMul(X, W))`` → ``Add(MatMul(X, W * s), t)``."""

    name = "matmul-bn"
    producer_ops = frozenset({"MatMul"})

    def absorb(self, producer: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Absorbed | Refusal:
        weight = matmul_weight(graph, producer, affine.channels, axis=1)
        if isinstance(weight, Refusal):
            return weight
        mismatch = channel_axis_refusal(affine, producer, axis=-1, rank=matmul_output_rank(graph, producer))
        if mismatch:
            return mismatch
        scaled = scaled_weight(producer, 1, weight, fold_math.axis_factor(affine.s, 2, axis=1))
        if isinstance(scaled, Refusal):
            return scaled
        if not np.any(affine.t):
            return Absorbed([scaled])
        shift = added_bias(producer, affine.t, weight.dtype, "bias")
        return shift if isinstance(shift, Refusal) else Absorbed([scaled], added_biases=[shift])
