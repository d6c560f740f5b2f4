"""The fixed-point driver: passes bounded by a memory budget reach the same result."""

from __future__ import annotations

import importlib

import pytest

from sample_models.generate import SAMPLES
from tests.support import fold_and_compare, op_count


@pytest.mark.parametrize("name", ["cnn_residual", "classifier_head_bn", "refused_bn", "tf_style_decomposed"])
def test_a_tiny_pass_budget_folds_exactly_what_an_unbounded_pass_folds(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    unbounded = fold_and_compare(SAMPLES[name]())
    # The module, not the function ``bnfold.fold`` that shadows its name on the package.
    monkeypatch.setattr(importlib.import_module("bnfold.fold"), "PASS_BUDGET_BYTES", 0)  # one plan per pass
    bounded = fold_and_compare(SAMPLES[name]())
    assert sorted((f.batchnorm, f.target, f.rule) for f in bounded.outcome.folds) == sorted(
        (f.batchnorm, f.target, f.rule) for f in unbounded.outcome.folds
    )
    assert bounded.outcome.left == unbounded.outcome.left
    assert op_count(bounded.folded, "BatchNormalization") == op_count(unbounded.folded, "BatchNormalization")
