"""Keras models converted by tf2onnx (committed fixtures) fold exactly and verify.

The fixtures are written by ``tests/fixtures/tf2onnx/export_models.py`` (tensorflow and
tf2onnx, which these tests do not need). What each one shows: docs/tf2onnx-models.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import onnx
import pytest

from bnfold.pipeline import FoldOptions, fold_file
from tests.support import op_count

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tf2onnx"
COUNTED = ("BatchNormalization", "Mul", "Add", "Transpose")


class Expected(NamedTuple):
    before: tuple[int, int, int, int]
    """BatchNormalization, Mul, Add, Transpose in the fixture (see ``COUNTED``)."""
    after: tuple[int, int, int, int]
    rules: tuple[str, ...]


EXPECTED = {
    # TF (grappler) already folded the BN into the Conv's weights and bias: nothing to do.
    "conv_bn_relu": Expected((0, 0, 0, 2), (0, 0, 0, 2), ()),
    "conv_nobias_bn": Expected((0, 0, 0, 2), (0, 0, 0, 2), ()),
    "resnet_block": Expected((0, 0, 1, 2), (0, 0, 1, 2), ()),
    # tf2onnx pushed the Transpose past Mul/Add: the affine is on the NCHW Conv output.
    "depthwise_bn": Expected((0, 1, 1, 2), (0, 0, 0, 2), ("conv-bn",)),
    "conv2dtranspose_bn": Expected((0, 1, 1, 2), (0, 0, 0, 2), ("convtranspose-bn",)),
    # Dense: MatMul → Mul → Add (Dense's bias is in the Add) on [N, C]: one Gemm holds the shift.
    "dense_bn": Expected((0, 1, 1, 0), (0, 0, 0, 0), ("matmul-bn",)),
    # Conv1D: Unsqueeze → Transpose → Conv → Squeeze → Mul → Add.
    "conv1d_bn": Expected((0, 1, 1, 2), (0, 0, 0, 2), ("conv-bn through Squeeze",)),
    # BN on the NHWC input: Mul → Add → Transpose → unpadded Conv.
    "bn_input_conv": Expected((0, 1, 1, 2), (0, 0, 0, 2), ("bn-conv through Transpose",)),
    # BN on the NLC input of a Conv1D: Mul → Add → Unsqueeze → Transpose → Conv.
    "bn_input_conv1d": Expected((0, 1, 1, 2), (0, 0, 0, 2), ("bn-conv through Unsqueeze, Transpose",)),
    # FusedBatchNormV3 becomes BatchNormalization; tf2onnx fuses the one after the Conv itself.
    "fused_batchnorm_block": Expected((1, 0, 0, 2), (0, 0, 0, 2), ("bn-conv",)),
    # After Concatenate and after Add of two Convs: the Convs feed both merges, nothing folds.
    "bn_after_merge": Expected((0, 2, 3, 3), (0, 2, 3, 3), ()),
}

FIXTURE_FILES = sorted(FIXTURES.glob("*.onnx"))


def _model_name(path: Path) -> str:
    return path.stem.rsplit("_opset", 1)[0]


def _counts(model: onnx.ModelProto) -> tuple[int, ...]:
    return tuple(op_count(model, op) for op in COUNTED)


def test_every_fixture_has_an_expectation_at_both_opsets() -> None:
    assert sorted(path.name for path in FIXTURE_FILES) == sorted(
        f"{name}_opset{opset}.onnx" for name in EXPECTED for opset in (13, 17)
    )


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=[path.stem for path in FIXTURE_FILES])
def test_tf2onnx_fixture_folds_and_verifies(path: Path, tmp_path: Path) -> None:
    expected = EXPECTED[_model_name(path)]
    assert _counts(onnx.load(str(path))) == expected.before

    output = tmp_path / "folded.onnx"
    report = fold_file(path, FoldOptions(output=output))

    assert report.status == "equivalent" and report.exit_code == 0
    folded = onnx.load(str(output))
    onnx.checker.check_model(folded, full_check=True)
    assert _counts(folded) == expected.after
    assert tuple(fold.rule for fold in report.folds) == expected.rules
    assert len(report.left) == op_count(folded, "BatchNormalization")
    assert all(record.reason for record in report.left)
