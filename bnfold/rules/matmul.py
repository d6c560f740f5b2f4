"""MatMul → BatchNormalization: scale the weight's columns; the shift goes into a Gemm's C or an Add.

``Y = X W`` with a constant 2-D ``W = [K, C]``: output channel c is column c of W, on Y's
*last* axis. So ``BN(Y) = X (W * s) + t`` only when the affine's channel axis is Y's last
axis: always for a decomposed affine by a ``[C]`` constant, and for a BatchNormalization
(axis 1) only when Y is rank 2. For ``[N, T, C]`` a BN normalizes T, which no column of W
owns, so that is refused (as is an unknown rank).

A MatMul has no bias input. When its input X is known to be a matrix (rank 2, as for a BN1d
after a Linear), the MatMul becomes a Gemm whose C is ``t``: one node, as onnxruntime's own
MatMul + BatchNormalization fusion makes it (:func:`~bnfold.rules.base.becomes_gemm`). Of
any other rank, or of unknown rank, ``t`` goes into an Add node after it, which works for
every rank (Gemm multiplies matrices only). With ``t = 0`` the MatMul stays as it is, scaled.
A lone bias Add/Sub after a MatMul is left alone: it already is the folded form (the driver
never lets a fold merely move a bias into another node).
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, describe
from bnfold.rules.base import (
    Absorbed,
    IntoProducer,
    becomes_gemm,
    channel_axis_refusal,
    matmul_output_rank,
)
from bnfold.rules.plan import Affine, OpTypeUpdate, Refusal
from bnfold.rules.weights import added_bias, cast_tensor, matmul_weight, scaled_weight


class MatMulBn(IntoProducer):
    """``BN(MatMul(X, W))`` → ``Gemm(X, W * s, t)`` for a matrix X, else ``Add(MatMul(X, W * s), t)``."""

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
        if becomes_gemm(graph, producer, weight.dtype):
            bias = cast_tensor(producer, 2, affine.t, weight.dtype, "bias")
            if isinstance(bias, Refusal):
                return bias
            return Absorbed([scaled, bias], retyped=[OpTypeUpdate(producer, "Gemm")],
                            notes=[f"{describe(producer)} becomes a Gemm whose C holds the shift"])
        shift = added_bias(producer, affine.t, weight.dtype, "bias")
        return shift if isinstance(shift, Refusal) else Absorbed([scaled], added_biases=[shift])
