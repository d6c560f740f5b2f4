"""What bnfold folds of the generated travel models (``tests/travel_models.py``), op class by op class.

For every generator whose BNs travel through one op or a chain of them (pools, resizes,
slices, splits, pads, reshapes, Shape readers, pass-through chains) and for the rank-2
linear layers: the folded model matches the original in onnxruntime, exactly the BNs the
case says stay are left, each with a reason of the kind the case names, and the node counts
the case fixes hold. Shapes, attributes and signs of γ are drawn by hypothesis.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings

from tests.support import fold_and_compare, op_count
from tests.travel_models import (
    COUNTED_PADDING,
    GENERATORS,
    NEGATIVE_SCALE,
    NOT_ABSORBABLE,
    OTHER_AXIS,
    OTHER_READER,
    PADDED_CONSTANT,
    SCALE_VARIES,
    TravelCase,
    sample,
    travel_cases,
)

EXAMPLES = 25
MOVER_GENERATORS = ("pool", "resize", "slice", "split", "pad", "reshape", "linear", "shape-reader", "chain")

# A distinctive part of the reason a rule gives for each kind of BN that must stay.
REASON_OF_KIND = {
    NEGATIVE_SCALE: r"negative scale at channel \d+ turns the max into a min",
    COUNTED_PADDING: r"counts its padding \(count_include_pad=1\)",
    PADDED_CONSTANT: r"pads with the constant .* which the affine would change",
    OTHER_READER: r"also (feeds|writes)",
    NOT_ABSORBABLE: r"cannot absorb it",
    # No axis holds whole channels, or the one that does is not the layer's channel axis.
    SCALE_VARIES: r"scale would vary within a channel|scales axis -?\d+ of a rank-\d+ output",
    OTHER_AXIS: r"(scales|normalizes) axis -?\d+ of a rank-\d+",
}


def check_fold(case: TravelCase) -> None:
    check = fold_and_compare(case.model)
    left = check.outcome.left
    assert len(left) == case.batchnorms_left, (case.description, [record.reason for record in left])
    assert len(check.outcome.folds) >= case.batchnorms - case.batchnorms_left, case.description
    assert op_count(check.folded, "BatchNormalization") == case.batchnorms_left
    for record, kind in zip(left, case.refusals):
        assert re.search(REASON_OF_KIND[kind], record.reason), (case.description, kind, record.reason)
    for op_type, count in case.ops_after.items():
        assert op_count(check.folded, op_type) == count, (case.description, op_type)


@pytest.mark.parametrize("name", MOVER_GENERATORS)
def test_generated_travel_models_fold_as_their_case_says(name: str) -> None:
    @settings(max_examples=EXAMPLES)
    @given(case=travel_cases(GENERATORS[name]))
    def check(case: TravelCase) -> None:
        check_fold(case)

    check()


@pytest.mark.parametrize("name", MOVER_GENERATORS)
def test_cases_of_every_outcome_fold_as_their_case_says(name: str) -> None:
    """Seeded cases, among them ones that must stay (hypothesis may shrink towards folds)."""
    cases = [sample(GENERATORS[name], seed) for seed in range(12)]
    for case in cases:
        check_fold(case)
