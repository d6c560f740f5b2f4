"""The travel generators (``tests/travel_models.py``) build models that run and say the truth.

Every generator is sampled through hypothesis: each model passes the checker (the
builder checks it), runs in onnxruntime with graph optimizations disabled, and holds
the BatchNormalizations its case describes. Where a case carries a reference model (the
BN's map applied at the layer that should absorb it, or sibling branches merged into one
Conv), the reference computes the same outputs exactly when no BN must stay, so every
"folds" and every numerical "must stay" the generators claim is checked here. Nothing
here asserts what bnfold folds: the rules for these models do not exist yet.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings

from bnfold.inputs import generate_inputs, input_specs
from tests.support import op_count, run_onnxruntime
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

EXAMPLES = 40
REASON_KINDS = {NEGATIVE_SCALE, COUNTED_PADDING, PADDED_CONSTANT, OTHER_READER, NOT_ABSORBABLE, SCALE_VARIES,
                OTHER_AXIS}
# Generators whose construction includes a BN that must stay (the others always fold).
REFUSING = {"pool", "split", "pad", "reshape", "concat", "add", "siblings", "shape-reader", "chain"}


def run(model: onnx.ModelProto, seed: int = 0) -> list[np.ndarray]:
    return run_onnxruntime(model, generate_inputs(input_specs(model, {}), seed))


def check_case(name: str, case: TravelCase) -> None:
    assert case.generator == name
    assert case.batchnorms >= 1 and case.batchnorms_left <= case.batchnorms
    assert set(case.refusals) <= REASON_KINDS
    outputs = run(case.model)
    assert all(np.isfinite(output).all() for output in outputs)
    if case.reference is None:
        return
    expected = run(case.reference)
    assert [output.shape for output in outputs] == [output.shape for output in expected]
    differences = [float(np.max(np.abs(a.astype(np.float64) - b), initial=0.0)) for a, b in zip(outputs, expected)]
    if case.refusals:
        assert max(differences) > 1e-3, f"claimed to stay, but moving the BN changes nothing: {case.description}"
    else:
        for output, reference in zip(outputs, expected):
            np.testing.assert_allclose(output, reference, atol=1e-4, rtol=1e-3, err_msg=case.description)
    for op_type, count in case.ops_after.items():
        assert op_count(case.reference, op_type) == count, case.description


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generated_models_run_and_their_references_agree_with_the_claim(name: str) -> None:
    @settings(max_examples=EXAMPLES)
    @given(case=travel_cases(GENERATORS[name]))
    def check(case: TravelCase) -> None:
        check_case(name, case)

    check()


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_plain_random_gives_reproducible_cases_of_every_outcome(name: str) -> None:
    cases = [sample(GENERATORS[name], seed) for seed in range(40)]
    again = sample(GENERATORS[name], 7)

    assert again.model.SerializeToString() == cases[7].model.SerializeToString()
    outcomes = {bool(case.refusals) for case in cases}
    assert outcomes == ({False, True} if name in REFUSING else {False})
    check_case(name, cases[0])
