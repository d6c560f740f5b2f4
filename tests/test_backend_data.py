"""Do no harm on ONNX's own backend test data (shipped inside the onnx package).

Every model of ``pytorch-converted/``, ``pytorch-operator/`` and ``simple/`` is
folded through the library pipeline with its ``test_data_set_*`` as real inputs;
the written model must reproduce both the original and the expected outputs.
Models onnxruntime itself cannot run (old opsets without a kernel, training
ops, a missing locale) must end in exit 3 with onnxruntime's message, never a
traceback.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from bnfold.errors import EXIT_OK, EXIT_RUNTIME_FAILURE, RuntimeFailure
from bnfold.inputs import load_trials
from bnfold.options import default_tolerance
from bnfold.pipeline import FoldOptions, VerifyOptions, fold_file
from bnfold.verify import compare_output
from tests.support import run_onnxruntime

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
MODEL_FOLDERS = sorted(
    path.parent for family in ("pytorch-converted", "pytorch-operator", "simple")
    for path in (DATA / family).glob("*/model.onnx")
)


def test_the_backend_data_is_there() -> None:
    assert len(MODEL_FOLDERS) >= 100
    assert sum("BatchNorm" in folder.name for folder in MODEL_FOLDERS) == 5


@pytest.mark.parametrize("folder", MODEL_FOLDERS, ids=lambda folder: f"{folder.parent.name}/{folder.name}")
def test_fold_does_no_harm(folder: Path, tmp_path: Path) -> None:
    output = tmp_path / "folded.onnx"
    options = FoldOptions(output=output, verify_options=VerifyOptions(inputs=folder))
    try:
        report = fold_file(folder / "model.onnx", options)
    except RuntimeFailure as failure:
        assert failure.exit_code == EXIT_RUNTIME_FAILURE
        message = str(failure)
        assert message.startswith("onnxruntime cannot ") and "\n" not in message
        assert not output.exists()
        return
    assert report.exit_code == EXIT_OK, report.verification
    assert report.written and report.verification.expected
    assert all(comparison.passed for comparison in report.verification.expected)
    assert report.after.batchnorms == report.before.batchnorms - len(report.folds) == len(report.left)
    # The file on disk, run afresh, still gives the expected outputs.
    folded = onnx.load(output)
    for trial in load_trials(folder, folded):
        names = [value.name for value in folded.graph.output]
        for name, actual in zip(names, run_onnxruntime(folded, trial.feeds)):
            if name in trial.expected:
                expected = trial.expected[name]
                assert compare_output(name, expected, np.asarray(actual), default_tolerance(expected.dtype)).passed


@pytest.mark.parametrize("name", ["test_BatchNorm2d_eval", "test_BatchNorm3d_momentum_eval"])
def test_batchnorm_eval_cases_onnxruntime_cannot_run_exit_3(name: str, tmp_path: Path) -> None:
    """These opset-6 BN models have no onnxruntime kernel: bnfold says so, in one line."""
    folder = DATA / "pytorch-converted" / name
    result = CliRunner().invoke(
        main, [str(folder / "model.onnx"), "-o", str(tmp_path / "out.onnx"), "--inputs", str(folder)]
    )
    assert result.exit_code == 3
    assert result.stderr == (
        "bnfold: error: onnxruntime cannot load the original model: [ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : "
        "Could not find an implementation for BatchNormalization(6) node with name ''\n"
    )
    assert "Traceback" not in result.output and not (tmp_path / "out.onnx").exists()


def test_batchnorm_eval_cases_explain_the_bn_left_in_place(tmp_path: Path) -> None:
    """A BN fed straight by the graph input has no layer to absorb it: it stays, with its reason."""
    folder = DATA / "pytorch-converted" / "test_BatchNorm2d_eval"
    report = fold_file(folder / "model.onnx", FoldOptions(output=tmp_path / "out.onnx", verify=False))
    assert report.folds == []
    [left] = report.left
    assert left.reason == "no foldable neighbour: input from graph input '0', output to a graph output"
