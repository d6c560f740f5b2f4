"""``--output-dir`` creates the folder and its parents (``bnfold models/ --output-dir folded/``
in a fresh CI checkout), and a run that writes nothing leaves no folder behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.installed import REPOSITORY
from tests.support import assert_one_line_error, run_cli


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("cnn_residual", "mlp_gemm_bn"):
        shutil.copy(REPOSITORY / "sample_models" / f"{name}.onnx", tmp_path / f"{name}.onnx")
    return tmp_path


@pytest.mark.parametrize("args", [["cnn_residual.onnx"], ["cnn_residual.onnx", "mlp_gemm_bn.onnx", "-j", "2"]])
def test_the_output_folder_and_its_parents_are_created(folder: Path, args: list[str]) -> None:
    result = run_cli(*args, "--output-dir", "out/deep/folded/")
    assert result.exit_code == 0, result.output
    written = sorted(path.name for path in (folder / "out" / "deep" / "folded").iterdir())
    assert written == sorted(f"{Path(arg).stem}.folded.onnx" for arg in args if arg.endswith(".onnx"))


@pytest.mark.parametrize("output_dir", ["out/folded", "out/x/y/../z"])
@pytest.mark.parametrize("args", [["missing.onnx"], ["cnn_residual.onnx", "--dry-run"],
                                  ["cnn_residual.onnx", "--skip", "nothing*"]])
def test_a_run_that_writes_nothing_leaves_no_folder(folder: Path, args: list[str], output_dir: str) -> None:
    before = sorted(folder.iterdir())
    result = run_cli(*args, "--output-dir", output_dir)
    assert result.exit_code in (0, 2), result.output
    assert sorted(folder.iterdir()) == before


def test_an_existing_folder_is_kept_even_when_nothing_is_written(folder: Path) -> None:
    (folder / "out").mkdir()
    assert run_cli("missing.onnx", "--output-dir", "out/new").exit_code == 2
    assert (folder / "out").is_dir() and not (folder / "out" / "new").exists()


def test_an_output_dir_that_is_a_file_is_a_one_line_error(folder: Path) -> None:
    (folder / "out").write_text("a file\n")
    assert_one_line_error(run_cli("cnn_residual.onnx", "--output-dir", "out"), 2, "'out' is a file")
