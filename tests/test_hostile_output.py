"""What bnfold prints and writes for hostile-but-valid models: names that look like rich
markup are printed as they are, and a failure while showing the report leaves no output."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnfold import report as render
from bnfold.graph import GraphIndex
from bnfold.pipeline import FoldOptions, FoldReport
from bnfold.rules import Affine, Refusal, build_rules
from bnfold.rules.base import Absorbed
from bnfold.rules.conv import ConvBn
from sample_models.modelkit import GraphBuilder
from tests.hostile_support import assert_same_function, count_ops, judge_feeds
from tests.support import assert_one_line_error, run_cli
from tests.test_attribution import CorruptingConvRule

# Strings rich would read as markup (a closing tag with nothing to close, styles, links,
# emoji codes, an escaped bracket), as exporters may write them into names.
HOSTILE_NAMES = ["bn[/]", "[bold]x[/bold]", "[link=https://example.com]y", "[/link]", ":smile:[red]", "a\\[b]"]


def named_model(name: str) -> onnx.ModelProto:
    """Conv → BN (folds) → Relu → BN (left) with ``name`` in every name the report shows: the
    input, both BNs, the Conv, the Relu and the output."""
    b = GraphBuilder(seed=5)
    x = b.input(f"in {name}", ["N", 3, 5, 5])
    conv = b.conv(x, 3, 4)
    b.nodes[-1].name = f"conv {name}"
    folded = b.batchnorm(conv, 4)
    b.nodes[-1].name = f"bn {name}"
    relu = b.node("Relu", [folded])
    b.nodes[-1].name = f"relu {name}"
    b.batchnorm(relu, 4)
    b.nodes[-1].name = f"left {name}"
    b.nodes[-1].output[0] = f"out {name}"
    b.output(f"out {name}")
    return b.model()


def _no_staging_left(folder: Path) -> bool:
    return not any(path.name.startswith(".bnfold-") for path in folder.iterdir())


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("view", [[], ["--quiet"], ["--json", "-"]])
def test_names_like_markup_are_printed_as_they_are(tmp_path: Path, name: str, view: list[str]) -> None:
    # A file name cannot hold "/", but a path can: "dir [" / "] ..." reads "[/]" once joined.
    folder = tmp_path / "dir ["
    folder.mkdir()
    stem = f"] model {name.replace('/', '')}"
    model_path = folder / f"{stem}.onnx"
    model = named_model(name)
    onnx.save(model, model_path)
    result = run_cli(model_path, *view, env={"COLUMNS": "400"})
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stderr == ""
    output = folder / f"{stem}.folded.onnx"
    onnx.checker.check_model(str(output), full_check=True)
    assert_same_function(model_path, output, [judge_feeds(model, seed) for seed in range(2)])
    if view == ["--json", "-"]:
        document = json.loads(result.stdout)
        assert document["folds"][0]["batchnorm"] == f"bn {name}"
        assert document["left"][0]["batchnorm"] == f"left {name}"
        return
    assert str(model_path) in result.stdout and str(output) in result.stdout
    if not view:
        for shown in (f"bn {name}", f"conv {name}", f"left {name}", f"relu {name}", f"in {name}", f"out {name}"):
            assert shown in result.stdout, shown


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_an_op_type_like_markup_is_printed_as_it_is(tmp_path: Path, name: str) -> None:
    """An op of a custom domain is counted in the before/after table under its own name."""
    b = GraphBuilder(seed=6)
    x = b.input("x", [1, 3, 5, 5])
    folded = b.batchnorm(b.conv(x, 3, 4), 4)
    b.nodes.append(helper.make_node(name, [folded], ["y"], domain="org.example"))
    b.outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5]))
    model = helper.make_model(
        helper.make_graph(b.nodes, "custom", b.inputs, b.outputs, b.initializers),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("org.example", 1)], ir_version=8,
    )
    path = tmp_path / "custom.onnx"
    onnx.save(model, path)
    result = run_cli(path, "--no-verify", env={"COLUMNS": "400"})
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert name in result.stdout
    assert count_ops(onnx.load(str(tmp_path / "custom.folded.onnx")), "BatchNormalization") == 0


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_batch_rows_show_hostile_paths_and_names(tmp_path: Path, jobs: str) -> None:
    folder = tmp_path / "["
    folder.mkdir()
    stems = [f"] {index} {name.replace('/', '')}" for index, name in enumerate(HOSTILE_NAMES[:3])]
    for stem, name in zip(stems, HOSTILE_NAMES):
        onnx.save(named_model(name), folder / f"{stem}.onnx")
    result = run_cli(folder, "-j", jobs, env={"COLUMNS": "400"})
    assert result.exit_code == 0, (result.stdout, result.stderr)
    for stem in stems:
        assert str(folder / f"{stem}.onnx") in result.stdout
        assert (folder / f"{stem}.folded.onnx").is_file()


def test_data_set_names_like_markup_are_printed_as_they_are(tmp_path: Path) -> None:
    """Real inputs in ONNX test-data folders: each folder's name labels its trial."""
    model = named_model("plain")
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    data = tmp_path / "data"
    labels = ["test_data_set_[bold]a", "test_data_set_[red]b"]
    for seed, label in enumerate(labels):
        (data / label).mkdir(parents=True)
        feeds = judge_feeds(model, seed)
        for position, (name, value) in enumerate(feeds.items()):
            tensor = numpy_helper.from_array(value, name)
            (data / label / f"input_{position}.pb").write_bytes(tensor.SerializeToString())
    result = run_cli(path, "--inputs", data, env={"COLUMNS": "400"})
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert any(label in result.stdout for label in labels)  # the worst trial's, per output


