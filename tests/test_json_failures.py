"""``--json`` when the run fails: the document is still written (or printed, with ``-``),
with status "error", the exit code and the one-line error the command prints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.installed import REPOSITORY
from tests.support import assert_one_line_error, run_cli, write_model_onnxruntime_cannot_run


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPOSITORY / "sample_models" / "conv_no_bias.onnx", tmp_path / "good.onnx")
    (tmp_path / "text.onnx").write_text("not a model\n")
    write_model_onnxruntime_cannot_run(tmp_path / "custom.onnx")
    return tmp_path


def error_of(stderr: str) -> str:
    (line,) = stderr.splitlines()
    assert line.startswith("bnfold: error: ")
    return line.removeprefix("bnfold: error: ")


@pytest.mark.parametrize("model, exit_code, fragment", [
    ("missing.onnx", 2, "no such file"),
    ("text.onnx", 2, "not an ONNX model"),
    ("custom.onnx", 3, "onnxruntime cannot load the original model"),
])
def test_a_failed_fold_still_writes_its_json_report(folder: Path, model: str, exit_code: int, fragment: str) -> None:
    result = run_cli(model, "--json", "report.json")
    assert result.exit_code == exit_code and result.stdout == ""
    document = json.loads((folder / "report.json").read_text())
    assert document == {"schema": "bnfold.fold/1", "input": model, "output": None, "status": "error",
                        "exit_code": exit_code, "error": error_of(result.stderr)}
    assert fragment in document["error"]
    assert not list(folder.glob("*.folded.onnx"))


def test_json_to_stdout_is_printed_for_a_failure_too(folder: Path) -> None:
    result = run_cli("text.onnx", "-o", "out.onnx", "--json", "-")
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert document["status"] == "error" and document["output"] == "out.onnx"
    assert document["error"] == error_of(result.stderr)


def test_a_failed_check_writes_a_check_document(folder: Path) -> None:
    result = run_cli("check", "good.onnx", "missing.onnx", "--json", "report.json")
    assert result.exit_code == 2
    document = json.loads((folder / "report.json").read_text())
    assert document == {"schema": "bnfold.check/1", "original": "good.onnx", "folded": "missing.onnx",
                        "status": "error", "exit_code": 2, "error": error_of(result.stderr)}


def test_a_batch_refused_before_any_work_writes_a_batch_document(folder: Path) -> None:
    result = run_cli("good.onnx", "text.onnx", "-o", "x.onnx", "--json", "report.json")
    assert result.exit_code == 2
    document = json.loads((folder / "report.json").read_text())
    assert document["schema"] == "bnfold.batch/1" and document["status"] == "error"
    assert document["error"] == error_of(result.stderr) and "--output-dir" in document["error"]


def test_a_successful_report_says_it_has_no_error(folder: Path) -> None:
    result = run_cli("good.onnx", "--json", "-")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["status"] == "equivalent" and document["error"] is None


def test_a_batch_refused_for_clashing_outputs_still_writes_its_report(tmp_path: Path) -> None:
    """The clash is between two outputs, not the report: the report is written, and says so."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(REPOSITORY / "sample_models" / "cnn_residual.onnx", tmp_path / folder / "m.onnx")
    report = tmp_path / "report.json"
    result = run_cli(tmp_path / "a", tmp_path / "b", "--output-dir", tmp_path / "out", "--json", report)
    assert result.exit_code == 2 and "would both be written" in result.stderr
    document = json.loads(report.read_text())
    assert document["schema"] == "bnfold.batch/1" and document["exit_code"] == 2
    assert "would both be written" in document["error"] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("refused", [["-j", "0"], ["--atol", "-1"], ["--input-shape", "x"]])
def test_a_command_line_refused_as_such_writes_no_report(tmp_path: Path, refused: list[str]) -> None:
    report = tmp_path / "report.json"
    assert_one_line_error(run_cli(REPOSITORY / "sample_models" / "cnn_residual.onnx", *refused, "--json", report), 2)
    assert not report.exists()
