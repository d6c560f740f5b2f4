"""The ``bnfold`` command end to end: outputs, reports, flags and exit codes."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bnfold import pipeline
from bnfold.errors import InterruptedAfterMove
from bnfold.io import save
from bnfold.fold import FoldOutcome, fold_batchnorms
from bnfold.io.store import TensorStore
from bnfold.rules import RuleSet
from sample_models.modelkit import GraphBuilder
from tests.support import assert_one_line_error, run_cli, write_model_onnxruntime_cannot_run

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


@pytest.fixture
def cnn(tmp_path: Path) -> Path:
    """A private copy of the residual CNN sample, so outputs land in tmp_path."""
    return Path(shutil.copy(SAMPLES / "cnn_residual.onnx", tmp_path / "cnn.onnx"))




def test_default_command_writes_folded_model_beside_input(cnn: Path) -> None:
    before = cnn.read_bytes()
    result = run_cli(cnn)
    assert result.exit_code == 0, result.output
    output = cnn.with_name("cnn.folded.onnx")
    assert output.is_file()
    assert cnn.read_bytes() == before
    folded = onnx.load(str(output))
    assert sum(n.op_type == "BatchNormalization" for n in folded.graph.node) == 0
    assert "equivalent" in result.stdout
    assert "Before / after" in result.stdout and "Folded (6)" in result.stdout
    assert not list(cnn.parent.glob(".bnfold-*")), "staging folder removed"


def test_explicit_fold_command_and_output_path(cnn: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "model.onnx"
    target.parent.mkdir()
    result = run_cli("fold", cnn, "-o", target)
    assert result.exit_code == 0
    assert target.is_file()


def test_options_may_come_before_the_model(cnn: Path, tmp_path: Path) -> None:
    result = run_cli("-q", "-o", tmp_path / "x.onnx", cnn)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "x.onnx").is_file()


def test_quiet_prints_one_line(cnn: Path) -> None:
    result = run_cli(cnn, "--quiet")
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"{cnn} → {cnn.with_name('cnn.folded.onnx')}: folded 6 of 6 BatchNormalization, equivalent (max |Δ| ")


def test_json_to_stdout_carries_the_report(cnn: Path) -> None:
    result = run_cli(cnn, "--json", "-")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["schema"] == "bnfold.fold/1"
    assert report["status"] == "equivalent" and report["exit_code"] == 0 and report["written"] is True
    assert report["before"]["op_counts"]["BatchNormalization"] == 6
    assert "BatchNormalization" not in report["after"]["op_counts"]
    assert len(report["folds"]) == 6 and report["left"] == []
    assert {f["rule"] for f in report["folds"]} == {"conv-bn", "gemm-bn"}
    output = report["verification"]["outputs"][0]
    assert output["passed"] is True and output["mismatches"] == 0
    assert report["verification"]["trials"] == [
        {"label": "seed 0", "seed": 0, "inputs": [{"name": "image", "shape": [1, 3, 32, 32], "dtype": "float32"}]}
    ]


def test_json_to_file_and_tables_to_stdout(cnn: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = run_cli(cnn, "--json", report_path)
    assert result.exit_code == 0
    assert json.loads(report_path.read_text())["status"] == "equivalent"
    assert "Before / after" in result.stdout


def test_input_shape_sets_symbolic_dimensions(cnn: Path) -> None:
    result = run_cli(cnn, "--input-shape", "image:4,3,32,32", "--json", "-")
    assert json.loads(result.stdout)["verification"]["trials"][0]["inputs"][0]["shape"] == [4, 3, 32, 32]


@pytest.mark.parametrize("value,message", [
    ("image:4,x", "'image:4,x' is not NAME:D1,D2,... with non-negative integers"),
    ("nope:1,3,32,32", "--input-shape names no model input: nope"),
    ("image:1,3", "--input-shape image: rank 2 but the model declares rank 4"),
])
def test_bad_input_shapes_are_usage_errors(cnn: Path, value: str, message: str) -> None:
    result = run_cli(cnn, "--input-shape", value)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_dry_run_writes_nothing(cnn: Path) -> None:
    result = run_cli(cnn, "--dry-run", "--quiet")
    assert result.exit_code == 0
    assert sorted(p.name for p in cnn.parent.iterdir()) == ["cnn.onnx"]
    assert "dry run" in result.stdout and "equivalent" in result.stdout


def test_no_verify_reports_unverified(cnn: Path) -> None:
    result = run_cli(cnn, "--no-verify", "--json", "-")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["status"] == "unverified" and report["verification"] is None and report["written"] is True


def corrupting_fold(model: onnx.ModelProto, rules: RuleSet, *, store: TensorStore, **options: Any) -> FoldOutcome:
    """Fold normally, then damage one weight: what a buggy rule would do."""
    outcome = fold_batchnorms(model, rules, store=store, **options)
    tensor = model.graph.initializer[0]
    store.replace(tensor, store.read(tensor) * 1.5)
    return outcome


def test_failed_verification_exits_1_and_writes_nothing(cnn: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "fold_batchnorms", corrupting_fold)
    result = run_cli(cnn, "--json", "-")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["status"] == "not-equivalent" and report["written"] is False
    assert report["verification"]["outputs"][0]["passed"] is False
    assert report["verification"]["outputs"][0]["mismatches"] > 0
    assert not cnn.with_name("cnn.folded.onnx").exists()
    assert sorted(p.name for p in cnn.parent.iterdir()) == ["cnn.onnx"]


def test_keep_failed_writes_the_failing_model(cnn: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "fold_batchnorms", corrupting_fold)
    result = run_cli(cnn, "--keep-failed", "--quiet")
    assert result.exit_code == 1
    assert cnn.with_name("cnn.folded.onnx").is_file()
    assert "not-equivalent" in result.stdout


def test_model_onnxruntime_cannot_run_exits_3(tmp_path: Path) -> None:
    path = write_model_onnxruntime_cannot_run(tmp_path / "custom.onnx")
    assert_one_line_error(run_cli(path), 3, "bnfold: error: onnxruntime cannot load the original model: ")
    assert not (tmp_path / "custom.folded.onnx").exists()


def test_help_documents_exit_codes() -> None:
    for args in ([], ["fold"], ["check"]):
        result = run_cli(*args, "--help")
        assert result.exit_code == 0
        assert "Exit codes:" in result.output
        assert "3  onnxruntime cannot load or run a given model (its message is shown)" in result.output


def test_check_command_compares_two_models(cnn: Path) -> None:
    assert run_cli(cnn, "--quiet").exit_code == 0
    result = run_cli("check", cnn, cnn.with_name("cnn.folded.onnx"), "--quiet")
    assert result.exit_code == 0
    assert ": equivalent (max |Δ| " in result.stdout


def test_check_command_detects_a_different_model(cnn: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.onnx"
    model = onnx.load(str(cnn))
    bias = next(t for t in model.graph.initializer if t.name.startswith("c"))
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(0.5), bias.name))
    onnx.save(model, str(other))
    result = run_cli("check", cnn, other, "--json", "-")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["status"] == "not-equivalent"


def test_python_dash_m_runs_the_same_command() -> None:
    completed = subprocess.run([sys.executable, "-m", "bnfold", "--help"], capture_output=True, text=True, check=False)
    assert completed.returncode == 0
    assert "Usage: bnfold" in completed.stdout


def test_installed_entry_point_runs_as_a_real_process(cnn: Path) -> None:
    executable = Path(sys.executable).parent / "bnfold"
    assert executable.is_file(), "the package's console script is installed beside the interpreter"
    completed = subprocess.run([str(executable), str(cnn), "--quiet"], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    assert "equivalent" in completed.stdout
    assert completed.stderr == ""
    assert cnn.with_name("cnn.folded.onnx").is_file()


def test_unexpected_exception_is_one_line_with_exit_4(cnn: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> None:
        raise ZeroDivisionError("division by zero\nand more detail")

    monkeypatch.setattr(pipeline, "fold_batchnorms", broken)
    result = run_cli(cnn)
    assert result.exit_code == 4
    assert result.stderr == (
        "bnfold: internal error (ZeroDivisionError: division by zero); please report it with the model\n"
    )
    assert sorted(p.name for p in cnn.parent.iterdir()) == ["cnn.onnx"]


def test_a_rule_that_crashes_leaves_its_bn_with_the_reason(cnn: Path) -> None:
    """Other rules still get their turn; with none left, the BN stays and says why."""
    from bnfold.rules import FoldRule, build_rules

    class Crashing(FoldRule):
        name = "crashing"

        def plan(self, affine, graph, rules):  # noqa: ANN001, ANN202
            raise IndexError("list index out of range")

    outcome = fold_batchnorms(onnx.load(str(cnn)), build_rules(backward=(Crashing(),), forward=()))
    assert not outcome.folds and len(outcome.left) == 6
    assert {r.reason for r in outcome.left} == {"rule crashing failed (IndexError: list index out of range)"}


def test_a_model_that_needs_real_sizes_gets_a_hint(tmp_path: Path) -> None:
    """A fixed reshape cannot take the 1x1 image that symbolic height/width default to."""
    b = GraphBuilder(seed=0)
    x = b.input("image", [1, 2, "height", "width"])
    y = b.batchnorm(b.conv(x, 2, 2), 2)
    b.output(b.node("Reshape", [y, b.const("shape", np.array([1, 2, 16], np.int64))]))
    path = tmp_path / "fixed.onnx"
    onnx.save(b.model(), str(path))
    result = run_cli(path)
    assert result.exit_code == 3
    assert result.stderr.startswith("bnfold: error: onnxruntime cannot run the original model: ")
    assert result.stderr.endswith(
        "(symbolic dims of image were set to 1; give real sizes with --input-shape NAME:D1,D2,...)\n"
    )
    assert run_cli(path, "--input-shape", "image:1,2,4,4", "-q").exit_code == 0


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("script", ["bnfold", "bnfold-precommit"])
@pytest.mark.parametrize("library", ["numpy/_core/_multiarray_umath", "onnx/onnx_cpp2py_export"])
def test_ctrl_c_while_starting_up_is_one_line_and_exit_130(cnn: Path, script: str, library: str,
                                                           stop: signal.Signals) -> None:
    """An interrupt while the commands are still importing their libraries (signalled as soon
    as the process has loaded ``library``) ends like one at any later moment: one line, exit
    130, nothing written (or, if the run was faster than the signal, its normal end)."""
    arguments = [str(cnn)] if script == "bnfold" else ["fold", str(cnn)]
    process = subprocess.Popen([str(Path(sys.executable).with_name(script)), *arguments],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{process.pid}/maps")
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline and library not in maps.read_text():
        time.sleep(0.002)
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=60)
    if process.returncode == 130:
        assert stderr.startswith("bnfold: interrupted; ") and stderr.count("\n") == 1, stderr
        assert not cnn.with_name("cnn.folded.onnx").exists()
    else:
        assert process.returncode in (0, 1) and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("report", [[], ["-q"], ["--json", "-"]])
def test_a_reader_that_stops_reading_does_not_change_the_outcome(cnn: Path, report: list[str]) -> None:
    """``bnfold … | head -1``: stdout closed before the result is printed. The run is done and
    its output in place, so it exits with its own code and says nothing about the pipe."""
    process = subprocess.Popen([str(Path(sys.executable).with_name("bnfold")), str(cnn), *report],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    process.stdout.close()
    stderr = process.stderr.read() if process.stderr else ""
    assert process.wait(timeout=60) == 0 and stderr == ""
    assert cnn.with_name("cnn.folded.onnx").exists()


def test_an_interrupt_before_the_move_rewrites_the_report_it_had_written(cnn: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The report is written before the output moves into place; Ctrl-C in between leaves no
    output, so the report must not say it was written."""
    def interrupted(*_arguments: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(save, "move_into_place", interrupted)
    report = tmp_path / "report.json"
    result = run_cli(cnn, "--json", report)
    assert result.exit_code == 130 and result.stderr == "bnfold: interrupted; nothing was written\n"
    document = json.loads(report.read_text())
    assert document["exit_code"] == 130 and "interrupted" in document["error"]
    assert not cnn.with_name("cnn.folded.onnx").exists()


def test_an_interrupt_during_the_move_is_raised_once_the_output_is_in_place(
    cnn: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_move = save.move_into_place

    def move_then_interrupt(*arguments: object) -> None:
        real_move(*arguments)  # type: ignore[arg-type]
        raise InterruptedAfterMove

    monkeypatch.setattr(save, "move_into_place", move_then_interrupt)
    report = tmp_path / "report.json"
    result = run_cli(cnn, "--json", report)
    assert result.exit_code == 130 and "the folded model had just been written" in result.stderr
    assert json.loads(report.read_text())["status"] == "equivalent"
    assert cnn.with_name("cnn.folded.onnx").exists()
