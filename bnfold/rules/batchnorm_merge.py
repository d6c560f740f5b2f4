"""An affine after a BatchNormalization merges into that BN's scale and bias.

When a BN cannot reach a layer, whatever per-channel affine follows it (a second BN, or
Caffe2's BN + Scale written as Mul → Add) is still removable:
``s * BN(x) + t = (gamma * s) * (x - mean) / sqrt(var + eps) + (beta * s + t)``, so
``gamma' = gamma * s`` and ``beta' = beta * s + t`` while mean, var and epsilon stay. It is
tried after every layer rule, and a BN that can fold into its own producer does so first in
the same pass, so this only merges what is left beside a BN that stays.
"""

from __future__ import annotations

import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, describe
from bnfold.rules.base import Absorbed, IntoProducer, channel_axis_refusal
from bnfold.rules.batchnorm import read_batchnorm
from bnfold.rules.plan import Affine, Refusal
from bnfold.rules.weights import weight_and_bias_updates


class BnMerge(IntoProducer):
    """``affine(BN(x; gamma, beta))`` → ``BN(x; gamma * s, beta * s + t)``."""

    name = "bn-merge"
    producer_ops = frozenset({"BatchNormalization"})

    def absorb(self, producer: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Absorbed | Refusal:
        earlier = read_batchnorm(producer, graph)
        if not isinstance(earlier, Affine):
            reason = earlier.reason if isinstance(earlier, Refusal) else "it is not an inference BN"
            return Refusal(f"{describe(producer)} cannot absorb it: {reason}")
        if earlier.channels != affine.channels:
            return Refusal(
                f"{describe(producer)} has {earlier.channels} channels, {describe(affine.node)} {affine.channels}"
            )
        mismatch = channel_axis_refusal(affine, producer, axis=1, rank=graph.rank_of(producer.output[0]))
        if mismatch:
            return mismatch
        gamma = graph.constant_value(producer.input[1])
        beta = graph.constant_value(producer.input[2])
        if gamma is None or beta is None:  # read_batchnorm found them constant; only a changed graph gets here
            return Refusal(f"{describe(producer)} scale or bias is not a constant")
        # gamma and beta are [C], or [C, D1, ...] for opset 7/8 spatial=0: s and t scale axis 0.
        updates = weight_and_bias_updates(
            producer, gamma, fold_math.axis_factor(affine.s, gamma.ndim, axis=0), beta,
            fold_math.fold_bias(beta, affine.s, affine.t, axis=0), weight_role="scale",
        )
        return updates if isinstance(updates, Refusal) else Absorbed(updates)
