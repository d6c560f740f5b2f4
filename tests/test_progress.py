"""The transient status of one model's run (load → fold → save → verify, with sizes): on
stderr only when it is a terminal, erased at the end, never in a log."""

from __future__ import annotations

import io
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from bnfold import report
from tests.installed import REPOSITORY, user_environment

# The command with the status shown from the first instant (a sample folds faster than the
# delay a real run waits before showing it).
IMMEDIATE_STATUS = (
    "import sys; from bnfold import report; report.STATUS_AFTER_SECONDS = 0; "
    "from bnfold.cli import main; main(sys.argv[1:], prog_name='bnfold')"
)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    shutil.copy(REPOSITORY / "sample_models" / "cnn_residual.onnx", tmp_path / "cnn.onnx")
    return tmp_path


@pytest.mark.parametrize("stage, size, shown", [
    ("load", 26_500, "cnn.onnx: loading (26.5 kB)"),
    ("fold", 1_500_000_000, "cnn.onnx: folding (1.5 GB)"),
    ("save", None, "cnn.onnx: writing · "),
    ("verify", 2_000, "cnn.onnx: verifying in onnxruntime (2.0 kB)"),
    ("attribution", None, "cnn.onnx: finding the fold that broke equivalence"),
])
def test_the_status_names_the_stage_and_its_size(monkeypatch: pytest.MonkeyPatch, stage: str, size: int | None,
                                                 shown: str) -> None:
    monkeypatch.setattr(report, "STATUS_AFTER_SECONDS", 0)
    status = report._RunStatus("cnn.onnx")
    status.update(stage, size)
    console = Console(file=io.StringIO(), force_terminal=True, width=120, color_system=None)
    console.print(status)
    assert shown in console.file.getvalue()


def test_a_run_shorter_than_a_moment_shows_nothing() -> None:
    status = report._RunStatus("cnn.onnx")
    status.update("load", 1000)
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    console.print(status)
    assert console.file.getvalue().strip() == ""


def test_on_a_terminal_stderr_shows_the_status_and_stdout_the_report(folder: Path) -> None:
    leader, follower = pty.openpty()
    try:
        completed = subprocess.run(
            [sys.executable, "-c", IMMEDIATE_STATUS, "cnn.onnx", "-o", "out.onnx"], cwd=folder,
            env=user_environment(), stdout=subprocess.PIPE, stderr=follower, text=True, timeout=300, check=False,
        )
        os.close(follower)
        terminal = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal is closed once the process and our copy are gone
                break
            if not chunk:
                break
            terminal += chunk
    finally:
        os.close(leader)
    assert completed.returncode == 0
    shown = terminal.decode("utf-8", "replace")
    assert "cnn.onnx: verifying in onnxruntime (" in shown and " kB)" in shown
    assert shown.endswith("\x1b[2K"), "the status line is erased at the end"
    assert "\x1b[?25h" in shown, "the cursor is shown again"
    assert completed.stdout.startswith("bnfold cnn.onnx → out.onnx  equivalent")


@pytest.mark.parametrize("args", [["cnn.onnx", "-o", "out.onnx"], ["check", "cnn.onnx", "cnn.onnx"]])
def test_piped_stderr_gets_no_status(folder: Path, args: list[str]) -> None:
    completed = subprocess.run([sys.executable, "-c", IMMEDIATE_STATUS, *args], cwd=folder, env=user_environment(),
                               capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0
    assert completed.stderr == ""
    assert "equivalent" in completed.stdout


def test_quiet_shows_no_status_even_on_a_terminal(folder: Path) -> None:
    """FORCE_COLOR makes rich take stderr for a terminal: the status shows unless --quiet."""
    runs = {
        quiet: subprocess.run([sys.executable, "-c", IMMEDIATE_STATUS, "cnn.onnx", "--dry-run", *quiet], cwd=folder,
                              env=user_environment(FORCE_COLOR="1"), capture_output=True, text=True, timeout=300,
                              check=False)
        for quiet in ((), ("-q",))
    }
    assert all(completed.returncode == 0 for completed in runs.values())
    assert "cnn.onnx: verifying in onnxruntime" in runs[()].stderr
    assert runs[("-q",)].stderr == ""
