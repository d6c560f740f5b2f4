"""The PyTorch exports in ``tests/fixtures/travel`` whose BNs travel through one op or a chain.

For the architectures whose BNs sit behind pools, reshapes, resizes or a Shape reader, and
for the rank-2 linear layers: every BN the manifest says can fold does (classic exporter at
opsets 11 and 17, with the BNs the exporter kept or preserved, and dynamo), the outputs match
in onnxruntime with optimizations off, each BN that must stay is left with a reason of the
kind the manifest names, and the node counts the manifest fixes hold.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest

from tests.support import fold_and_compare, op_count

FIXTURES = Path(__file__).parent / "fixtures" / "travel"
MANIFEST = json.loads((FIXTURES / "expected.json").read_text())["fixtures"]
ARCHITECTURES = {
    "avgpool", "avgpool-countpad", "conv-flatten-bn1d", "dcgan", "globalpool-heads", "keras-maxpool",
    "keras-maxpool-neggamma", "linear-bn1d", "reid-bnneck", "shape-reader", "upsample",
}
STEMS = sorted(stem for stem, entry in MANIFEST.items() if entry["architecture"] in ARCHITECTURES)

# The manifest's kind of reason for a BN that must stay → what bnfold's reason says.
REASON_OF_KIND = {
    # The export script makes channel 3 of the second BN's γ negative.
    "negative scale through MaxPool": r"MaxPool '[^']+': negative scale at channel 3 turns the max into a min",
    "AveragePool counts its padding": r"AveragePool '[^']+' counts its padding \(count_include_pad=1\)",
}


def test_these_architectures_are_in_the_manifest() -> None:
    assert {MANIFEST[stem]["architecture"] for stem in STEMS} == ARCHITECTURES


@pytest.mark.parametrize("stem", STEMS)
def test_fixture_folds_what_can_fold_and_verifies(stem: str) -> None:
    entry = MANIFEST[stem]
    model = onnx.load(FIXTURES / f"{stem}.onnx")
    shapes = {model.graph.input[0].name: (3, 3, 4, 4)} if stem.endswith("dynbatch") else None
    check = fold_and_compare(model, shapes=shapes)

    assert len(check.outcome.folds) == entry["batchnorms"] - entry["batchnorms_left"]
    assert op_count(check.folded, "BatchNormalization") == entry["batchnorms_left"]
    reasons = sorted(record.reason for record in check.outcome.left)
    for reason, kind in zip(reasons, sorted(entry["left"])):
        assert re.search(REASON_OF_KIND[kind], reason), (kind, reason)
    for key, count in entry.items():
        if key.endswith("s_after"):
            op_type = {"gemms_after": "Gemm", "matmuls_after": "MatMul"}[key]
            assert op_count(check.folded, op_type) == count, key


def test_a_bnneck_feature_output_keeps_its_normalized_values() -> None:
    """ReID's BNNeck: the BN's output is a graph output and the classifier's input. Moved back
    through the flatten and the pooling into the embedding Conv, the graph output is written by
    the flatten and holds the same normalized values (checked by the comparison)."""
    for stem in (stem for stem in STEMS if MANIFEST[stem]["architecture"] == "reid-bnneck"):
        model = onnx.load(FIXTURES / f"{stem}.onnx")
        check = fold_and_compare(model)
        neck = [fold for fold in check.outcome.folds if "through" in fold.rule]
        assert len(neck) == 1 and neck[0].direction == "backward", stem
        assert [output.name for output in check.folded.graph.output] == [output.name for output in model.graph.output]
