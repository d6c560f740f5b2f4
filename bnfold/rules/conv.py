"""Conv → BatchNormalization: fold into the Conv's weight and bias.

Conv weight is ``[M, C/group, k1, ..., kn]``; output channel m owns slice
``W[m]`` whatever the group count (depthwise included), so ``W'[m] = W[m] * s[m]``
and ``b'[m] = b[m] * s[m] + t[m]`` (a missing bias counts as zero and is created).
"""

from __future__ import annotations

import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, describe
from bnfold.rules.base import (
    BatchNorm,
    IntoProducer,
    Refusal,
    TensorUpdate,
    channel_axis_refusal,
    constant_weight_and_bias,
    weight_and_bias_updates,
)


class ConvIntoBatchNorm(IntoProducer):
    """``BN(Conv(x, W, b))`` → ``Conv(x, W * s, b * s + t)``."""

    name = "conv-bn"
    producer_ops = frozenset({"Conv"})

    def absorb(
        self, producer: onnx.NodeProto, bn: BatchNorm, graph: GraphIndex
    ) -> tuple[list[TensorUpdate], dict[str, float | int]] | Refusal:
        found = constant_weight_and_bias(graph, producer, "weight", "bias")
        if isinstance(found, Refusal):
            return found
        weight, bias = found
        if weight.ndim < 3 or weight.shape[0] != bn.channels:
            return Refusal(
                f"{describe(producer)} weight shape {list(weight.shape)} does not match "
                f"the BN's {bn.channels} channels"
            )
        mismatch = channel_axis_refusal(bn, producer, axis=1, rank=weight.ndim)
        if mismatch:
            return mismatch
        if bias is not None and bias.shape != (bn.channels,):
            return Refusal(f"{describe(producer)} bias shape {list(bias.shape)} is not [{bn.channels}]")
        updates = weight_and_bias_updates(
            producer,
            weight,
            fold_math.scale_along_axis(weight, bn.s, axis=0),
            bias,
            fold_math.fold_bias(bias, bn.s, bn.t),
        )
        return updates if isinstance(updates, Refusal) else (updates, {})
