"""Gemm → BatchNormalization: fold into B (the weight) and C (the bias).

``Y = alpha * A' B' + beta * C`` with output ``[M, N]``; the BN's channel axis is
N, which is column n of B (``transB=0``, B is ``[K, N]``) or row n (``transB=1``).
Then ``BN(Y) = alpha * A' (B' * s) + beta * (C * s + t / beta)``: B is scaled
along N and ``C' = C * s + t / beta``, broadcast to ``[N]`` or kept ``[M, N]``.
``alpha`` stays. When C is absent or ``beta = 0`` (C is ignored), ``C' = t`` and
``beta`` becomes 1. transA does not matter: it only changes how A is read.
"""

from __future__ import annotations

import onnx
from onnx import helper

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


class GemmIntoBatchNorm(IntoProducer):
    """``BN(Gemm(A, B, C))`` → ``Gemm(A, B * s, C * s + t / beta)``."""

    name = "gemm-bn"
    producer_ops = frozenset({"Gemm"})

    def absorb(
        self, producer: onnx.NodeProto, bn: BatchNorm, graph: GraphIndex
    ) -> tuple[list[TensorUpdate], dict[str, float | int]] | Refusal:
        found = constant_weight_and_bias(graph, producer, "B", "C")
        if isinstance(found, Refusal):
            return found
        weight, bias = found
        attributes = {a.name: helper.get_attribute_value(a) for a in producer.attribute}
        trans_b = int(attributes.get("transB", 0))
        channel_axis = 0 if trans_b else 1
        if weight.ndim != 2 or weight.shape[channel_axis] != bn.channels:
            return Refusal(
                f"{describe(producer)} B shape {list(weight.shape)} (transB={trans_b}) "
                f"does not give the BN's {bn.channels} channels"
            )
        mismatch = channel_axis_refusal(bn, producer, axis=1, rank=2)
        if mismatch:
            return mismatch
        if bias is not None and bias.ndim > 0 and bias.shape[-1] not in (1, bn.channels):
            return Refusal(
                f"{describe(producer)} C shape {list(bias.shape)} does not broadcast to N={bn.channels}"
            )
        beta = float(attributes.get("beta", 1.0))
        new_attributes: dict[str, float | int] = {}
        if bias is None or beta == 0.0:
            # C is absent or ignored: the folded C is just t, added with beta = 1.
            if beta != 1.0:
                new_attributes["beta"] = 1.0
            bias, beta = None, 1.0
        updates = weight_and_bias_updates(
            producer,
            weight,
            fold_math.scale_along_axis(weight, bn.s, channel_axis),
            bias,
            fold_math.fold_bias(bias, bn.s, bn.t / beta),
        )
        return updates if isinstance(updates, Refusal) else (updates, new_attributes)
