"""Unusable inputs and outputs: one line on stderr, exit 2, no traceback, nothing written."""

from __future__ import annotations

import errno
import json
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import external_data_helper, helper

from sample_models.modelkit import GraphBuilder
from tests.support import assert_one_line_error, run_cli

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"




def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_clean_failure(result, message: str, folder: Path, expected_files: set[str]) -> None:  # noqa: ANN001
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr == f"bnfold: error: {message}\n"
    assert "Traceback" not in result.output
    assert {p.name for p in folder.iterdir()} == expected_files


def write_bytes(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


def truncated_model_bytes() -> bytes:
    data = (SAMPLES / "cnn_residual.onnx").read_bytes()
    return data[: len(data) // 2]


def checker_failing_model_bytes() -> bytes:
    """A Relu whose input no node produces and no graph input declares."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["ghost"], ["y"])], "g", [],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.onnx", b"", "{path}: file is empty"),
        ("text.onnx", b"this is not a model\n", "{path}: not an ONNX model"),
        ("truncated.onnx", truncated_model_bytes(), "{path}: not an ONNX model"),
        ("random.onnx", bytes(range(256)) * 8, "{path}: not an ONNX model"),
        ("no_graph.onnx", onnx.ModelProto(producer_name="empty").SerializeToString(), "{path}: not an ONNX model (no graph or IR version)"),
        ("invalid.onnx", checker_failing_model_bytes(), "{path}: fails onnx.checker"),
    ],
)
def test_unusable_model_files(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = write_bytes(tmp_path, name, content)
    before = digest(path)
    result = run_cli(path)
    assert_one_line_error(result, 2, f"bnfold: error: {message.format(path=path)}")
    assert digest(path) == before
    assert {p.name for p in tmp_path.iterdir()} == {name}


def test_missing_file(tmp_path: Path) -> None:
    assert_clean_failure(run_cli(tmp_path / "nope.onnx"), f"{tmp_path / 'nope.onnx'}: no such file", tmp_path, set())


def test_directory_instead_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "models.onnx"
    folder.mkdir()
    assert_clean_failure(run_cli(folder), f"{folder}: is a directory, not an ONNX file", tmp_path, {"models.onnx"})


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return Path(shutil.copy(SAMPLES / "conv_no_bias.onnx", tmp_path / "m.onnx"))


def test_output_equal_to_input_needs_in_place(model: Path) -> None:
    before = digest(model)
    assert_clean_failure(
        run_cli(model, "-o", model),
        f"{model}: output path is the input file; pass --in-place to overwrite it", model.parent, {"m.onnx"},
    )
    assert digest(model) == before


def test_in_place_overwrites_the_input(model: Path) -> None:
    result = run_cli(model, "-o", model, "--in-place", "--quiet")
    assert result.exit_code == 0, result.output
    assert sum(n.op_type == "BatchNormalization" for n in onnx.load(str(model)).graph.node) == 0
    assert {p.name for p in model.parent.iterdir()} == {"m.onnx"}


def test_missing_output_folder(model: Path) -> None:
    target = model.parent / "missing" / "out.onnx"
    assert_clean_failure(run_cli(model, "-o", target), f"{target}: output folder does not exist", model.parent, {"m.onnx"})


def test_output_path_that_is_a_directory(model: Path) -> None:
    (model.parent / "out").mkdir()
    target = model.parent / "out"
    assert_clean_failure(run_cli(model, "-o", target), f"{target}: output path is a directory", model.parent, {"m.onnx", "out"})


def test_symlinked_output_is_refused(model: Path) -> None:
    link = model.parent / "link.onnx"
    link.symlink_to(model)
    before = digest(model)
    assert_clean_failure(
        run_cli(model, "-o", link),
        f"{link}: output path is a symbolic link; refusing to write through it", model.parent, {"m.onnx", "link.onnx"},
    )
    assert digest(model) == before


def test_unwritable_json_report_path(model: Path) -> None:
    target = model.parent / "no" / "report.json"
    result = run_cli(model, "--json", target, "--quiet")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"bnfold: error: {target}: cannot write JSON report")


def test_a_report_that_cannot_be_written_whole_leaves_the_old_one(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while writing the report: the previous report stays as it was, no
    half-written or scratch file is left, nothing is written, and the error is one line."""
    report = model.parent / "report.json"
    report.write_text("previous report")
    real_write_text = Path.write_text

    def disk_full_for_scratch_files(self: Path, text: str, *args: object, **kwargs: object) -> int:
        if self.name.startswith(".bnfold-"):
            real_write_text(self, text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, text, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "write_text", disk_full_for_scratch_files)
    before = sorted(path.name for path in model.parent.iterdir())
    assert_one_line_error(run_cli(model, "--json", report, "-q"), 2, "cannot write JSON report", "No space left")
    assert report.read_text() == "previous report"
    assert sorted(path.name for path in model.parent.iterdir()) == before


def test_output_folder_that_refuses_files(model: Path) -> None:
    """/proc accepts no new files, even from root (for whom permission bits do not count)."""
    target = Path("/proc/bnfold-out.onnx")
    assert_one_line_error(run_cli(model, "-o", target), 2, f"bnfold: error: {target}: cannot write in /proc (")


def test_graph_with_a_cycle_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"])],
        "cycle", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1])],
    )
    path = write_bytes(tmp_path, "cycle.onnx", helper.make_model(graph).SerializeToString())
    result = run_cli(path)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"bnfold: error: {path}: fails onnx.checker (")
    assert "topologically sorted" in result.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"cycle.onnx"}


