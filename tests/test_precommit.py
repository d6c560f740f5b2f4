"""``bnfold-precommit``: one bnfold run per model, the worst exit code wins."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from bnfold.precommit import main, split_models
from sample_models.generate import cnn_residual, mlp_gemm_bn


@pytest.fixture
def models(tmp_path: Path) -> list[Path]:
    paths = [tmp_path / "cnn.onnx", tmp_path / "mlp.onnx"]
    onnx.save(cnn_residual(), paths[0])
    onnx.save(mlp_gemm_bn(), paths[1])
    return paths


def _perturb_last_gemm(path: Path) -> None:
    model = onnx.load(path)
    gemm = [node for node in model.graph.node if node.op_type == "Gemm"][-1]
    tensor = next(t for t in model.graph.initializer if t.name == gemm.input[1])
    values = numpy_helper.to_array(tensor).copy()
    values += 0.5
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    onnx.save(model, path)


def test_split_models_takes_the_trailing_onnx_files() -> None:
    assert split_models(["--atol", "1e-3", "a.onnx", "b.onnx"]) == (["--atol", "1e-3"], ["a.onnx", "b.onnx"])
    assert split_models([]) == ([], [])


def test_fold_hook_folds_every_model(models: list[Path]) -> None:
    result = CliRunner().invoke(main, ["fold", *map(str, models)])
    assert result.exit_code == 0, result.output
    assert all(path.with_name(f"{path.stem}.folded.onnx").is_file() for path in models)
    assert result.stdout.count("equivalent") == 2


def test_check_hook_fails_on_one_bad_folded_model(models: list[Path]) -> None:
    assert CliRunner().invoke(main, ["fold", *map(str, models)]).exit_code == 0
    folded = [path.with_name(f"{path.stem}.folded.onnx") for path in models]
    _perturb_last_gemm(folded[1])
    result = CliRunner().invoke(main, ["check", *map(str, folded)])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert ": equivalent (max" in lines[0] and ": not-equivalent (max" in lines[1]
    # Options before the file names reach every run.
    assert CliRunner().invoke(main, ["check", "--atol", "100", *map(str, folded)]).exit_code == 0


def test_check_hook_refuses_a_model_that_is_not_folded(models: list[Path]) -> None:
    result = CliRunner().invoke(main, ["check", str(models[0])])
    assert result.exit_code == 2
    assert result.stderr == f"bnfold: error: {models[0]}: check expects a *.folded.onnx file beside its original\n"


def test_installed_entry_point_returns_the_worst_code(models: list[Path], tmp_path: Path) -> None:
    missing = tmp_path / "gone.onnx"
    script = Path(sys.executable).with_name("bnfold-precommit")
    completed = subprocess.run([str(script), "fold", str(models[1]), str(missing)], capture_output=True, text=True)
    assert completed.returncode == 2
    assert completed.stderr == f"bnfold: error: {missing}: no such file\n"
    assert models[1].with_name("mlp.folded.onnx").is_file()