def _broken_renderer(*_args: object) -> None:
    raise RuntimeError("renderer bug")


@pytest.mark.parametrize("view", [[], ["--quiet"], ["--json", "-"]])
def test_a_report_that_cannot_be_shown_leaves_no_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, view: list[str]
) -> None:
    """Every view of the report is rendered before the folded model is moved into place."""
    path = tmp_path / "model.onnx"
    onnx.save(named_model("plain"), path)
    for renderer in ("render_fold_report", "quiet_fold_line"):
        monkeypatch.setattr(render, renderer, _broken_renderer)
    monkeypatch.setattr(FoldReport, "to_dict", _broken_renderer)
    result = run_cli(path, *view)
    assert result.exit_code == 4, (result.stdout, result.stderr)
    assert "internal error (RuntimeError: renderer bug)" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_json_report_that_cannot_be_written_leaves_no_output(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(named_model("plain"), path)
    result = run_cli(path, "--json", tmp_path / "missing folder" / "report.json")
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_in_a_batch_a_model_whose_row_cannot_be_shown_is_an_error_row_without_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a", "boom", "c"):
        onnx.save(named_model(name), tmp_path / f"{name}.onnx")
    shown = FoldReport.to_dict

    def refuse_boom(report: FoldReport) -> dict[str, object]:
        if "boom" in str(report.input):
            raise RuntimeError("renderer bug")
        return shown(report)

    monkeypatch.setattr(FoldReport, "to_dict", refuse_boom)
    result = run_cli(tmp_path, "--quiet")
    assert result.exit_code == 4, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"{tmp_path / 'boom.onnx'}: error (exit 4): internal error") for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.folded.onnx", "a.onnx", "boom.onnx", "c.folded.onnx", "c.onnx"
    ]
    assert _no_staging_left(tmp_path)


# -- 12. file names that are not UTF-8 ---------------------------------------------------------

NOT_UTF8_FOLDER = os.fsdecode(b"caf\xe9 models")  # Latin-1, as an old archive may hold
NOT_UTF8_NAME = os.fsdecode(b"r\xe9seau \xff.onnx")


