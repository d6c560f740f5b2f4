"""Every shipped sample folds, verifies in onnxruntime, and is exactly what generate.py builds."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from bnfold.pipeline import FoldOptions, fold_file
from sample_models.generate import SAMPLES, write_samples

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_models"

# BatchNormalization nodes each sample must still have after folding.
EXPECTED_LEFT = {
    "cnn_residual": 0,
    "conv_no_bias": 0,
    "mlp_gemm_bn": 0,
    "refused_bn": 3,
    "legacy_opset9": 0,
    "classifier_head_bn": 0,
    "input_bn_conv": 0,
    "tf_style_decomposed": 0,
    "convtranspose_decoder": 0,
}


def test_every_sample_has_an_expectation() -> None:
    assert set(EXPECTED_LEFT) == set(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_folds_and_verifies(name: str, tmp_path: Path) -> None:
    output = tmp_path / f"{name}.folded.onnx"
    report = fold_file(SAMPLE_DIR / f"{name}.onnx", FoldOptions(output=output))
    assert report.status == "equivalent" and report.exit_code == 0 and report.written
    folded = onnx.load(str(output))
    onnx.checker.check_model(folded, full_check=True)
    left = sum(node.op_type == "BatchNormalization" for node in folded.graph.node)
    assert left == EXPECTED_LEFT[name] == len(report.left)
    assert report.after.batchnorms == left
    assert report.before.batchnorms - left == sum(f.kind == "BatchNormalization" for f in report.folds)
    assert all(record.reason for record in report.left)


def test_checked_in_samples_are_regenerable(tmp_path: Path) -> None:
    for path in write_samples(tmp_path):
        assert path.read_bytes() == (SAMPLE_DIR / path.name).read_bytes(), f"{path.name} differs from generate.py"
