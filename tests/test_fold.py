"""The fixed-point driver (bnfold.fold): passes bounded by a memory budget reach the same
result, backward folds claim their layer first, and the shared helper folds a plain model."""

from __future__ import annotations

import importlib

import onnx
import pytest

from bnfold.rules import build_rules
from sample_models.generate import SAMPLES
from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare, op_count

BN = "BatchNormalization"
EXACT_PADDING = build_rules(exact_padding=True)
# The driver module; ``bnfold.fold`` on the package is the API function of the same name.
DRIVER = importlib.import_module("bnfold.fold")


def test_conv_bn_folds_through_the_support_helper() -> None:
    b = GraphBuilder(seed=0)
    x = b.input("x", [2, 3, 8, 8])
    b.output(b.batchnorm(b.conv(x, 3, 4), 4))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, BN) == 0
    assert op_count(check.folded, "Conv") == 1
    assert len(check.outcome.folds) == 1 and not check.outcome.left


@pytest.mark.parametrize("name", ["cnn_residual", "classifier_head_bn", "refused_bn", "tf_style_decomposed"])
def test_a_tiny_pass_budget_folds_exactly_what_an_unbounded_pass_folds(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    unbounded = fold_and_compare(SAMPLES[name]())
    monkeypatch.setattr(DRIVER, "PASS_BUDGET_BYTES", 0)  # one plan per pass
    bounded = fold_and_compare(SAMPLES[name]())
    assert sorted((f.batchnorm, f.target, f.rule) for f in bounded.outcome.folds) == sorted(
        (f.batchnorm, f.target, f.rule) for f in unbounded.outcome.folds
    )
    assert bounded.outcome.left == unbounded.outcome.left
    assert op_count(bounded.folded, BN) == op_count(unbounded.folded, BN)


def _padded_conv_between_two_batchnorms() -> tuple[onnx.ModelProto, int]:
    """``BN1 → padded Conv → BN2`` beside ``Conv0 → BN0``, in the node order
    [BN1, Conv0, BN0, ConvP, BN2], and the bytes BN1's forward fold plans.

    With ``--exact-padding`` BN1 folds forward into ConvP by adding a per-position bias
    after it; if that happened before BN2 folded backward into ConvP, the bias Add would
    stand between ConvP and BN2, which could then no longer fold.
    """
    b = GraphBuilder(seed=4)
    x = b.input("x", [1, 4, 6, 6])
    first = b.batchnorm(x, 4)
    b.output(b.batchnorm(b.conv(x, 4, 32, kernel=(3, 3)), 32))  # Conv0 → BN0: a bigger weight
    b.output(b.batchnorm(b.conv(first, 4, 4, kernel=(3, 3)), 4))  # ConvP (padded) → BN2
    model = b.model()
    order = [node.op_type for node in model.graph.node]
    assert order == [BN, "Conv", BN, "Conv", BN], order
    forward_bytes = 4 * 4 * 3 * 3 * 4  # ConvP's float32 weight, the one tensor BN1's fold rewrites
    return model, forward_bytes


def test_forward_folds_wait_when_a_pass_is_cut_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass that reaches its budget applies only its backward folds: the forward fold of
    BN1 waits, so that BN2 (not yet visited in that pass) claims ConvP first."""
    model, forward_bytes = _padded_conv_between_two_batchnorms()
    unbounded = fold_and_compare(model, rules=EXACT_PADDING)
    assert op_count(unbounded.folded, BN) == 0
    # BN1's plan alone stays within the budget; with BN0's the pass is over it before BN2.
    monkeypatch.setattr(DRIVER, "PASS_BUDGET_BYTES", forward_bytes)
    bounded = fold_and_compare(model, rules=EXACT_PADDING)
    assert not bounded.outcome.left and op_count(bounded.folded, BN) == 0
    assert sorted(f.rule for f in bounded.outcome.folds) == ["bn-conv", "conv-bn", "conv-bn"]