def _save_at(model: onnx.ModelProto, path: Path, *, external: bool, scratch: Path) -> None:
    """Save ``model`` (with its weights in ``weights.bin`` beside it when ``external``) at a
    path that may not be UTF-8: written under ``scratch`` and moved, because onnx's writer of
    external data takes UTF-8 paths only."""
    scratch.mkdir()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving with external data moves the weights out of the proto it is given
    onnx.save(copy, scratch / "model.onnx", save_as_external_data=external, location="weights.bin",
              size_threshold=0)
    for written in scratch.iterdir():
        shutil.move(written, path if written.name == "model.onnx" else path.parent / written.name)


def _load_with_data(path: Path, scratch: Path) -> onnx.ModelProto:
    """Load what bnfold wrote, its external data included, from copies with UTF-8 names: the
    data file keeps the name the model gives it."""
    model = onnx.load(path, load_external_data=False)
    scratch.mkdir()
    locations = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    for location in locations:
        shutil.copy(path.parent / location, scratch / location)
    shutil.copy(path, scratch / "model.onnx")
    return onnx.load(scratch / "model.onnx")


@pytest.mark.parametrize("external", [False, True], ids=["self-contained", "external-data"])
@pytest.mark.parametrize("where", ["folder", "name", "both"])
def test_file_names_that_are_not_utf8_fold_and_verify(tmp_path: Path, external: bool, where: str) -> None:
    """Fold (one model, then the folder with -j 2) and check, end to end; the folded model is
    judged by the checker and onnxruntime."""
    folder = tmp_path / (NOT_UTF8_FOLDER if where != "name" else "models")
    folder.mkdir()
    source = folder / (NOT_UTF8_NAME if where != "folder" else "net.onnx")
    model = named_model("plain")
    _save_at(model, source, external=external, scratch=tmp_path / "written")
    result = run_cli(source, "--quiet")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "equivalent" in result.stdout
    output = source.with_name(source.stem + ".folded.onnx")
    folded = _load_with_data(output, tmp_path / "judged")
    onnx.checker.check_model(folded, full_check=True)
    assert count_ops(folded, "BatchNormalization") == 1
    assert any(entry.name.endswith(".folded.onnx.data") for entry in folder.iterdir()) == external
    assert_same_function(model, folded, [judge_feeds(model, seed) for seed in range(2)])

    check = run_cli("check", source, output, "--quiet")
    assert check.exit_code == 0, (check.stdout, check.stderr)
    output.unlink()
    for data in folder.glob("*.folded.onnx.data"):  # a data file no model names is not replaced
        data.unlink()
    onnx.save(named_model("second"), folder / os.fsdecode(b"second \xfe.onnx"))  # two models: worker processes
    batch = run_cli(folder, "-j", "2", env={"COLUMNS": "400"})
    assert batch.exit_code == 0, (batch.stdout, batch.stderr)
    assert output.is_file() and (folder / os.fsdecode(b"second \xfe.folded.onnx")).is_file()
    shown = os.fsencode(source).decode("utf-8", "backslashreplace")
    assert shown in batch.stdout


# -- 15. why verification did not run ----------------------------------------------------------


