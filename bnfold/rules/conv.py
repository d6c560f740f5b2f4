"""Conv → BatchNormalization: fold into the Conv's weight and bias.

Conv weight is ``[M, C/group, k1, ..., kn]``; output channel m owns slice
``W[m]`` whatever the group count (depthwise included), so ``W'[m] = W[m] * s[m]``
and ``b'[m] = b[m] * s[m] + t[m]`` (a missing bias counts as zero and is created).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import describe
from bnfold.rules.base import ScaledLayerIntoProducer
from bnfold.rules.plan import Affine, Refusal


class ConvBn(ScaledLayerIntoProducer):
    """``BN(Conv(x, W, b))`` → ``Conv(x, W * s, b * s + t)``."""

    name = "conv-bn"
    producer_ops = frozenset({"Conv"})

    def weight_refusal(
        self, producer: onnx.NodeProto, attributes: dict[str, Any], weight: np.ndarray, affine: Affine
    ) -> Refusal | None:
        if weight.ndim < 3 or weight.shape[0] != affine.channels:
            return Refusal(
                f"{describe(producer)} weight shape {list(weight.shape)} does not match "
                f"the BN's {affine.channels} channels"
            )
        return None

    def weight_factor(self, weight: np.ndarray, s: np.ndarray, attributes: dict[str, Any]) -> np.ndarray:
        return fold_math.axis_factor(s, weight.ndim, axis=0)
