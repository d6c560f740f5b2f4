"""Models on disk (bnfold.io): loading and validating, the tensor store, staged writes,
and models whose weights live outside the .onnx file.

The > 2 GiB path is exercised cheaply by lowering ``PROTOBUF_LIMIT``: the
code that decides "too big for one protobuf" is the same, only the threshold moves.
"""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, numpy_helper

from bnfold.errors import InputError, InterruptedAfterMove
from bnfold.fold import FoldOutcome, fold_batchnorms
from bnfold.io.load import load_model
from bnfold.io.save import move_into_place, stage
from bnfold.io.store import TensorStore
from bnfold.options import VerifyOptions
from bnfold.pipeline import FoldOptions, check_files, fold_file
from bnfold.rules import build_rules
from sample_models.modelkit import GraphBuilder
from tests.support import op_count, run_cli

BN = "BatchNormalization"
SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def _model() -> onnx.ModelProto:
    b = GraphBuilder(seed=30)
    x = b.input("x", ["batch", 8, 10, 10])
    y = b.node("Relu", [b.batchnorm(b.conv(x, 8, 16, bias=False), 16)])
    b.output(b.batchnorm(b.conv(y, 16, 16), 16))
    return b.model()


def _save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _external_locations(path: Path) -> set[str]:
    model = onnx.load_model(str(path), load_external_data=False)
    return {
        external_data_helper.ExternalDataInfo(tensor).location
        for tensor in external_data_helper._get_all_tensors(model)
        if external_data_helper.uses_external_data(tensor)
    }


def test_external_data_model_folds_verifies_and_writes_its_own_data_file(tmp_path: Path) -> None:
    source = tmp_path / "net.onnx"
    _save_external(_model(), source, "weights.bin")
    input_digest = _digest(tmp_path / "weights.bin")
    output = tmp_path / "out.onnx"
    report = fold_file(source, FoldOptions(output=output))
    assert report.written and report.status == "equivalent" and report.verification.passed
    assert report.before.batchnorms == 2 and report.after.batchnorms == 0
    assert _external_locations(output) == {"out.onnx.data"}
    assert (tmp_path / "out.onnx.data").is_file()
    assert _digest(tmp_path / "weights.bin") == input_digest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bnfold-")]  # staging removed
    reloaded = load_model(output)
    assert op_count(reloaded.model, BN) == 0 and reloaded.external_data_files == ("out.onnx.data",)
    assert check_files(source, output, VerifyOptions()).verification.passed


def test_output_whose_data_file_is_the_inputs_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "net.onnx"
    _save_external(_model(), source, "out.onnx.data")
    with pytest.raises(InputError, match="its data file 'out.onnx.data' is the input's external data"):
        fold_file(source, FoldOptions(output=tmp_path / "out.onnx"))


def test_above_protobuf_limit_the_output_goes_to_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "net.onnx"
    onnx.save_model(_model(), str(source))  # self-contained input
    monkeypatch.setattr("bnfold.io.save.PROTOBUF_LIMIT", 2000)
    output = tmp_path / "big.folded.onnx"
    report = fold_file(source, FoldOptions(output=output))
    assert report.problem is None and report.written and report.verification.passed
    assert report.after.batchnorms == 0
    assert _external_locations(output) == {"big.folded.onnx.data"}
    assert op_count(load_model(output).model, BN) == 0


