"""What a CI log gets: the installed command's real output through a pipe (no terminal, no
COLUMNS). Tables take their natural width (nothing squeezed, cut or wrapped mid-name),
lines carry no trailing spaces, and stderr stays empty (no progress display); on a
terminal, tables still fit the window."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import onnx
import pytest

from sample_models.generate import SAMPLES
from tests.installed import REPOSITORY, run_installed, user_environment

NUMBER = r"\d\.\d\de[-+]\d\d"
SECONDS = r"\d+\.\d\ds"


def with_long_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Node and output names as PyTorch's exporter writes them for a deep network."""
    for index, node in enumerate(model.graph.node):
        node.name = f"/backbone/encoder/stage_{index}/residual_block_{index}/{node.op_type}_{node.name}"
    output = model.graph.output[0]
    producer = next(node for node in model.graph.node if output.name in node.output)
    long_output = "/backbone/encoder/head/projection/output_with_a_long_descriptive_name"
    producer.output[list(producer.output).index(output.name)] = long_output
    output.name = long_output
    return model


def assert_log_friendly(text: str) -> None:
    lines = text.splitlines()
    assert lines, "no output"
    assert [line for line in lines if line != line.rstrip()] == [], "trailing spaces"
    assert "\x1b[" not in text, "colour codes in a log"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("refused_bn", "cnn_residual", "classifier_head_bn"):
        onnx.save(with_long_names(SAMPLES[name]()), tmp_path / f"{name}_exported_from_a_training_run.onnx")
    return tmp_path


def test_one_model_report_keeps_every_name_and_reason_whole(folder: Path) -> None:
    model = "refused_bn_exported_from_a_training_run.onnx"
    completed = run_installed(model, "--json", "report.json", cwd=folder)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert_log_friendly(completed.stdout)
    report = json.loads((folder / "report.json").read_text())
    lines = completed.stdout.splitlines()
    for record in report["left"]:
        assert any(record["batchnorm"] in line and line.endswith(record["reason"]) for line in lines), record
    for fold in report["folds"]:
        assert any(fold["batchnorm"] in line and fold["target"] in line for line in lines), fold
    (output,) = report["verification"]["outputs"]
    row = next(line for line in lines if output["name"] in line)
    assert re.search(rf"{NUMBER}\s+{NUMBER}\s+[\d,]+\s+[\d,]+/[\d,]+\s+\S+/\S+$", row), row


def test_batch_table_keeps_every_column_and_whole_paths(folder: Path) -> None:
    completed = run_installed(".", "--output-dir", "folded", "--json", "report.json", cwd=folder)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert_log_friendly(completed.stdout)
    lines = completed.stdout.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("model"))
    assert header.split() == ["model", "BNs", "nodes", "size", "status", "max", "|Δ|", "time"]
    report = json.loads((folder / "report.json").read_text())
    for result in report["models"]:
        row = next(line for line in lines if line.lstrip().startswith(result["input"]))
        assert re.search(rf"equivalent\s+{NUMBER}\s+{SECONDS}$", row), row
    totals = next(line for line in lines if line.lstrip().startswith("total"))
    assert re.search(rf"total \(3 models\).*{NUMBER}\s+{SECONDS}$", totals), totals


def test_check_report_keeps_long_output_names_whole(folder: Path) -> None:
    model = folder / "cnn_residual_exported_from_a_training_run.onnx"
    shutil.copy(model, folder / "copy_of_the_same_model_under_another_long_name.onnx")
    completed = run_installed("check", model.name, "copy_of_the_same_model_under_another_long_name.onnx", cwd=folder)
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert_log_friendly(completed.stdout)
    row = next(line for line in completed.stdout.splitlines() if "output_with_a_long_descriptive_name" in line)
    assert "/backbone/encoder/head/projection/output_with_a_long_descriptive_name" in row
    assert re.search(rf"{NUMBER}\s+{NUMBER}", row), row


def test_quiet_and_json_go_to_a_pipe_untouched(folder: Path) -> None:
    model = "classifier_head_bn_exported_from_a_training_run.onnx"
    quiet = run_installed(model, "--dry-run", "-q", cwd=folder)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout.startswith(f"{model} → dry run: folded 3 of 3 BatchNormalization, equivalent")
    document = run_installed(model, "--dry-run", "--json", "-", cwd=folder)
    assert json.loads(document.stdout)["status"] == "equivalent"


def test_on_a_terminal_tables_fit_the_window(folder: Path) -> None:
    """FORCE_COLOR makes rich treat stdout as a terminal; COLUMNS is then its width."""
    completed = run_installed("refused_bn_exported_from_a_training_run.onnx", "--dry-run", cwd=folder,
                              env=user_environment(FORCE_COLOR="1", COLUMNS="72"))
    assert completed.returncode == 0, completed.stderr
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", completed.stdout)
    assert max(len(line) for line in plain.splitlines()) <= 72
    assert "\x1b[" in completed.stdout


def test_the_samples_print_as_the_readme_says(tmp_path: Path) -> None:
    """The README shows a piped run; its Left in place table has whole reasons."""
    shutil.copytree(REPOSITORY / "sample_models", tmp_path / "sample_models",
                    ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    completed = run_installed("sample_models/refused_bn.onnx", cwd=tmp_path)
    assert completed.returncode == 0
    assert any(line.endswith("(--exact-padding adds a per-position bias instead)")
               for line in completed.stdout.splitlines())
