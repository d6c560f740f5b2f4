"""BNs over a Concat or an Add, and sibling branches, folded end to end.

Random models from the travel generators (``tests/travel_models.py``: concat, add, siblings)
are folded and compared in onnxruntime: every BN the case says folds is gone, the ones it says
stay are left with the kind of reason it names, and the op counts it fixes are reached. The
PyTorch exports of the same architectures (``tests/fixtures/travel``: YOLOv5's BottleneckCSP and
C3, a pre-activation ResNet, RepVGG, ACNet, MobileOne) are folded through the pipeline, verified,
and reach what their manifest says.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from hypothesis import given, settings

from bnfold.pipeline import FoldOptions, VerifyOptions, fold_file
from tests.support import fold_and_compare, op_count
from tests.travel_models import GENERATORS, NOT_ABSORBABLE, OTHER_READER, TravelCase, travel_cases

FIXTURES = Path(__file__).parent / "fixtures" / "travel"
MANIFEST = json.loads((FIXTURES / "expected.json").read_text())["fixtures"]
ARCHITECTURES = ("bottleneckcsp", "c3", "preact-resnet", "repvgg", "acnet", "mobileone")

# What a reason of each kind says (one of these fragments), in the generators' and the manifest's terms.
REASON_FRAGMENTS = {
    OTHER_READER: ("also feeds",),
    NOT_ABSORBABLE: ("cannot absorb", "no foldable neighbour"),
    "input also read by the residual Add": ("also feeds",),
    "Add operand is not absorbable": ("cannot absorb",),
}


def check_case(case: TravelCase) -> None:
    check = fold_and_compare(case.model)

    assert op_count(check.folded, "BatchNormalization") == len(case.refusals), case.description
    assert len(check.outcome.left) == len(case.refusals)
    for record, kind in zip(check.outcome.left, case.refusals):
        assert any(fragment in record.reason for fragment in REASON_FRAGMENTS[kind]), (kind, record.reason)
    for op_type, count in case.ops_after.items():
        assert op_count(check.folded, op_type) == count, (op_type, case.description)


@pytest.mark.parametrize("name", ["concat", "add", "siblings"])
def test_generated_models_fold_as_their_case_says(name: str) -> None:
    @settings(max_examples=60)
    @given(case=travel_cases(GENERATORS[name]))
    def check(case: TravelCase) -> None:
        check_case(case)

    check()


@pytest.mark.parametrize("stem", sorted(stem for stem, entry in MANIFEST.items()
                                        if entry["architecture"] in ARCHITECTURES))
def test_exported_architectures_reach_their_manifest(stem: str, tmp_path: Path) -> None:
    entry = MANIFEST[stem]
    output = tmp_path / "folded.onnx"
    report = fold_file(FIXTURES / f"{stem}.onnx", FoldOptions(output=output, verify_options=VerifyOptions(batch=2)))
    folded = onnx.load(output)

    assert report.status == "equivalent" and report.written
    assert op_count(folded, "BatchNormalization") == entry["batchnorms_left"] == len(report.left)
    assert report.batchnorms_folded == entry["batchnorms"] - entry["batchnorms_left"]
    for record, kind in zip(report.left, entry["left"]):
        assert any(fragment in record.reason for fragment in REASON_FRAGMENTS[kind]), (kind, record.reason)
    if "convs_after" in entry:
        assert op_count(folded, "Conv") == entry["convs_after"]
        assert op_count(folded, "Add") == entry["adds_after"]
