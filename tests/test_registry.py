"""The registry's promise: a new pattern is one module and one line.

A rule the package does not have (InstanceNormalization → BatchNormalization, whose per-channel
scale and bias absorb the BN like a BN's own) is written here as a small template subclass and
registered in one line; with no other change it folds directly, through the movers of the
registry (Transpose, Identity…) and is verified like every rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from bnfold.rules import BACKWARD_RULES, Affine, Refusal, build_rules
from bnfold.rules.base import ScaledLayerIntoProducer
from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare, op_count


class InstanceNormBn(ScaledLayerIntoProducer):
    """``BN(InstanceNorm(x, scale, B))`` → ``InstanceNorm(x, scale * s, B * s + t)``."""

    name = "instancenorm-bn"
    producer_ops = frozenset({"InstanceNormalization"})
    weight_role = "scale"

    def weight_refusal(
        self, producer: onnx.NodeProto, attributes: dict[str, Any], weight: np.ndarray, affine: Affine
    ) -> Refusal | None:
        return None if weight.shape == (affine.channels,) else Refusal("scale is not one value per channel")

    def output_rank(self, weight: np.ndarray) -> int:
        return 4

    def weight_factor(self, weight: np.ndarray, s: np.ndarray, attributes: dict[str, Any]) -> np.ndarray:
        return np.asarray(s, dtype=np.float64)


RULES_WITH_INSTANCE_NORM = build_rules(backward=(*BACKWARD_RULES, InstanceNormBn()))  # the one line


def _instance_norm(b: GraphBuilder, x: str, channels: int) -> str:
    return b.node("InstanceNormalization", [x, b.random("scale", [channels]), b.random("B", [channels])])


def test_a_registered_rule_folds_its_pattern() -> None:
    b = GraphBuilder(seed=1)
    b.output(b.batchnorm(_instance_norm(b, b.input("x", [2, 3, 5, 5]), 3), 3))
    check = fold_and_compare(b.model(), rules=RULES_WITH_INSTANCE_NORM)
    assert [fold.rule for fold in check.outcome.folds] == ["instancenorm-bn"]
    assert op_count(check.folded, "BatchNormalization") == 0
    assert check.outcome.folds[0].max_relative_weight_change is not None


def test_a_registered_rule_is_reached_through_the_movers() -> None:
    """``InstanceNorm → Identity → Transpose → Mul/Add by [C]``: the travelling rule moves the
    affine back to the new layer without knowing it."""
    b = GraphBuilder(seed=2)
    y = b.node("Identity", [_instance_norm(b, b.input("x", [2, 4, 3, 3]), 4)])
    nhwc = b.node("Transpose", [y], perm=[0, 2, 3, 1])
    scaled = b.node("Mul", [nhwc, b.const("m", np.linspace(0.5, 2.0, 4, dtype=np.float32))])
    b.output(b.node("Add", [scaled, b.const("a", np.linspace(-1.0, 1.0, 4, dtype=np.float32))]))
    check = fold_and_compare(b.model(), rules=RULES_WITH_INSTANCE_NORM)
    assert [fold.rule for fold in check.outcome.folds] == ["instancenorm-bn through Identity, Transpose"]
    assert [node.op_type for node in check.folded.graph.node] == ["InstanceNormalization", "Identity", "Transpose"]


def test_without_the_line_the_pattern_is_left() -> None:
    b = GraphBuilder(seed=3)
    b.output(b.batchnorm(_instance_norm(b, b.input("x", [2, 3, 5, 5]), 3), 3))
    check = fold_and_compare(b.model())
    assert not check.outcome.folds
    assert [record.reason.startswith("no foldable neighbour") for record in check.outcome.left] == [True]