class RankBreakingConvRule(ConvBn):
    """Folds like the Conv rule but writes the weight with an extra axis: the folded model
    fails the checker (a stand-in for any rule bug the checker catches)."""

    name = "conv-bn-rank-breaking"

    def absorb(self, producer: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Absorbed | Refusal:
        absorbed = super().absorb(producer, affine, graph)
        if isinstance(absorbed, Refusal):
            return absorbed
        weight = absorbed.updates[0]
        broken = replace(weight, values=weight.values[..., np.newaxis])
        return replace(absorbed, updates=[broken, *absorbed.updates[1:]])


@pytest.mark.parametrize("no_verify", [False, True])
def test_a_folded_model_failing_the_checker_says_why_it_was_not_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_verify: bool
) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(named_model("plain"), path)
    rules = build_rules(backward=(RankBreakingConvRule(),))
    monkeypatch.setattr("bnfold.api.FoldOptions", partial(FoldOptions, rules=rules))
    flags = ["--no-verify"] if no_verify else []
    shown = run_cli(path, *flags, env={"COLUMNS": "400"})
    assert shown.exit_code == 1, (shown.stdout, shown.stderr)
    assert "Problem: the folded model fails onnx.checker" in shown.stdout
    if no_verify:
        assert "Verification skipped (--no-verify)." in shown.stdout
    else:
        assert "--no-verify" not in shown.stdout
        assert "Verification skipped (the folded model fails onnx.checker" in shown.stdout
    document = json.loads(run_cli(path, *flags, "--json", "-").stdout)
    assert document["status"] == "not-equivalent" and document["verification"] is None
    expected = "--no-verify" if no_verify else document["problem"]
    assert document["verification_skipped"] == expected and document["problem"].startswith("the folded model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_verification_skipped_is_null_when_verification_ran(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(named_model("plain"), path)
    document = json.loads(run_cli(path, "--json", "-").stdout)
    assert document["verification_skipped"] is None and document["verification"]["passed"]


# -- 13. models the checker rejects for a missing optional field --------------------------------


def undeclared_model(layer: str, where: str, missing: str) -> onnx.ModelProto:
    """A foldable model (Conv → BN, or MatMul → BN) whose graph input or output is declared
    without a shape or without any type: onnx.checker rejects it, onnxruntime loads it."""
    b = GraphBuilder(seed=8)
    if layer == "conv":
        x = b.input("x", ["N", 3, 5, 5])
        y = b.batchnorm(b.conv(x, 3, 4), 4)
    else:
        x = b.input("x", ["N", 6])
        y = b.batchnorm(b.node("MatMul", [x, b.random("W", [6, 4])]), 4)
    b.output(y, ["N", 4, 5, 5] if layer == "conv" else ["N", 4])
    declared = b.inputs if where == "input" else b.outputs
    name = declared[0].name
    if missing == "shape":
        declared[0] = helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
    else:
        declared[0] = helper.make_value_info(name, onnx.TypeProto())
    return helper.make_model(helper.make_graph(b.nodes, "undeclared", b.inputs, b.outputs, b.initializers),
                             opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _complaint(model: onnx.ModelProto) -> str | None:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        return str(error)
    return None


UNDECLARED = [(layer, where, missing) for layer in ("conv", "matmul") for where in ("input", "output")
              for missing in ("shape", "type") if (where, missing) != ("input", "type")]


@pytest.mark.parametrize("layer,where,missing", UNDECLARED)
@pytest.mark.parametrize("verify", [True, False])
def test_a_model_the_checker_rejects_but_onnxruntime_loads_is_folded_with_a_warning(
    tmp_path: Path, layer: str, where: str, missing: str, verify: bool
) -> None:
    model = undeclared_model(layer, where, missing)
    complaint = _complaint(model)
    assert complaint is not None
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    shape = ["--input-shape", "x:2,3,5,5" if layer == "conv" else "x:2,6"] if where == "input" else []
    flags = [*shape, *([] if verify else ["--no-verify"])]
    document = json.loads(run_cli(path, *flags, "--json", "-").stdout)
    assert document["status"] == ("equivalent" if verify else "unverified"), document
    (warning,) = document["warnings"]
    assert "fails onnx.checker" in warning and complaint.splitlines()[0] in warning
    output = tmp_path / "model.folded.onnx"
    folded = onnx.load(output)
    # Without the input's rank, a MatMul's channel axis is unknown: that BN is left, with its reason.
    unknown_rank = layer == "matmul" and where == "input"
    assert count_ops(folded, "BatchNormalization") == unknown_rank
    assert [("unknown rank" in left["reason"]) for left in document["left"]] == [True] * unknown_rank
    assert _complaint(folded) == complaint  # the same flaw, nothing new
    sizes = {"x": [2, 3, 5, 5] if layer == "conv" else [2, 6]}
    assert_same_function(model, folded, [judge_feeds(model, seed, shapes=sizes) for seed in range(2)])

    shown = run_cli(path, *flags, env={"COLUMNS": "400"})
    assert shown.exit_code == 0 and "Warning: " in shown.stdout and complaint.splitlines()[0] in shown.stdout
    quiet = run_cli(path, *flags, "--quiet")
    assert quiet.exit_code == 0 and "; warning: " in quiet.stdout
    compared = run_cli("check", path, output, *shape, "--quiet")
    assert compared.exit_code == 0 and compared.stdout.count("; warning: ") == 2, compared.stdout


def unreadable_model(flaw: str) -> onnx.ModelProto:
    """A model neither the checker nor onnxruntime accepts: a node reading a value nothing
    defines, or an op no opset has. (Nodes out of order are not one: onnxruntime sorts them.)"""
    b = GraphBuilder(seed=9)
    x = b.input("x", [1, 3, 5, 5])
    y = b.batchnorm(b.conv(x, 3, 4), 4)
    b.output(b.node("Relu", [y]), [1, 4, 5, 5])
    if flaw == "undefined input":
        b.nodes[-1].input[0] = "ghost"
    else:
        b.nodes[-1].op_type = "Rectify"
    return helper.make_model(helper.make_graph(b.nodes, "unreadable", b.inputs, b.outputs, b.initializers),
                             opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("flaw", ["undefined input", "unknown op"])
@pytest.mark.parametrize("flags", [[], ["--no-verify"]])
def test_a_model_neither_the_checker_nor_onnxruntime_reads_is_refused(
    tmp_path: Path, flaw: str, flags: list[str]
) -> None:
    path = tmp_path / "model.onnx"
    onnx.save(unreadable_model(flaw), path)
    result = run_cli(path, *flags)
    assert_one_line_error(result, 2, f"{path}: fails onnx.checker (", "onnxruntime cannot load")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_broken_fold_is_attributed_under_a_name_that_is_not_utf8(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Error attribution re-verifies partial folds against the original: onnxruntime must
    read it there too."""
    folder = tmp_path / NOT_UTF8_FOLDER
    folder.mkdir()
    source = folder / NOT_UTF8_NAME
    onnx.save(named_model("plain"), source)
    rules = build_rules(backward=(CorruptingConvRule({"conv plain"}),))
    monkeypatch.setattr("bnfold.api.FoldOptions", partial(FoldOptions, rules=rules))
    result = run_cli(source, "--json", "-")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    document = json.loads(result.stdout)
    (guilty,) = document["attribution"]["guilty"]
    assert guilty["batchnorms"] == ["bn plain"] and not document["written"]
    assert sorted(path.name for path in folder.iterdir()) == [NOT_UTF8_NAME]


@pytest.mark.parametrize("option", [["--skip", "nomatch"], ["--only", "nomatch"], ["--tol", "nosuch:1,1"]])
def test_names_holding_control_characters_keep_an_error_on_one_line(tmp_path: Path, option: list[str]) -> None:
    """Model strings may hold newlines, tabs, escape sequences: an error naming them is still
    one line, with those characters written as escapes."""
    b = GraphBuilder(seed=8)
    x = b.input("x", [1, 2, 3, 3])
    y = b.batchnorm(b.conv(x, 2, 2), 2)
    b.nodes[-1].name = "bn\nsecond\tline\x1b[31m"
    b.nodes.append(helper.make_node("Identity", [y], ["out\nput"]))
    b.output("out\nput")
    path = tmp_path / "m.onnx"
    onnx.save(b.model(), str(path))
    result = run_cli(path, *option)
    assert_one_line_error(result, 2)
    assert "\x1b" not in result.stderr and ("bn\\nsecond\\tline\\x1b[31m" in result.stderr or "out\\nput" in result.stderr)
