"""The PyTorch exports in ``tests/fixtures/travel`` and their manifest agree and run.

``expected.json`` is written by the fixtures' export script from the architectures: per
fixture the BatchNormalization count and what an ideal fold reaches. Here only the facts
about the files are checked (every fixture listed, counts as stated, small, runnable
in onnxruntime); what bnfold folds of them is for the rules that make BNs travel.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from bnfold.inputs import generate_inputs, input_specs
from tests.support import op_count, run_onnxruntime

FIXTURES = Path(__file__).parent / "fixtures" / "travel"
MANIFEST = json.loads((FIXTURES / "expected.json").read_text())["fixtures"]


def test_manifest_lists_exactly_the_committed_fixtures() -> None:
    assert sorted(MANIFEST) == sorted(path.stem for path in FIXTURES.glob("*.onnx"))
    assert len({entry["architecture"] for entry in MANIFEST.values()}) >= 15


def test_fixtures_are_small() -> None:
    sizes = [path.stat().st_size for path in FIXTURES.glob("*.onnx")]
    assert max(sizes) < 200_000 and sum(sizes) < 3_000_000


@pytest.mark.parametrize("stem", sorted(MANIFEST))
def test_fixture_matches_its_manifest_entry_and_runs(stem: str) -> None:
    entry = MANIFEST[stem]
    model = onnx.load(FIXTURES / f"{stem}.onnx")
    onnx.checker.check_model(model, full_check=True)

    assert stem == f"{entry['architecture']}-{entry['export']}"
    assert op_count(model, "BatchNormalization") == entry["batchnorms"]
    assert entry["batchnorms_left"] == len(entry["left"]) <= entry["batchnorms"]
    outputs = run_onnxruntime(model, generate_inputs(input_specs(model, {}, batch=2), 0))
    assert all(output.size for output in outputs)
