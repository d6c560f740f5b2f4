"""ConvTranspose → BatchNormalization: fold into the ConvTranspose's weight and bias.

ConvTranspose weight is ``[C_in, C_out/group, k1, ..., kn]``: output channel
``o = g * (C_out/group) + j`` is built from ``W[i, j]`` for the input channels
``i`` of group ``g``, so ``s[o]`` scales axis 1 within each group
(:func:`~bnfold.fold_math.scale_convtranspose_weight`), and ``b'[o] = b[o] * s[o] + t[o]``.
Strides, pads, dilations, output_padding and output_shape only place the
products spatially; they never mix channels, so they stay as they are.
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


class ConvTransposeIntoBatchNorm(IntoProducer):
    """``BN(ConvTranspose(x, W, b))`` → ``ConvTranspose(x, W * s per group, b * s + t)``."""

    name = "convtranspose-bn"
    producer_ops = frozenset({"ConvTranspose"})

    def absorb(
        self, producer: onnx.NodeProto, bn: BatchNorm, graph: GraphIndex
    ) -> tuple[list[TensorUpdate], dict[str, float | int]] | Refusal:
        found = constant_weight_and_bias(graph, producer, "weight", "bias")
        if isinstance(found, Refusal):
            return found
        weight, bias = found
        group = next((int(helper.get_attribute_value(a)) for a in producer.attribute if a.name == "group"), 1)
        if weight.ndim < 3 or weight.shape[0] % group or weight.shape[1] * group != bn.channels:
            return Refusal(
                f"{describe(producer)} weight shape {list(weight.shape)} with group={group} does not "
                f"give the BN's {bn.channels} channels"
            )
        mismatch = channel_axis_refusal(bn, producer, axis=1, rank=weight.ndim)
        if mismatch:
            return mismatch
        if bias is not None and bias.shape != (bn.channels,):
            return Refusal(f"{describe(producer)} bias shape {list(bias.shape)} is not [{bn.channels}]")
        updates = weight_and_bias_updates(
            producer,
            weight,
            fold_math.scale_convtranspose_weight(weight, bn.s, group),
            bias,
            fold_math.fold_bias(bias, bn.s, bn.t),
        )
        return updates if isinstance(updates, Refusal) else (updates, {})
