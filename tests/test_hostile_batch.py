"""Batch runs whose worker processes die hard: the model being folded becomes an error row
(exit 4), nothing of it is left on disk, and every other model is still folded and reported."""

from __future__ import annotations

import faulthandler
import json
import multiprocessing
import os
import signal
import tempfile
from pathlib import Path

import onnx
import pytest

from bnfold import pipeline
from sample_models.modelkit import GraphBuilder
from tests.support import run_cli

pytestmark = pytest.mark.skipif(
    multiprocessing.get_start_method() != "fork", reason="workers see the monkeypatched pipeline only when forked"
)

DEATHS = {
    "exit": lambda: os._exit(3),
    "SIGKILL": lambda: os.kill(os.getpid(), signal.SIGKILL),  # what the out-of-memory killer sends
    # A crash in a native library (without pytest's fault handler printing the worker's stack).
    "SIGSEGV": lambda: (faulthandler.disable(), os.kill(os.getpid(), signal.SIGSEGV)),
}


def _model(seed: int) -> onnx.ModelProto:
    b = GraphBuilder(seed=seed)
    x = b.input("x", [1, 3, 5, 5])
    b.output(b.node("Relu", [b.batchnorm(b.conv(x, 3, 4), 4)]))
    return b.model()


def _dying_at(stage: str, death: str, victim: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the worker die while folding (before anything is staged) or while verifying (with
    the folded model staged) the model whose file is named ``victim``."""
    if stage == "folding":
        load = pipeline.load_model

        def load_or_die(path: Path):  # noqa: ANN202 - LoadedModel
            if Path(path).name == victim:
                DEATHS[death]()
            return load(path)

        monkeypatch.setattr(pipeline, "load_model", load_or_die)
    else:
        verify = pipeline.verify_equivalence

        def verify_or_die(original: Path, *args: object, **kwargs: object):  # noqa: ANN202 - Verification
            if Path(original).name == victim:
                DEATHS[death]()
            return verify(original, *args, **kwargs)

        monkeypatch.setattr(pipeline, "verify_equivalence", verify_or_die)


def _staging_left(*folders: Path) -> list[Path]:
    return [path for folder in folders for path in folder.rglob(".bnfold-*")]


@pytest.mark.parametrize("death", sorted(DEATHS))
@pytest.mark.parametrize("stage", ["folding", "verifying"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_worker_that_dies_costs_only_its_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, death: str, stage: str, dry_run: bool
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    names = [f"{index}.onnx" for index in range(5)]
    for seed, name in enumerate(names):
        onnx.save(_model(seed), models / name)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where a dry run stages
    _dying_at(stage, death, "1.onnx", monkeypatch)
    flags = ["--dry-run"] if dry_run else []
    result = run_cli(models, "-j", "2", "--json", "-", *flags)
    assert result.exit_code == 4, (result.stdout, result.stderr)
    document = json.loads(result.stdout)
    rows = {Path(row["input"]).name: row for row in document["models"]}
    assert list(rows) == names
    dead = rows.pop("1.onnx")
    assert dead["status"] == "error" and dead["exit_code"] == 4 and dead["report"] is None
    how = "exited with code 3" if death == "exit" else f"killed by {death}"
    assert f"the worker process folding it died: {how}" in dead["error"]
    assert all(row["status"] == "equivalent" and row["exit_code"] == 0 for row in rows.values())
    written = sorted(path.name for path in models.glob("*.folded.onnx"))
    assert written == ([] if dry_run else sorted(name.replace(".onnx", ".folded.onnx") for name in rows))
    assert _staging_left(models, scratch) == []


def test_the_table_shows_the_dead_workers_model_as_an_error_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for seed in range(3):
        onnx.save(_model(seed), tmp_path / f"{seed}.onnx")
    _dying_at("verifying", "SIGKILL", "0.onnx", monkeypatch)
    result = run_cli(tmp_path, "-j", "2", "--quiet")
    assert result.exit_code == 4, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{tmp_path / '0.onnx'}: error (exit 4): internal error (the worker process")
    assert all("equivalent" in line for line in lines[1:3])
    assert lines[3].startswith("3 models: 2 equivalent, 1 error")
