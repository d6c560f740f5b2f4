"""The mistakes users make, each one line ``bnfold: error: ...`` with exit code 2 and nothing
written: bad option values, unknown options, missing arguments, a misspelt command, the
onnxsim habit ``bnfold in.onnx out.onnx``, ``--tol`` naming no output; and what ``--help``
and ``--version`` tell them."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import click
import numpy
import onnx
import onnxruntime
import pytest
from click.testing import CliRunner

from bnfold.cli import main
from bnfold.errors import onnxruntime_message
from bnfold.precommit import main as precommit_main
from tests.installed import REPOSITORY, run_installed
from tests.support import assert_one_line_error, run_cli


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding m.onnx and its fold m.folded.onnx."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPOSITORY / "sample_models" / "cnn_residual.onnx", tmp_path / "m.onnx")
    shutil.copy(REPOSITORY / "sample_models" / "cnn_residual.onnx", tmp_path / "m.folded.onnx")
    return tmp_path


def listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


USAGE_ERRORS = [
    (["--jobs", "0", "m.onnx"], "'--jobs': 0 is not in the range x>=1"),
    (["fold", "--atol", "-1", "m.onnx"], "'--atol': -1.0 is not in the range x>=0"),
    (["--trials", "0", "m.onnx"], "--trials must be at least 1"),
    (["--batch", "0", "m.onnx"], "--batch must be at least 1"),
    (["--seed", "abc", "m.onnx"], "'--seed'"),
    (["--input-shape", "x", "m.onnx"], "'x' is not NAME:D1,D2,..."),
    (["--tol", "out", "m.onnx"], "'out' is not NAME:ATOL,RTOL"),
    (["--frobnicate", "m.onnx"], "--frobnicate"),
    (["m.onnx", "-o"], "'-o' requires an argument"),
    (["fold"], "MODEL..."),
    ([], "nothing to do"),
    (["check", "m.onnx"], "FOLDED"),
    (["check", "--rtol", "-1", "m.onnx", "m.folded.onnx"], "'--rtol'"),
    (["check", "--frobnicate", "m.onnx", "m.folded.onnx"], "--frobnicate"),
    (["check", "m.onnx", "m.folded.onnx", "extra.onnx"], "extra.onnx"),
    (["-o", "x.onnx", "--output-dir", "out", "m.onnx"], "cannot be combined"),
]


@pytest.mark.parametrize("args, fragment", USAGE_ERRORS, ids=[" ".join(a) or "(none)" for a, _ in USAGE_ERRORS])
def test_usage_errors_are_one_line_and_exit_2_writing_nothing(folder: Path, args: list[str], fragment: str) -> None:
    before = listing(folder)
    assert_one_line_error(run_cli(*args), 2, fragment)
    assert listing(folder) == before


@pytest.mark.parametrize("args", [["fold", "--trials", "0", "m.onnx"], ["check", "--atol", "-1", "m.onnx"],
                                  ["fold", "--frobnicate", "m.onnx"], ["nope", "m.onnx"], []])
def test_the_pre_commit_hooks_report_usage_errors_in_one_line_too(folder: Path, args: list[str]) -> None:
    before = listing(folder)
    assert_one_line_error(CliRunner().invoke(precommit_main, args), 2)
    assert listing(folder) == before


def test_the_installed_command_prints_one_line_not_clicks_usage_block(folder: Path) -> None:
    completed = run_installed("--jobs", "0", "m.onnx", cwd=folder)
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr.splitlines() == [
        "bnfold: error: Invalid value for '-j' / '--jobs': 0 is not in the range x>=1 (see 'bnfold fold --help')"
    ]


@pytest.mark.parametrize("word, command", [("chek", "check"), ("fodl", "fold"), ("chekc", "check")])
def test_a_misspelt_command_is_refused_with_a_suggestion(folder: Path, word: str, command: str) -> None:
    before = listing(folder)
    assert_one_line_error(run_cli(word, "m.onnx", "m.folded.onnx"), 2, f"'{word}' is neither a file nor a command",
                          f"did you mean 'bnfold {command}'?")
    assert listing(folder) == before


def test_a_model_file_named_like_a_command_is_still_folded(folder: Path) -> None:
    shutil.copy(folder / "m.onnx", folder / "chek")
    result = run_cli("chek", "--dry-run", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("chek → dry run: folded 6 of 6")


def test_the_onnxsim_habit_in_out_is_refused_before_any_work_suggesting_o(folder: Path) -> None:
    before = listing(folder)
    result = run_cli("m.onnx", "out.onnx")
    assert_one_line_error(result, 2, "out.onnx: no such file", "bnfold m.onnx -o out.onnx")
    assert listing(folder) == before
    assert run_cli("m.onnx", "-o", "out.onnx").exit_code == 0
    assert (folder / "out.onnx").is_file()


@pytest.mark.parametrize("command", [[], ["check", "m.folded.onnx"]])
def test_tol_naming_no_output_is_refused_listing_the_outputs(folder: Path, command: list[str]) -> None:
    before = listing(folder)
    outputs = [value.name for value in onnx.load(folder / "m.onnx").graph.output]
    args = [*command[:1], "m.onnx", *command[1:], "--tol", "logits:1e-3,1e-3"]
    assert_one_line_error(run_cli(*args), 2, "--tol logits: the model has no output of that name",
                          f"(its outputs: {', '.join(outputs)})")
    assert listing(folder) == before
    assert run_cli(*args[:-1], f"{outputs[0]}:1e-3,1e-3").exit_code == 0


HELPS = [(main, []), (main, ["fold"]), (main, ["check"]), (precommit_main, []), (precommit_main, ["fold"]),
         (precommit_main, ["check"])]


@pytest.mark.parametrize("command, args", HELPS, ids=["bnfold", "fold", "check", "hooks", "hook fold", "hook check"])
def test_every_help_lists_every_exit_code(command: click.Group, args: list[str]) -> None:
    result = CliRunner().invoke(command, [*args, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    codes = {int(match) for match in re.findall(r"^\s+(\d+)\s+\S", result.stdout.split("Exit codes")[1], re.M)}
    assert codes == {0, 1, 2, 3, 4, 130}


@pytest.mark.parametrize("command, args", [(main, []), (precommit_main, [])])
def test_the_command_list_shows_each_summary_whole(command: click.Group, args: list[str]) -> None:
    listed = " ".join(CliRunner().invoke(command, ["--help"], terminal_width=80).stdout.split())
    for name, subcommand in command.commands.items():
        summary = " ".join(subcommand.get_short_help_str(limit=10_000).split())
        first_sentence = re.match(r"(.+?\.)(\s|$)", " ".join((subcommand.help or "").split()))
        assert first_sentence is not None and summary == first_sentence.group(1)
        assert f"{name} {summary}" in listed


def test_version_names_the_libraries_a_bug_report_needs() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    for name, module in (("onnx", onnx), ("onnxruntime", onnxruntime), ("numpy", numpy)):
        assert f"{name} {module.__version__}" in result.stdout
    assert result.stdout.startswith("bnfold ")


def test_an_input_shape_against_a_fixed_dim_names_the_dim(tmp_path: Path) -> None:
    model = REPOSITORY / "sample_models" / "refused_bn.onnx"  # x: float32[1, 8, 16, 16]
    assert_one_line_error(run_cli(model, "--dry-run", "--input-shape", "x:1,3,16,16"), 2,
                          "--input-shape x: dim 1 is 3 but the model fixes it at 8")


def test_onnxruntime_messages_keep_their_detail_lines() -> None:
    error = RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: x "
                         "for the following indices\n index: 1 Got: 4 Expected: 5\n Please fix either the inputs")
    message = onnxruntime_message(error)
    assert "\n" not in message and "index: 1 Got: 4 Expected: 5" in message
    assert len(onnxruntime_message(RuntimeError("x" * 2000))) == 500


def test_output_to_stdout_is_refused_rather_than_written_to_a_file_named_dash(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run_cli(REPOSITORY / "sample_models" / "cnn_residual.onnx", "-o", "-"), 2, "-o -")
    assert list(tmp_path.iterdir()) == []