def test_initializer_with_the_wrong_number_of_bytes_is_refused(tmp_path: Path) -> None:
    model = onnx.load(str(SAMPLES / "cnn_residual.onnx"))
    weight = next(t for t in model.graph.initializer if len(t.raw_data) > 2048)
    weight.raw_data = weight.raw_data[:-4]
    path = write_bytes(tmp_path, "short.onnx", model.SerializeToString())
    result = run_cli(path)
    assert result.exit_code == 2
    assert result.stderr == (
        f"bnfold: error: {path}: initializer '{weight.name}' holds {len(weight.raw_data)} bytes "
        f"but its shape {list(weight.dims)} needs {len(weight.raw_data) + 4}\n"
    )


def test_a_symlink_loop_named_as_a_model_is_a_bad_model_not_a_crash(model: Path) -> None:
    loop = model.with_name("loop.onnx")
    loop.symlink_to(loop.name)
    assert_one_line_error(run_cli(loop), 2, "loop.onnx: no such file", "symbolic link")
    batch = run_cli(model, loop, "-q")  # the good model is still folded
    assert batch.exit_code == 2 and "Traceback" not in batch.output
    assert model.with_name("m.folded.onnx").exists()


@pytest.mark.parametrize("location", ["loopdata", "a\0b", "x" * 300])
def test_an_unusable_external_data_location_is_a_bad_model(tmp_path: Path, location: str) -> None:
    """A location that is a symlink loop, holds a NUL byte or is too long for the system."""
    b = GraphBuilder(seed=3)
    x = b.input("x", [1, 2, 3, 3])
    b.output(b.batchnorm(b.conv(x, 2, 2), 2))
    built = b.model()
    weight = built.graph.initializer[0]
    external_data_helper.set_external_data(weight, location=location, offset=0, length=len(weight.raw_data))
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    (tmp_path / "loopdata").symlink_to("loopdata")
    path = tmp_path / "m.onnx"
    onnx.save(built, str(path))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(run_cli(path, "--no-verify"), 2, "external data location", "is unusable")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_report_to_a_device_is_written_into_it(model: Path) -> None:
    """``--json /dev/stdout`` (a CI habit) writes through the device; nothing replaces it."""
    result = subprocess.run([sys.executable, "-m", "bnfold", str(model), "--json", "/dev/stdout", "-q"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert '"schema": "bnfold.fold/1"' in result.stdout and Path("/dev/stdout").exists()


def test_a_report_rewritten_keeps_its_permissions(model: Path) -> None:
    report = model.parent / "report.json"
    report.write_text("{}")
    report.chmod(0o600)
    assert run_cli(model, "--json", report, "-q").exit_code == 0
    assert (report.stat().st_mode & 0o777) == 0o600 and json.loads(report.read_text())["status"] == "equivalent"
