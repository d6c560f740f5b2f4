"""``bnfold A B DIR ...``: many models per run, one row each, the worst exit code, no partial output."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bnfold import pipeline
from bnfold.batch import BatchReport, ModelResult, find_models, fold_models
from bnfold.pipeline import FoldOptions
from tests.support import run_cli, write_model_onnxruntime_cannot_run

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"




def copy_sample(name: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(SAMPLES / name, target))


def leftovers(folder: Path) -> list[Path]:
    """Staging folders left anywhere under ``folder``."""
    return list(folder.rglob(".bnfold-*"))


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """models/a.onnx, models/deep/b.onnx, a stale output and a staging folder to skip, and broken.onnx.

    The working directory is tmp_path, so the table shows short relative paths.
    """
    monkeypatch.chdir(tmp_path)
    copy_sample("cnn_residual.onnx", tmp_path / "models" / "a.onnx")
    copy_sample("mlp_gemm_bn.onnx", tmp_path / "models" / "deep" / "b.onnx")
    copy_sample("conv_no_bias.onnx", tmp_path / "models" / "old.folded.onnx")
    copy_sample("conv_no_bias.onnx", tmp_path / "models" / ".bnfold-abc" / "staged.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"this is not a model\n")
    return tmp_path


MODELS = ["models/a.onnx", "models/deep/b.onnx", "broken.onnx"]


def test_find_models_searches_folders_in_order_and_skips_outputs_and_staging(tree: Path) -> None:
    (tree / "empty").mkdir()
    found = find_models([Path("broken.onnx"), Path("models"), Path("models/a.onnx"), Path("empty")])
    assert found == [Path("broken.onnx"), Path("models/a.onnx"), Path("models/deep/b.onnx"), Path("empty")]


def test_every_model_gets_a_row_and_the_broken_one_does_not_stop_the_others(tree: Path) -> None:
    result = run_cli("models", "broken.onnx", env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].rstrip() == "Folded 3 models (-j 1)"
    row = {name: next(line for line in lines if line.startswith(f" {name} ")) for name in MODELS}
    assert row["models/a.onnx"].split()[1:3] == ["6/6", "20→14"]
    assert row["models/deep/b.onnx"].split()[1:3] == ["3/3", "8→5"]
    assert "equivalent" in row["models/a.onnx"] and "equivalent" in row["models/deep/b.onnx"]
    assert "error (exit 2)" in row["broken.onnx"]
    assert lines[lines.index(row["broken.onnx"]) + 1].startswith(" not an ONNX model (Error parsing message")
    total = next(line for line in lines if line.startswith(" total (3 "))
    assert total.split()[3:5] == ["9/9", "28→19"]
    assert "2 equivalent" in total and lines[lines.index(total) + 1].split() == ["1", "error"]
    assert (tree / "models" / "a.folded.onnx").is_file() and (tree / "models" / "deep" / "b.folded.onnx").is_file()
    assert not (tree / "broken.folded.onnx").exists()


def test_json_lists_every_full_report_and_the_totals(tree: Path) -> None:
    result = run_cli("models", "broken.onnx", "--json", "-")
    assert result.exit_code == 2
    document = json.loads(result.stdout)
    assert document["schema"] == "bnfold.batch/1"
    assert document["exit_code"] == 2 and document["jobs"] == 1
    assert [m["input"] for m in document["models"]] == MODELS
    assert [m["status"] for m in document["models"]] == ["equivalent", "equivalent", "error"]
    assert [m["exit_code"] for m in document["models"]] == [0, 0, 2]
    first, _, broken = document["models"]
    assert first["error"] is None and first["report"]["schema"] == "bnfold.fold/1"
    assert len(first["report"]["folds"]) == 6 and first["report"]["written"] is True
    assert broken["report"] is None and broken["error"].startswith("broken.onnx: not an ONNX model")
    totals = document["totals"]
    assert totals["models"] == 3 and totals["statuses"] == {"equivalent": 2, "error": 1}
    assert (totals["batchnorms_folded"], totals["batchnorms"]) == (9, 9)
    assert (totals["nodes_before"], totals["nodes_after"]) == (28, 19)
    assert totals["max_abs_error"] == max(m["report"]["verification"]["outputs"][0]["max_abs_error"]
                                          for m in document["models"][:2])


def test_quiet_prints_a_line_per_model_and_the_totals(tree: Path) -> None:
    result = run_cli("models", "broken.onnx", "-q", "--dry-run")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("models/a.onnx → dry run: folded 6 of 6 BatchNormalization, equivalent")
    assert lines[1].startswith("models/deep/b.onnx → dry run: folded 3 of 3 BatchNormalization, equivalent")
    assert lines[2].startswith("broken.onnx: error (exit 2): not an ONNX model (")
    assert lines[3].startswith("3 models: 2 equivalent, 1 error; folded 9 of 9 BatchNormalization in ")
    assert len(lines) == 4 and result.exit_code == 2


def test_exit_code_is_the_worst_over_all_models(tree: Path) -> None:
    write_model_onnxruntime_cannot_run(tree / "custom.onnx")
    result = run_cli("models", "custom.onnx", "broken.onnx", "--json", "-")
    document = json.loads(result.stdout)
    assert [m["exit_code"] for m in document["models"]] == [0, 0, 3, 2]
    assert document["models"][2]["error"].startswith("onnxruntime cannot load the original model: ")
    assert result.exit_code == 3


@pytest.mark.parametrize("codes,worst", [([0, 0], 0), ([0, 1], 1), ([1, 2, 0], 2), ([3, 1, 2], 3), ([], 0)])
def test_worst_outcome_orders_3_above_2_above_1_above_0(codes: list[int], worst: int) -> None:
    results = [ModelResult(Path(f"m{i}.onnx"), None, "x", code, 0.0) for i, code in enumerate(codes)]
    assert BatchReport(results, jobs=1, seconds=0.0).exit_code == worst


def _without_timings(document: object) -> object:
    """The report with everything that measures time (or the job count) removed."""
    if isinstance(document, dict):
        return {k: _without_timings(v) for k, v in document.items() if k not in ("seconds", "timings", "jobs")}
    if isinstance(document, list):
        return [_without_timings(v) for v in document]
    return document


def test_two_jobs_give_the_same_results_in_the_same_order_as_one(tree: Path) -> None:
    copy_sample("refused_bn.onnx", tree / "models" / "c.onnx")
    one = run_cli("models", "broken.onnx", "--dry-run", "--json", "-")
    two = run_cli("models", "broken.onnx", "--dry-run", "--json", "-", "-j", "2")
    assert one.exit_code == two.exit_code == 2
    documents = json.loads(one.stdout), json.loads(two.stdout)
    assert documents[1]["jobs"] == 2
    assert _without_timings(documents[0]) == _without_timings(documents[1])
    assert leftovers(tree) == [tree / "models" / ".bnfold-abc"]


def test_output_dir_receives_every_folded_model(tree: Path) -> None:
    (tree / "out").mkdir()
    result = run_cli("models", "--output-dir", "out", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tree / "out").iterdir()) == ["a.folded.onnx", "b.folded.onnx"]
    assert not (tree / "models" / "a.folded.onnx").exists()
    assert "models/deep/b.onnx → out/b.folded.onnx: folded 3 of 3" in result.stdout


def test_output_dir_with_one_model_keeps_the_full_report(tree: Path) -> None:
    (tree / "out").mkdir()
    result = run_cli("models/a.onnx", "--output-dir", "out")
    assert result.exit_code == 0, result.output
    assert "Before / after" in result.stdout and (tree / "out" / "a.folded.onnx").is_file()


def test_same_named_models_colliding_in_output_dir_are_refused_before_any_work(tree: Path) -> None:
    (tree / "out").mkdir()
    copy_sample("conv_no_bias.onnx", tree / "other" / "a.onnx")
    result = run_cli("models", "other", "--output-dir", "out")
    assert result.exit_code == 2
    assert result.stderr == (
        f"bnfold: error: models/a.onnx and other/a.onnx would both be written to {Path('out/a.folded.onnx')}; "
        "rename one or fold them in separate runs\n"
    )
    assert list((tree / "out").iterdir()) == [] and not (tree / "models" / "deep" / "b.folded.onnx").exists()


def test_missing_output_dir_is_created_with_its_parents(tree: Path) -> None:
    result = run_cli("models", "--output-dir", "new/folded")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tree / "new" / "folded").iterdir()) == ["a.folded.onnx", "b.folded.onnx"]


@pytest.mark.parametrize("models", [["models/a.onnx", "broken.onnx"], ["models"], ["models/deep"]])
def test_output_is_refused_with_several_models_or_a_folder(tree: Path, models: list[str]) -> None:
    result = run_cli(*models, "-o", "x.onnx")
    assert result.exit_code == 2
    assert "-o/--output names one file; with several models or a folder use --output-dir DIR" in result.stderr
    assert not (tree / "x.onnx").exists() and not (tree / "models" / "a.folded.onnx").exists()


def test_output_and_output_dir_cannot_be_combined(tree: Path) -> None:
    result = run_cli("models/a.onnx", "-o", "x.onnx", "--output-dir", ".")
    assert result.exit_code == 2
    assert "-o/--output and --output-dir cannot be combined" in result.stderr


def test_no_progress_bar_when_piped_and_one_on_a_terminal_unless_quiet(tree: Path) -> None:
    assert run_cli("models", "--dry-run").stderr == ""
    on_terminal = run_cli("models", "--dry-run", env={"FORCE_COLOR": "1"})
    assert "folding" in on_terminal.stderr and "100%" in on_terminal.stderr
    assert run_cli("models", "--dry-run", "-q", env={"FORCE_COLOR": "1"}).stderr == ""


def test_library_folds_without_the_cli_and_reports_in_input_order(tree: Path) -> None:
    seen: list[Path] = []
    report = fold_models(find_models([Path("models"), Path("broken.onnx")]), FoldOptions(dry_run=True),
                         jobs=2, on_result=lambda result: seen.append(result.input))
    assert [r.input for r in report.results] == [Path(m) for m in MODELS]
    assert sorted(seen) == sorted(Path(m) for m in MODELS)
    assert [r.status for r in report.results] == ["equivalent", "equivalent", "error"]


# -- Ctrl-C -------------------------------------------------------------------------------------


def interrupt_verifying(model_name: str, others_take: float = 0.0, done: Path | None = None):  # noqa: ANN201
    """A stand-in for verify_equivalence: Ctrl-C while verifying ``model_name`` (its staged file
    is written by then); the other models verify normally after ``others_take`` seconds, and
    then leave a ``<model>.verified`` file in ``done``."""
    verify = pipeline.verify_equivalence

    def verify_or_interrupt(original: Path, *args: object, **kwargs: object):  # noqa: ANN202
        if Path(original).name == model_name:
            raise KeyboardInterrupt
        time.sleep(others_take)
        if done is not None:
            (done / f"{Path(original).name}.verified").touch()
        return verify(original, *args, **kwargs)

    return verify_or_interrupt


def test_interrupted_single_run_leaves_nothing(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "verify_equivalence", interrupt_verifying("a.onnx"))
    result = run_cli("models/a.onnx")
    assert result.exit_code == 130
    assert result.stderr == "bnfold: interrupted; nothing was written\n"
    assert sorted(p.name for p in (tree / "models").iterdir()) == [".bnfold-abc", "a.onnx", "deep", "old.folded.onnx"]


def test_interrupted_batch_keeps_finished_models_and_leaves_no_partial_output(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "verify_equivalence", interrupt_verifying("b.onnx"))
    result = run_cli("models", "broken.onnx")
    assert result.exit_code == 130
    assert result.stderr == "bnfold: interrupted; models finished before were written; no partial output was left\n"
    assert (tree / "models" / "a.folded.onnx").is_file()
    assert sorted(p.name for p in (tree / "models" / "deep").iterdir()) == ["b.onnx"]
    assert leftovers(tree) == [tree / "models" / ".bnfold-abc"]


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork",
                    reason="workers see the monkeypatched pipeline only when forked")
def test_interrupted_workers_are_stopped_and_clean_up(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker is interrupted while the other is verifying its staged file: that one is
    stopped too, removes its staging folder, and the queued model never starts."""
    copy_sample("refused_bn.onnx", tree / "models" / "c.onnx")
    done = tree / "done"
    done.mkdir()
    monkeypatch.setattr(pipeline, "verify_equivalence", interrupt_verifying("a.onnx", others_take=10.0, done=done))
    result = run_cli("models", "-j", "2")
    assert result.exit_code == 130
    assert list(done.iterdir()) == [], "the busy worker was stopped, not waited for"
    assert leftovers(tree) == [tree / "models" / ".bnfold-abc"]
    assert not list((tree / "models").rglob("[abc].folded.onnx"))


