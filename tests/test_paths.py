"""No run may write a file it reads, or write one file twice: refused before any work.

Every case is judged by the tree on disk: every file (models, their external data, ``--inputs``
files, stale outputs) is hashed before and after, and a refused run must leave the tree exactly
as it was, exit 2 with one line. The clashing path is reached in every way a user can: by
name, through ``..``, through a hard link; by ``-o``, by the default output name, by
``--output-dir``, by ``--json``; with one model, several, folders and ``-j 2``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from bnfold.inputs import generate_inputs, input_specs
from sample_models.modelkit import GraphBuilder
from tests.support import assert_one_line_error, op_count, run_cli


def conv_bn_model(seed: int) -> onnx.ModelProto:
    """Conv → BN → Relu → Conv → BN with weights large enough to go to external data."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["batch", 4, 6, 6])
    y = b.node("Relu", [b.batchnorm(b.conv(x, 4, 8, bias=seed % 2 == 0), 8)])
    b.output(b.batchnorm(b.conv(y, 8, 8), 8))
    return b.model()


def save(model: onnx.ModelProto, path: Path, data: str | None = None) -> Path:
    """Save self-contained, or with every tensor in the external data file ``data``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if data is None:
        onnx.save_model(copy, str(path))
    else:
        (path.parent / data).parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=0)
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: content hash (or 'dir'), by relative path."""
    return {
        str(path.relative_to(folder)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
    }


def assert_refused_untouched(folder: Path, args: list[object], *fragments: str) -> None:
    """The run exits 2 with one line containing ``fragments``; no file under ``folder`` changed,
    appeared or vanished."""
    before = snapshot(folder)
    result = run_cli(*args)
    assert_one_line_error(result, 2, *fragments)
    assert snapshot(folder) == before


def outputs_of(model_path: Path) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    model = onnx.load_model(str(model_path), load_external_data=False)
    return session.run(None, generate_inputs(input_specs(model, {}), 0))


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- the output, or its data file, is a file the run reads ------------------------------------------------------

DATA_NAMES = ["w.bin", "weights.data", "out.onnx.data", "m.onnx.data", "sub/w.bin"]


@pytest.mark.parametrize("location", DATA_NAMES)
@pytest.mark.parametrize("spelling", ["plain", "dotdot", "hardlink"])
def test_output_onto_the_inputs_external_data_is_refused(work: Path, location: str, spelling: str) -> None:
    model = save(conv_bn_model(1), work / "m.onnx", data=location)
    target = {
        "plain": Path(location),
        "dotdot": Path("sub") / ".." / location if "/" not in location else Path("sub/../sub") / Path(location).name,
        "hardlink": Path("link.bin"),
    }[spelling]
    (work / "sub").mkdir(exist_ok=True)
    if spelling == "hardlink":
        os.link(work / location, work / "link.bin")
    assert_refused_untouched(work, [model, "-o", target], "external data", location)


@pytest.mark.parametrize("in_place", [False, True])
def test_output_whose_data_file_is_the_inputs_data_file_is_refused(work: Path, in_place: bool) -> None:
    """``out.onnx`` writes ``out.onnx.data``: the input's weights. --in-place replaces only
    the input itself, not a file it reads under another output name."""
    model = save(conv_bn_model(2), work / "m.onnx", data="out.onnx.data")
    args = [model, "-o", "out.onnx", *(["--in-place"] if in_place else [])]
    assert_refused_untouched(work, args, "out.onnx.data")


def test_output_onto_another_batch_models_data_file_is_refused(work: Path) -> None:
    save(conv_bn_model(3), work / "a.onnx")
    save(conv_bn_model(4), work / "b.onnx", data="a.folded.onnx.data")
    for args in (["a.onnx", "b.onnx"], ["b.onnx", "a.onnx"], [".", "-j", "2"]):
        assert_refused_untouched(work, args, "a.folded.onnx.data", "b.onnx")


def test_output_onto_an_inputs_file_is_refused(work: Path) -> None:
    save(conv_bn_model(5), work / "m.onnx")
    model = onnx.load(str(work / "m.onnx"))
    data_set = work / "data" / "test_data_set_0"
    data_set.mkdir(parents=True)
    for index, (name, value) in enumerate(generate_inputs(input_specs(model, {}), 3).items()):
        onnx.save_tensor(numpy_helper.from_array(value, name), str(data_set / f"input_{index}.pb"))
    np.savez(work / "x.npz", **generate_inputs(input_specs(model, {}), 4))
    pb = data_set / "input_0.pb"
    assert_refused_untouched(work, ["m.onnx", "--inputs", "data", "-o", pb], "--inputs file")
    assert_refused_untouched(work, ["m.onnx", "--inputs", "data", "--json", pb], "--inputs file")
    assert_refused_untouched(work, ["m.onnx", "--inputs", "x.npz", "-o", "x.npz"], "--inputs file")
    assert_refused_untouched(work, ["check", "m.onnx", "m.onnx", "--inputs", "x.npz", "--json", "x.npz"],
                             "--inputs file")


# -- --json names a file the run reads or writes ----------------------------------------------------------------

def _json_targets(work: Path) -> dict[str, Path]:
    """m.onnx (with data w.bin), n.onnx self-contained, a hard link and a symbolic link to n.onnx."""
    save(conv_bn_model(6), work / "m.onnx", data="w.bin")
    save(conv_bn_model(7), work / "n.onnx")
    os.link(work / "n.onnx", work / "n-hard.onnx")
    (work / "n-soft.onnx").symlink_to("n.onnx")
    return {"model": work / "m.onnx", "data": work / "w.bin", "hard link": work / "n-hard.onnx",
            "symbolic link": work / "n-soft.onnx"}


@pytest.mark.parametrize("target", ["model", "data", "hard link", "symbolic link"])
@pytest.mark.parametrize("mode", ["one", "one --dry-run", "one --no-verify", "batch", "batch -j 2", "folder",
                                  "check", "check reversed"])
def test_json_onto_a_file_the_run_reads_is_refused(work: Path, target: str, mode: str) -> None:
    path = _json_targets(work)[target]
    args: list[object] = {
        "one": ["m.onnx"], "one --dry-run": ["m.onnx", "--dry-run"], "one --no-verify": ["m.onnx", "--no-verify"],
        "batch": ["m.onnx", "n.onnx"], "batch -j 2": ["m.onnx", "n.onnx", "-j", "2"], "folder": ["."],
        "check": ["check", "m.onnx", "n.onnx"], "check reversed": ["check", "n.onnx", "m.onnx"],
    }[mode]
    if target.endswith("link") and mode in ("one", "one --dry-run", "one --no-verify"):
        args = ["n.onnx", *args[1:]]
    assert_refused_untouched(work, [*args, "--json", path.name], "the JSON report would overwrite")


@pytest.mark.parametrize("args", [["m.onnx", "--tol", "nosuch:1,1"], ["m.onnx", "--seed", "-1"],
                                  ["m.onnx", "n.onnx", "--seed", "-1"], ["check", "m.onnx", "missing.onnx"]])
def test_json_onto_a_data_file_is_refused_even_when_the_run_would_stop_early(work: Path, args: list[str]) -> None:
    """A run that stops before loading (a bad option, a missing model) still writes its failure
    report: that path is checked against the models' data files before anything else."""
    _json_targets(work)
    assert_refused_untouched(work, [*args, "--json", "w.bin"], "the JSON report would overwrite", "w.bin")


def test_json_onto_a_model_of_the_batch_that_cannot_be_read_is_refused(work: Path) -> None:
    save(conv_bn_model(14), work / "m.onnx")
    (work / "broken.onnx").write_bytes(b"not a model")
    for jobs in ([], ["-j", "2"]):
        assert_refused_untouched(work, ["m.onnx", "broken.onnx", *jobs, "--json", "broken.onnx"],
                                 "would overwrite the input model broken.onnx")


@pytest.mark.parametrize("written", ["m.folded.onnx", "m.folded.onnx.data", "out/m.folded.onnx"])
def test_json_onto_a_file_the_run_writes_is_refused(work: Path, written: str) -> None:
    save(conv_bn_model(8), work / "m.onnx", data="w.bin")
    (work / "out").mkdir()
    output_args = ["--output-dir", "out"] if written.startswith("out/") else []
    assert_refused_untouched(work, ["m.onnx", *output_args, "--json", written], "would both be written")
    assert_refused_untouched(work, ["m.onnx", "-o", "r.onnx", "--json", "r.onnx"], "would both be written")


@pytest.mark.parametrize("mode", [["m.onnx"], ["m.onnx", "n.onnx"], ["check", "m.onnx", "n.onnx"]])
def test_json_into_a_missing_folder_or_onto_a_folder_is_refused_before_anything_is_written(
    work: Path, mode: list[str]
) -> None:
    save(conv_bn_model(9), work / "m.onnx")
    save(conv_bn_model(10), work / "n.onnx")
    (work / "report.json").mkdir()
    assert_refused_untouched(work, [*mode, "--json", "missing/report.json"], "does not exist")
    assert_refused_untouched(work, [*mode, "--json", "report.json"], "is a directory")


# -- outputs of a batch that hit its inputs or each other --------------------------------------------------------

def _model_files(work: Path, names: list[str]) -> None:
    for seed, name in enumerate(names):
        save(conv_bn_model(20 + seed), work / name)


@pytest.mark.parametrize("jobs", [[], ["-j", "2"]])
@pytest.mark.parametrize(
    "names,args,fragment",
    [
        (["x.onnx", "x.folded.onnx"], ["x.onnx", "x.folded.onnx"], "would overwrite the input model"),
        (["x.onnx", "x.folded.onnx"], ["x.folded.onnx", "x.onnx"], "would overwrite the input model"),
        (["m", "m.onnx"], ["m", "m.onnx"], "would both be written to"),
        (["d/a.onnx", "d/a.folded.onnx"], ["d", "d/a.folded.onnx"], "would overwrite the input model"),
        (["d/a.onnx", "e/a"], ["d", "e/a", "--output-dir", "out"], "would both be written to"),
        (["a.onnx", "out/a.folded.onnx"], ["a.onnx", "out/a.folded.onnx", "--output-dir", "out"],
         "would overwrite the input model"),
        (["a.onnx", "b.onnx"], ["a.onnx", "b.onnx", "--json", "b.folded.onnx"], "would both be written"),
    ],
)
def test_batch_outputs_that_hit_inputs_or_each_other_are_refused(
    work: Path, names: list[str], args: list[str], fragment: str, jobs: list[str]
) -> None:
    _model_files(work, names)
    (work / "out").mkdir(exist_ok=True)
    assert_refused_untouched(work, [*args, *jobs], fragment)


def test_in_place_replaces_only_its_own_input(work: Path) -> None:
    """x.onnx --in-place may not replace x.folded.onnx, which is another input."""
    _model_files(work, ["x.onnx", "x.folded.onnx"])
    assert_refused_untouched(work, ["x.onnx", "x.folded.onnx", "--in-place"], "would overwrite the input model")


def test_dry_run_writes_no_model_so_outputs_may_hit_inputs(work: Path) -> None:
    _model_files(work, ["x.onnx", "x.folded.onnx", "m", "m.onnx"])
    before = snapshot(work)
    result = run_cli("x.onnx", "x.folded.onnx", "m", "m.onnx", "--dry-run", "-q")
    assert result.exit_code == 0, result.output
    assert snapshot(work) == before


def test_a_dry_run_report_may_go_where_the_output_would(work: Path) -> None:
    """A dry run writes no model, so its default output path is free for the report."""
    save(conv_bn_model(15), work / "m.onnx", data="w.bin")
    result = run_cli("m.onnx", "--dry-run", "-q", "--json", "m.folded.onnx")
    assert result.exit_code == 0, result.output
    assert json.loads((work / "m.folded.onnx").read_text())["status"] == "equivalent"
    assert_refused_untouched(work, ["m.onnx", "--dry-run", "--json", "w.bin"], "the JSON report would overwrite")


# -- an existing folder where the output's data file goes --------------------------------------------------------

@pytest.mark.parametrize("output", [None, "out.onnx", "sub/out.onnx"])
def test_folder_at_the_outputs_data_path_is_refused_before_any_work(work: Path, output: str | None) -> None:
    model = save(conv_bn_model(11), work / "m.onnx", data="w.bin")
    target = work / (output or "m.folded.onnx")
    target.parent.mkdir(exist_ok=True)
    (target.parent / f"{target.name}.data").mkdir()
    args = [model, *(["-o", output] if output else [])]
    assert_refused_untouched(work, args, "would replace a directory")


# -- what --in-place still allows -------------------------------------------------------------------------------

@pytest.mark.parametrize("location", ["m.onnx.data", "w.bin"])
def test_in_place_replaces_the_model_and_its_own_data_file(work: Path, location: str) -> None:
    save(conv_bn_model(12), work / "reference" / "m.onnx", data=location)
    model = save(conv_bn_model(12), work / "m.onnx", data=location)
    expected = outputs_of(work / "reference" / "m.onnx")
    result = run_cli(model, "-o", model, "--in-place", "-q")
    assert result.exit_code == 0, result.output
    folded = onnx.load_model(str(model), load_external_data=False)
    assert op_count(folded, "BatchNormalization") == 0
    onnx.checker.check_model(str(model), full_check=True)
    for reference, actual in zip(expected, outputs_of(model), strict=True):
        np.testing.assert_allclose(actual, reference, atol=1e-4, rtol=1e-3)
    assert not list(work.glob(".bnfold-*"))


def test_refusals_happen_before_onnxruntime_or_folding(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"Before any work": the refusal comes before the fold itself is attempted."""
    from bnfold import pipeline

    calls: list[str] = []
    real: Callable[..., object] = pipeline.fold_batchnorms
    monkeypatch.setattr(pipeline, "fold_batchnorms", lambda *a, **k: calls.append("fold") or real(*a, **k))
    save(conv_bn_model(13), work / "m.onnx", data="w.bin")
    assert_refused_untouched(work, ["m.onnx", "-o", "w.bin"], "external data")
    assert_refused_untouched(work, ["m.onnx", "--json", "w.bin"], "external data")
    assert calls == []


def test_a_data_file_no_model_at_the_output_names_is_not_replaced(work: Path) -> None:
    """A folded model moved elsewhere keeps reading ``<its old name>.data``: folding again to
    the old name must not replace that file. Replacing one's own earlier output still works."""
    save(conv_bn_model(16), work / "m.onnx", data="w.bin")
    assert run_cli("m.onnx", "-q").exit_code == 0
    os.replace(work / "m.folded.onnx", work / "deployed.onnx")  # reads m.folded.onnx.data
    assert_refused_untouched(work, ["m.onnx", "-q"], "m.folded.onnx.data exists and is not the data file")
    assert run_cli("check", "m.onnx", "deployed.onnx", "-q").exit_code == 0
    assert run_cli("m.onnx", "-o", "again.onnx", "-q").exit_code == 0
    assert run_cli("m.onnx", "-o", "again.onnx", "-q").exit_code == 0  # its own earlier output
