"""ConvTranspose → BatchNormalization: fold into the ConvTranspose's weight and bias.

ConvTranspose weight is ``[C_in, C_out/group, k1, ..., kn]``: output channel
``o = g * (C_out/group) + j`` is built from ``W[i, j]`` for the input channels
``i`` of group ``g``, so ``s[o]`` scales axis 1 within each group
(:func:`~bnfold.fold_math.convtranspose_factor`), and ``b'[o] = b[o] * s[o] + t[o]``.
Strides, pads, dilations, output_padding and output_shape only place the
products spatially; they never mix channels, so they stay as they are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import describe
from bnfold.rules.base import ScaledLayerIntoProducer
from bnfold.rules.plan import Affine, Refusal


class ConvTransposeBn(ScaledLayerIntoProducer):
    """``BN(ConvTranspose(x, W, b))`` → ``ConvTranspose(x, W * s per group, b * s + t)``."""

    name = "convtranspose-bn"
    producer_ops = frozenset({"ConvTranspose"})

    def weight_refusal(
        self, producer: onnx.NodeProto, attributes: dict[str, Any], weight: np.ndarray, affine: Affine
    ) -> Refusal | None:
        group = int(attributes.get("group", 1))
        if weight.ndim < 3 or weight.shape[0] % group or weight.shape[1] * group != affine.channels:
            return Refusal(
                f"{describe(producer)} weight shape {list(weight.shape)} with group={group} does not "
                f"give the BN's {affine.channels} channels"
            )
        return None

    def weight_factor(self, weight: np.ndarray, s: np.ndarray, attributes: dict[str, Any]) -> np.ndarray:
        return fold_math.convtranspose_factor(s, weight.shape, int(attributes.get("group", 1)))