# -- the real command -----------------------------------------------------------------------------


def test_installed_command_folds_a_folder_with_two_jobs(tree: Path) -> None:
    copy_sample("refused_bn.onnx", tree / "models" / "c.onnx")
    executable = Path(sys.executable).with_name("bnfold")
    completed = subprocess.run([str(executable), "models", "broken.onnx", "-j", "2", "-q"],
                               capture_output=True, text=True, check=False, cwd=tree)
    assert completed.returncode == 2, completed.stderr
    assert completed.stderr == ""
    lines = completed.stdout.splitlines()
    assert [line.split(" ")[0] for line in lines[:4]] == ["models/a.onnx", "models/c.onnx", "models/deep/b.onnx",
                                                          "broken.onnx:"]
    assert lines[4].startswith("4 models: 3 equivalent, 1 error; folded 10 of 13 BatchNormalization in ")
    assert all((tree / "models" / name).is_file() for name in ("a.folded.onnx", "c.folded.onnx", "deep/b.folded.onnx"))


@pytest.mark.parametrize("stop", ["Ctrl-C on the terminal's group", "SIGTERM to bnfold", "SIGKILL to bnfold"])
def test_a_run_stopped_from_outside_stops_every_process_cleanly(tree: Path, stop: str) -> None:
    """Stopped once both workers are verifying staged files: as a terminal does (SIGINT to the
    group), as ``kill``/``docker stop`` do (SIGTERM to bnfold alone), or by killing bnfold
    outright, when the workers are told by the system. No worker goes on, nothing is written."""
    copy_sample("cnn_residual.onnx", tree / "models" / "c.onnx")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("bnfold")), "models", "-j", "2", "--trials", "2000"],
        cwd=tree, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    # Signal only once both workers have staged their model and are verifying it.
    decoy = tree / "models" / ".bnfold-abc"
    staged: list[Path] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        staged = [folder for folder in leftovers(tree) if folder != decoy and any(folder.glob("*.onnx"))]
        if len(staged) == 2:
            break
        time.sleep(0.05)
    assert process.poll() is None and len(staged) == 2, "the workers never reached verification"
    workers = [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
    if stop == "Ctrl-C on the terminal's group":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM if stop == "SIGTERM to bnfold" else signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=30)  # returns once no worker holds the pipes
    if stop == "SIGKILL to bnfold":
        assert process.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 30  # the workers remove their staging folders, then exit
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
            time.sleep(0.05)
    else:
        assert process.returncode == 130
        assert stderr == "bnfold: interrupted; models finished before were written; no partial output was left\n"
        assert stdout == ""
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert leftovers(tree) == [tree / "models" / ".bnfold-abc"]
    assert not list((tree / "models").rglob("[abc].folded.onnx"))


def test_sigterm_to_a_single_model_run_removes_its_staged_output(tree: Path) -> None:
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("bnfold")), "models/a.onnx", "--trials", "2000"],
        cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    decoy = tree / "models" / ".bnfold-abc"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None and not [
            folder for folder in leftovers(tree) if folder != decoy and any(folder.glob("*.onnx"))]:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it staged its output"
    process.terminate()
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and stderr == "bnfold: interrupted; nothing was written\n"
    assert leftovers(tree) == [decoy] and not (tree / "models" / "a.folded.onnx").exists()
