"""Gemm → BatchNormalization: fold into B (the weight) and C (the bias).

``Y = alpha * A' B' + beta * C`` with output ``[M, N]``; the BN's channel axis is
N, which is column n of B (``transB=0``, B is ``[K, N]``) or row n (``transB=1``).
Then ``BN(Y) = alpha * A' (B' * s) + beta * (C * s + t / beta)``: B is scaled
along N and ``C' = C * s + t / beta``, broadcast to ``[N]`` or kept ``[M, N]``.
``alpha`` stays. When C is absent or ``beta = 0`` (C is ignored), ``C' = t`` and
``beta`` becomes 1. transA does not matter: it only changes how A is read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import describe
from bnfold.rules.base import ScaledLayerIntoProducer
from bnfold.rules.plan import Affine, Refusal


def _channel_axis(attributes: dict[str, Any]) -> int:
    """The axis of B that indexes N: rows when B is stored transposed."""
    return 0 if int(attributes.get("transB", 0)) else 1


class GemmBn(ScaledLayerIntoProducer):
    """``BN(Gemm(A, B, C))`` → ``Gemm(A, B * s, C * s + t / beta)``."""

    name = "gemm-bn"
    producer_ops = frozenset({"Gemm"})
    weight_role = "B"
    bias_role = "C"

    def weight_refusal(
        self, producer: onnx.NodeProto, attributes: dict[str, Any], weight: np.ndarray, affine: Affine
    ) -> Refusal | None:
        if weight.ndim != 2 or weight.shape[_channel_axis(attributes)] != affine.channels:
            return Refusal(
                f"{describe(producer)} B shape {list(weight.shape)} (transB={int(attributes.get('transB', 0))}) "
                f"does not give the BN's {affine.channels} channels"
            )
        return None

    def output_rank(self, weight: np.ndarray) -> int:
        return 2

    def weight_factor(self, weight: np.ndarray, s: np.ndarray, attributes: dict[str, Any]) -> np.ndarray:
        return fold_math.axis_factor(s, weight.ndim, _channel_axis(attributes))

    def bias_refusal(self, producer: onnx.NodeProto, bias: np.ndarray | None, affine: Affine) -> Refusal | None:
        """C broadcasts to ``[M, N]``: any shape whose last axis is 1 or N will do."""
        if bias is not None and bias.ndim > 0 and bias.shape[-1] not in (1, affine.channels):
            return Refusal(
                f"{describe(producer)} C shape {list(bias.shape)} does not broadcast to N={affine.channels}"
            )
        return None

    def bias_terms(
        self, bias: np.ndarray | None, affine: Affine, attributes: dict[str, Any]
    ) -> tuple[np.ndarray | None, np.ndarray, dict[str, float | int]]:
        """``C' = C * s + t / beta``; with C absent or ignored (beta = 0), ``C' = t`` and beta = 1."""
        beta = float(attributes.get("beta", 1.0))
        if bias is None or beta == 0.0:
            return None, affine.t, ({} if beta == 1.0 else {"beta": 1.0})
        return bias, affine.t / beta, {}