def test_folded_model_failing_the_checker_above_the_limit_is_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the limit the checker still runs (on a weight-less skeleton): a broken fold is caught."""
    source = tmp_path / "net.onnx"
    onnx.save_model(_model(), str(source))
    monkeypatch.setattr("bnfold.io.save.PROTOBUF_LIMIT", 2000)

    def fold_that_breaks(model: onnx.ModelProto, *_rules: object, **_options: object) -> FoldOutcome:
        model.graph.node[0].input[1] = "missing_weight"
        return FoldOutcome()

    monkeypatch.setattr("bnfold.pipeline.fold_batchnorms", fold_that_breaks)
    output = tmp_path / "out.onnx"
    report = fold_file(source, FoldOptions(output=output))
    assert report.problem.startswith("the folded model fails onnx.checker (") and not report.written
    assert not output.exists() and not (tmp_path / "out.onnx.data").exists()


def _with_location(tmp_path: Path, location: str) -> Path:
    """A model whose first tensor claims to live at ``location``."""
    model = _model()
    tensor = model.graph.initializer[0]
    external_data_helper.set_external_data(tensor, location=location, offset=0, length=16)
    tensor.ClearField("raw_data")
    path = tmp_path / "model" / "net.onnx"
    path.parent.mkdir()
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../../etc/passwd", "../secret.bin", "/etc/passwd"])
def test_external_data_outside_the_models_folder_is_refused(tmp_path: Path, location: str) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    path = _with_location(tmp_path, location)
    with pytest.raises(InputError, match=f"external data location '{location}' points outside the model's folder"):
        load_model(path)


def test_external_data_symlink_leaving_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64)
    path = _with_location(tmp_path, "link.bin")
    os.symlink(tmp_path / "secret.bin", path.parent / "link.bin")
    with pytest.raises(InputError, match="'link.bin' points outside the model's folder"):
        load_model(path)


def test_missing_external_data_file_is_refused(tmp_path: Path) -> None:
    path = _with_location(tmp_path, "gone.bin")
    with pytest.raises(InputError, match="external data file 'gone.bin' is missing"):
        load_model(path)


def test_weights_on_disk_are_read_lazily_and_copied_across_unchanged(tmp_path: Path) -> None:
    """Only folded tensors are read into memory; the others are copied file to file,
    at 4 KiB-aligned offsets, with their values intact."""
    b = GraphBuilder(seed=31)
    x = b.input("x", [2, 8, 6, 6])
    y = b.batchnorm(b.conv(x, 8, 16), 16)
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [y])])
    untouched = b.random("Wm", [16, 300])  # no BN next to it: never read for folding
    b.output(b.node("MatMul", [flat, untouched]))
    source = tmp_path / "net.onnx"
    _save_external(b.model(), source, "net.onnx.data")

    loaded = load_model(source)
    assert all(external_data_helper.uses_external_data(t) for t in loaded.model.graph.initializer)

    output = tmp_path / "out.onnx"
    report = fold_file(source, FoldOptions(output=output))
    assert report.written and report.verification.passed and report.after.batchnorms == 0
    folded = onnx.load_model(str(output), load_external_data=False)
    infos = {
        t.name: external_data_helper.ExternalDataInfo(t)
        for t in folded.graph.initializer if external_data_helper.uses_external_data(t)
    }
    assert {info.location for info in infos.values()} == {"out.onnx.data"}
    assert all(info.offset % 4096 == 0 for info in infos.values())
    original_values = onnx.numpy_helper.to_array(
        next(t for t in onnx.load(str(source)).graph.initializer if t.name == untouched))
    copied_values = onnx.numpy_helper.to_array(
        next(t for t in onnx.load(str(output)).graph.initializer if t.name == untouched))
    assert (original_values == copied_values).all()


def _untouched_weight_model() -> tuple[onnx.ModelProto, str]:
    """Conv → BN, then a MatMul whose large weight no fold touches."""
    b = GraphBuilder(seed=32)
    x = b.input("x", [2, 8, 6, 6])
    y = b.batchnorm(b.conv(x, 8, 16), 16)
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [y])])
    untouched = b.random("Wm", [16, 300])
    b.output(b.node("MatMul", [flat, untouched]))
    return b.model(), untouched


def test_a_self_contained_models_large_weights_stay_in_its_file_until_written(tmp_path: Path) -> None:
    """Loading parses the structure only: large raw weights are read where they lie when a
    fold needs them, and copied from the input into the output otherwise, values intact."""
    model, untouched = _untouched_weight_model()
    source = tmp_path / "net.onnx"
    onnx.save_model(model, str(source))
    loaded = load_model(source)
    left_in_file = {t.name for t in loaded.model.graph.initializer if external_data_helper.uses_external_data(t)}
    assert untouched in left_in_file and all(
        t.HasField("raw_data") and len(t.raw_data) < 1024 for t in loaded.model.graph.initializer
        if t.name not in left_in_file)
    assert loaded.external_data_files == ()

    output = tmp_path / "out.onnx"
    report = fold_file(source, FoldOptions(output=output))
    assert report.written and report.verification.passed and report.after.batchnorms == 0
    written = onnx.load_model(str(output))
    assert not any(external_data_helper.uses_external_data(t) for t in written.graph.initializer)
    by_name = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(by_name[untouched], original[untouched])


def test_an_input_rewritten_while_it_is_folded_is_an_error_not_a_mix_of_two_files(tmp_path: Path) -> None:
    """The output copies weights from the input file: if another program replaced that file
    after it was loaded, writing stops with an error instead of copying the new file's bytes."""
    model, _ = _untouched_weight_model()
    source = tmp_path / "net.onnx"
    onnx.save_model(model, str(source))
    loaded = load_model(source)
    fold_batchnorms(loaded.model, build_rules(), store=loaded.store)
    replacement = tmp_path / "other.onnx"
    onnx.save_model(_model(), str(replacement))
    os.replace(replacement, source)
    with pytest.raises(InputError, match="changed on disk"):
        stage(loaded.model, tmp_path / "out.onnx", loaded.store, external_data=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["net.onnx"]


def test_a_data_file_rewritten_after_its_weights_were_read_is_an_error_not_a_mix(tmp_path: Path) -> None:
    """Folded weights came from the data file as it was; the others would be copied from it as
    it is now. Writing refuses when a data file it read changed in between (same size here)."""
    source = tmp_path / "net.onnx"
    _save_external(_model(), source, "net.onnx.data")
    loaded = load_model(source)
    fold_batchnorms(loaded.model, build_rules(), store=loaded.store)
    data = tmp_path / "net.onnx.data"
    content = data.read_bytes()
    data.write_bytes(content[::-1])
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))  # a later change, even on coarse clocks
    with pytest.raises(InputError, match="changed on disk"):
        stage(loaded.model, tmp_path / "out.onnx", loaded.store, external_data=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["net.onnx", "net.onnx.data"]


def test_a_large_weight_with_values_in_two_places_is_still_seen_by_the_checker(tmp_path: Path) -> None:
    """Leaving weights in the file must not hide a tensor the checker complains about: it is
    parsed whole, and the warning names it, as for a small one."""
    model, untouched = _untouched_weight_model()
    tensor = next(t for t in model.graph.initializer if t.name == untouched)
    tensor.float_data.extend([1.0])  # raw_data and a typed field at once
    source = tmp_path / "net.onnx"
    source.write_bytes(model.SerializeToString())
    loaded = load_model(source)
    assert not external_data_helper.uses_external_data(
        next(t for t in loaded.model.graph.initializer if t.name == untouched))
    assert loaded.checker_complaint is not None and untouched in loaded.checker_complaint
    before = _digest(source)
    result = run_cli(source)
    assert result.exit_code == 0 and f"tensor name: {untouched}" in result.stdout
    assert _digest(source) == before


def _chained_model() -> onnx.ModelProto:
    """BN → BN after a Conv: the second fold reads the weight the first one rewrote."""
    b = GraphBuilder(seed=31)
    x = b.input("x", [1, 8, 6, 6])
    b.output(b.batchnorm(b.batchnorm(b.conv(x, 8, 16, bias=False), 16), 16))
    return b.model()


@pytest.mark.parametrize(
    "model",
    [pytest.param(_chained_model, id="chained"),
     *(pytest.param(path, id=path.stem) for path in sorted(SAMPLES.glob("*.onnx")))],
)
def test_folds_with_external_data_write_what_a_self_contained_fold_writes(tmp_path: Path, model) -> None:
    """Folded weights kept out of the protobuf until the external-data save land in the
    file exactly as the self-contained fold puts them into the model."""
    loaded = model() if callable(model) else onnx.load_model(str(model))
    for folder in "ab":
        (tmp_path / folder).mkdir()
    onnx.save_model(loaded, str(tmp_path / "a" / "net.onnx"))
    _save_external(loaded, tmp_path / "b" / "net.onnx", "weights.bin")
    inline = fold_file(tmp_path / "a" / "net.onnx", FoldOptions(output=tmp_path / "a" / "out.onnx"))
    external = fold_file(tmp_path / "b" / "net.onnx", FoldOptions(output=tmp_path / "b" / "out.onnx"))
    assert external.status == inline.status and external.folds == inline.folds
    if not inline.written:
        return
    expected = onnx.load_model(str(tmp_path / "a" / "out.onnx"))
    written = onnx.load_model(str(tmp_path / "b" / "out.onnx"))
    assert [t.name for t in written.graph.initializer] == [t.name for t in expected.graph.initializer]
    for got, want in zip(written.graph.initializer, expected.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(got), numpy_helper.to_array(want))


def test_a_weight_folded_twice_is_held_once_and_small_tensors_stay_in_the_protobuf() -> None:
    store = TensorStore()
    weight = numpy_helper.from_array(np.zeros((32, 32), np.float32), "w")
    store.replace(weight, np.ones((32, 32), np.float32))
    store.replace(weight, np.full((32, 32), 2, np.float32))
    assert not weight.HasField("raw_data")
    np.testing.assert_array_equal(store.read(weight), np.full((32, 32), 2, np.float32))
    np.testing.assert_array_equal(store.take(weight), np.full((32, 32), 2, np.float32))
    assert store.take(weight) is None  # the first array was dropped, the second handed over once
    small = numpy_helper.from_array(np.zeros(4, np.float32), "b")
    store.replace(small, np.ones(4, np.float32))
    assert store.held_array(small) is None and small.HasField("raw_data")
    np.testing.assert_array_equal(numpy_helper.to_array(small), np.ones(4, np.float32))


def test_staging_left_by_a_process_killed_hard_is_removed_by_the_next_run(tmp_path: Path) -> None:
    """A run killed inside onnxruntime leaves its staging folder; the next run writing beside it
    removes it, and nothing else (a live process's folder, a folder merely named alike)."""
    import subprocess
    import sys
    import uuid

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = tmp_path / f".bnfold-{dead.pid}-{uuid.uuid4().hex}"
    alive = tmp_path / f".bnfold-{os.getpid()}-{uuid.uuid4().hex}"
    lookalike = tmp_path / ".bnfold-keep-me"
    for folder in (abandoned, alive, lookalike):
        folder.mkdir()
        (folder / "net.onnx").write_bytes(b"partial")
    source = tmp_path / "net.onnx"
    onnx.save_model(_model(), str(source))
    report = fold_file(source, FoldOptions(output=tmp_path / "out.onnx"))
    assert report.written
    assert not abandoned.exists() and alive.is_dir() and lookalike.is_dir()


# -- moving a written model and its data file into place ------------------------------------------


@pytest.fixture
def written_pair(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A staging folder holding a new model and data file, and the old pair at their places."""
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "m.onnx").write_bytes(b"new model")
    (staging / "m.onnx.data").write_bytes(b"new data")
    (tmp_path / "m.onnx.data").write_bytes(b"old data")
    return staging, tmp_path / "m.onnx", tmp_path / "m.onnx.data"


def test_model_and_data_file_move_into_place_together(written_pair: tuple[Path, Path, Path]) -> None:
    staging, target, data = written_pair
    target.write_bytes(b"old model")
    move_into_place(staging / "m.onnx", target, (staging / "m.onnx.data", data))
    assert (target.read_bytes(), data.read_bytes()) == (b"new model", b"new data")
    assert list(staging.iterdir()) == [] and sorted(p.name for p in staging.parent.iterdir()) == [
        ".staging", "m.onnx", "m.onnx.data"]  # the old data file set aside is gone too


def test_a_refused_model_move_puts_the_old_data_file_back(written_pair: tuple[Path, Path, Path]) -> None:
    """With --in-place the data file at its place is the input's own: a half-done move would
    leave the input model pointing at the folded model's data."""
    staging, target, data = written_pair
    target.mkdir()
    (target / "keep").write_bytes(b"")  # a non-empty folder: no file can replace it
    with pytest.raises(OSError):
        move_into_place(staging / "m.onnx", target, (staging / "m.onnx.data", data))
    assert data.read_bytes() == b"old data"
    assert sorted(path.name for path in staging.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_ctrl_c_during_the_moves_is_held_until_they_are_done(written_pair: tuple[Path, Path, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    staging, target, data = written_pair
    real_replace = os.replace

    def replace_then_interrupt(source: Path, destination: Path) -> None:
        real_replace(source, destination)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(InterruptedAfterMove):  # done, then the interrupt: nothing after it runs
        move_into_place(staging / "m.onnx", target, (staging / "m.onnx.data", data))
    assert (target.read_bytes(), data.read_bytes()) == (b"new model", b"new data")
    target.unlink()
    target.mkdir()
    (target / "keep").write_bytes(b"")
    (staging / "m.onnx").write_bytes(b"newer model")
    (staging / "m.onnx.data").write_bytes(b"newer data")
    with pytest.raises(KeyboardInterrupt):  # undone, then the interrupt
        move_into_place(staging / "m.onnx", target, (staging / "m.onnx.data", data))
    assert data.read_bytes() == b"new data"


def test_a_data_file_named_like_the_loaders_marker_is_an_ordinary_data_file(tmp_path: Path) -> None:
    """Weights the loader leaves in a model file are marked with a location no file can have;
    a real data file named after it (without the NUL byte) is read like any other, and a
    model that declares the marker itself is refused."""
    b = GraphBuilder(seed=4)
    x = b.input("x", [1, 16, 4, 4])
    b.output(b.batchnorm(b.conv(x, 16, 16, (3, 3), pads=[1] * 4), 16))
    model = b.model()
    onnx.save_model(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="bnfold-mapped",
                    size_threshold=0)
    result = run_cli(tmp_path / "m.onnx", "-q")
    assert result.exit_code == 0 and "equivalent" in result.stdout, result.output
    declared = onnx.load_model(str(tmp_path / "m.onnx"), load_external_data=False)
    for tensor in declared.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "\x00bnfold-mapped"
    onnx.save_model(declared, str(tmp_path / "n.onnx"))
    refused = run_cli(tmp_path / "n.onnx", "--no-verify")
    assert refused.exit_code == 2 and "names no file" in refused.stderr
    assert not (tmp_path / "n.folded.onnx").exists()
