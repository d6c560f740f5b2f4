"""Folded weights of a model on disk are computed as they are written (fold_math.ScaledWeight).

A weight that lies in a file (external data, or a large weight the loader left in the model
file) is read as a map of the file; its fold is measured when planned and kept as a recipe,
and its values are computed again, piece by piece, when the output is written. These tests
hold that path to the in-memory one bit for bit: same values, same measurements, same files.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import NoReturn
from unittest import mock

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from bnfold import fold_math
from bnfold.fold import FoldOutcome, fold_batchnorms
from bnfold.io import store as store_module
from bnfold.io.load import load_model
from bnfold.io.store import TensorStore
from bnfold.pipeline import FoldOptions, fold_file
from bnfold.rules import build_rules
from sample_models.modelkit import GraphBuilder
from tests.hostile_support import fold_copy
from tests.support import op_count

BN = "BatchNormalization"
_files = itertools.count()


@st.composite
def mapped_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    """A weight of rank 1-4 (rows that fit in a block, and rows cut further), a factor along
    one axis, and how many bytes precede the weight in its file (unaligned offsets too)."""
    shape = draw(st.lists(st.integers(1, 9), min_size=1, max_size=4))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = (rng.standard_normal(shape) * draw(st.sampled_from([1.0, 1e-3, 1e3]))).astype(dtype)
    weight[rng.random(shape) < draw(st.sampled_from([0.0, 0.3]))] = 0
    axis = draw(st.integers(0, len(shape) - 1))
    factor = fold_math.axis_factor(rng.uniform(-3, 3, shape[axis]), weight.ndim, axis)
    return weight, factor, draw(st.integers(0, 9))


def _mapped(folder: Path, weight: np.ndarray, offset: int) -> np.memmap:
    path = folder / f"weight{next(_files)}.bin"
    path.write_bytes(bytes(offset) + weight.tobytes())
    return np.memmap(path, dtype=weight.dtype, mode="r", offset=offset, shape=weight.shape)


@settings(deadline=None, max_examples=120)
@given(case=mapped_cases(), block=st.sampled_from([1, 3, 8, 1 << 17]), piece_blocks=st.sampled_from([1, 2, 5]))
def test_a_mapped_weight_streams_the_values_and_measures_of_the_in_memory_fold(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[np.ndarray, np.ndarray, int], block: int, piece_blocks: int
) -> None:
    weight, factor, offset = case
    mapped = _mapped(tmp_path_factory.mktemp("weights"), weight, offset)
    with mock.patch.object(fold_math, "_BLOCK", block), \
            mock.patch.object(fold_math, "_PIECE_ELEMENTS", block * piece_blocks):
        recipe, change, rounding = fold_math.scale_with_effect(mapped, factor, "weight")
        expected, expected_change, expected_rounding = fold_math.scale_with_effect(weight.copy(), factor, "weight")
        assert isinstance(recipe, fold_math.ScaledWeight) and isinstance(expected, np.ndarray)
        # finite weights and factors: bounded, so nothing is computed before the values are
        assert rounding is None and recipe.rounding_error is None
        assert (recipe.shape, recipe.dtype, recipe.nbytes) == (expected.shape, expected.dtype, expected.nbytes)
        expected_bytes, position = expected.tobytes(), 0
        previous: tuple[np.ndarray, bytes] | None = None
        for piece in recipe.pieces():
            # a piece is the product's next run of bytes, and stays so until the next is asked for
            if previous is not None:
                assert previous[0].tobytes() == previous[1]
            segment = expected_bytes[position : position + piece.nbytes]
            assert piece.size <= block * piece_blocks and piece.tobytes() == segment
            previous, position = (piece, segment), position + piece.nbytes
        assert position == len(expected_bytes)
        assert recipe.rounding_error == expected_rounding
        recipe.rounding_error = None
        whole = np.asarray(recipe)
    assert whole.tobytes() == expected_bytes and whole.shape == expected.shape
    assert (change, recipe.rounding_error) == (expected_change, expected_rounding)


@pytest.mark.parametrize(
    ("weight", "s"),
    [
        # the bound (65504 * 1.5) says it might overflow; the exact pass finds it does not
        (np.array([[65504.0, 1.0], [0.5, 0.25]], np.float16), np.array([0.5, 1.5])),
        (np.array([[np.nan, 1.0], [0.5, np.inf]], np.float32), np.array([2.0, 3.0])),  # proves nothing
        (np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), np.array([np.inf, 1.0])),
    ],
    ids=["near-the-limit", "not-finite-weights", "infinite-factor"],
)
def test_a_mapped_weight_the_bound_cannot_clear_is_measured_when_planned(
    tmp_path: Path, weight: np.ndarray, s: np.ndarray
) -> None:
    factor = fold_math.axis_factor(s, 2, 0)
    recipe, change, rounding = fold_math.scale_with_effect(_mapped(tmp_path, weight, 1), factor, "weight")
    expected, expected_change, expected_rounding = fold_math.scale_with_effect(weight.copy(), factor, "weight")
    assert isinstance(recipe, fold_math.ScaledWeight)
    assert rounding == recipe.rounding_error == expected_rounding and change == expected_change
    assert np.asarray(recipe).tobytes() == expected.tobytes()


def test_a_mapped_weight_that_would_overflow_is_refused_when_planned(tmp_path: Path) -> None:
    weight = np.array([[1.0, 2.0], [1.0, 0.5], [np.nan, 1.0]], np.float16)
    factor = fold_math.axis_factor(np.array([4e4, 1.0, 1.0]), 2, 0)
    with pytest.raises(fold_math.FoldOverflowError, match=r"overflow float16 \(largest magnitude 8e\+04\)"):
        fold_math.scale_with_effect(_mapped(tmp_path, weight, 3), factor, "weight")


def _wide_model(*, untouched_weight: bool = True) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Weights of 64-590 KiB, above the size from which the store maps them: a Conv folded
    twice (BN → BN after it), a 1×1 Conv folded forward and backward (BN → Conv → BN), a
    Gemm → BN, and a weight no fold touches. Returns the model and those weights' names."""
    b = GraphBuilder(seed=41)
    x = b.input("x", ["batch", 128, 5, 5])
    twice = b.conv(x, 128, 128, bias=False)
    y = b.node("Relu", [b.batchnorm(b.batchnorm(twice, 128), 128)])
    both_ways = b.conv(b.batchnorm(y, 128), 128, 128, kernel=(1, 1), pads=[0, 0, 0, 0])
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [b.batchnorm(both_ways, 128)])])
    once = b.gemm(flat, 128, 160)
    untouched = b.random("untouched", [160, 200]) if untouched_weight else ""
    b.output(b.node("MatMul", [b.batchnorm(once, 160), untouched]) if untouched_weight else b.batchnorm(once, 160))
    model = b.model()
    weight_of = {node.output[0]: node.input[1] for node in model.graph.node if len(node.input) > 1}
    names = {"twice": weight_of[twice], "both ways": weight_of[both_ways], "once": weight_of[once],
             "untouched": untouched}
    return model, names


def _in_memory_fold(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], FoldOutcome]:
    """Every initializer's values after folding with no file behind the model (the arrays
    path), and the fold's records."""
    folded, outcome = fold_copy(model)
    return {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}, outcome


@pytest.mark.parametrize("layout", ["self-contained", "external data"])
def test_folds_of_a_model_on_disk_write_the_in_memory_folds_values(tmp_path: Path, layout: str) -> None:
    model, names = _wide_model()
    expected, in_memory = _in_memory_fold(model)  # before saving with external data rewrites the model's tensors
    source = tmp_path / "net.onnx"
    if layout == "external data":
        onnx.save_model(model, str(source), save_as_external_data=True, location="net.onnx.data", size_threshold=0)
    else:
        onnx.save_model(model, str(source))

    loaded = load_model(source)
    fold_batchnorms(loaded.model, build_rules(), store=loaded.store)
    held = {t.name: loaded.store.held_array(t) for t in loaded.model.graph.initializer}
    # a weight folded once is held as its recipe; one folded again was computed for that fold
    assert isinstance(held[names["once"]], fold_math.ScaledWeight)
    assert isinstance(held[names["twice"]], np.ndarray) and isinstance(held[names["both ways"]], np.ndarray)
    assert held[names["untouched"]] is None

    output = tmp_path / "out.onnx"
    report = fold_file(source, FoldOptions(output=output))
    assert report.written and report.verification.passed
    written = onnx.load_model(str(output))
    assert op_count(written, BN) == 0
    values = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert values.keys() == expected.keys()
    for name, array in expected.items():
        assert values[name].dtype == array.dtype and values[name].tobytes() == array.tobytes(), name
    # the rounding errors measured while writing are the ones the arrays path measured
    assert report.folds == in_memory.folds and all(fold.max_rounding_error is not None for fold in report.folds)


SAMPLES = sorted((Path(__file__).resolve().parent.parent / "sample_models").glob("*.onnx"))


@pytest.mark.parametrize("sample", SAMPLES, ids=[path.stem for path in SAMPLES])
def test_every_samples_folds_stream_the_in_memory_values_when_every_tensor_is_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sample: Path
) -> None:
    """With every tensor in a file mapped (not only those of 64 KiB and more), each rule's folds
    (backward, forward, transposed, decomposed, through other ops) take the streamed path."""
    monkeypatch.setattr(store_module, "MAP_AT_LEAST", 1)
    model = onnx.load_model(str(sample))
    expected, in_memory = _in_memory_fold(model)
    source = tmp_path / "net.onnx"
    onnx.save_model(model, str(source), save_as_external_data=True, location="net.onnx.data", size_threshold=0)
    output = tmp_path / "out.onnx"
    report = fold_file(source, FoldOptions(output=output))
    assert report.folds == in_memory.folds and report.left == in_memory.left
    assert report.written and report.verification is not None and report.verification.passed
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load_model(str(output)).graph.initializer}
    assert written.keys() == expected.keys()
    for name, array in expected.items():
        assert written[name].dtype == array.dtype and written[name].tobytes() == array.tobytes(), name


def test_a_large_tensor_in_a_file_is_read_as_a_read_only_map_and_a_small_one_into_memory(tmp_path: Path) -> None:
    source = tmp_path / "net.onnx"
    model, names = _wide_model()
    onnx.save_model(model, str(source), save_as_external_data=True, location="d.bin", size_threshold=0)
    loaded = load_model(source)
    by_name = {t.name: t for t in loaded.model.graph.initializer}
    large = loaded.store.read(by_name[names["untouched"]])
    assert isinstance(large, np.memmap) and not large.flags.writeable
    small = [t for t in by_name.values() if store_module.data_bytes(t) < store_module.MAP_AT_LEAST]
    assert small and not any(isinstance(loaded.store.read(t), np.memmap) for t in small)


def test_a_data_file_cut_short_after_loading_is_an_error_when_read(tmp_path: Path) -> None:
    source = tmp_path / "net.onnx"
    model, names = _wide_model()
    onnx.save_model(model, str(source), save_as_external_data=True, location="d.bin", size_threshold=0)
    loaded = load_model(source)
    (tmp_path / "d.bin").write_bytes(b"")
    tensor = next(t for t in loaded.model.graph.initializer if t.name == names["untouched"])
    with pytest.raises(OSError, match=f"'{names['untouched']}'"):
        loaded.store.read(tensor)


_CUT_SHORT_WHILE_HELD = """
import sys
from pathlib import Path
from bnfold.errors import InputError
from bnfold.fold import fold_batchnorms
from bnfold.io.load import load_model
from bnfold.io.save import stage
from bnfold.rules import build_rules

folder, cut = Path(sys.argv[1]), Path(sys.argv[2])
loaded = load_model(folder / "net.onnx")
fold_batchnorms(loaded.model, build_rules(), store=loaded.store)
cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
try:
    stage(loaded.model, folder / "out.onnx", loaded.store, external_data=bool(loaded.external_data_files))
except InputError as error:
    print(error)
"""


@pytest.mark.parametrize("layout", ["external data", "self-contained"])
def test_a_file_cut_short_before_its_folds_are_written_is_an_error_not_a_crash(tmp_path: Path, layout: str) -> None:
    """Computing a held product from a map of a file cut short would end the process with
    SIGBUS; writing checks the files first: the data file, or the model file whose large
    weights were left in it (in a child: a regression must not kill the test run). Every large
    weight is folded: none is copied from the file, which would check it on the way."""
    model, _ = _wide_model(untouched_weight=False)
    if layout == "external data":
        onnx.save_model(model, str(tmp_path / "net.onnx"), save_as_external_data=True, location="d.bin",
                        size_threshold=0)
    else:
        onnx.save_model(model, str(tmp_path / "net.onnx"))
    files = sorted(path.name for path in tmp_path.iterdir())
    cut = tmp_path / ("d.bin" if layout == "external data" else "net.onnx")
    child = subprocess.run([sys.executable, "-c", _CUT_SHORT_WHILE_HELD, str(tmp_path), str(cut)],
                           capture_output=True, text=True, timeout=120, check=False)
    assert child.returncode == 0, child.stderr
    assert "changed on disk" in child.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == files


def test_a_recipe_read_by_a_later_fold_is_computed_once_and_then_held_as_values(tmp_path: Path) -> None:
    weight = np.arange(40_000, dtype=np.float32).reshape(100, 400)
    factor = fold_math.axis_factor(np.linspace(0.5, 2.0, 100), 2, 0)
    recipe, _, _ = fold_math.scale_with_effect(_mapped(tmp_path, weight, 0), factor, "weight")
    assert isinstance(recipe, fold_math.ScaledWeight)
    store = TensorStore()
    tensor = numpy_helper.from_array(weight, "w")
    store.replace(tensor, recipe)
    first = store.read(tensor)
    held = store.held_array(tensor)
    assert isinstance(held, np.ndarray) and recipe.rounding_error is not None
    np.testing.assert_array_equal(store.read(tensor), first)
    assert store.take(tensor) is held


def test_a_file_that_cannot_be_mapped_is_read_and_folded_all_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some file systems refuse to map files (mmap fails with ENODEV): weights are then read."""
    class Unmappable(np.memmap):
        def __new__(cls, *_args: object, **_kwargs: object) -> NoReturn:
            raise OSError(19, "No such device")

    monkeypatch.setattr(np, "memmap", Unmappable)
    model, _ = _wide_model()
    expected, in_memory = _in_memory_fold(model)
    source = tmp_path / "net.onnx"
    onnx.save_model(model, str(source), save_as_external_data=True, location="net.onnx.data", size_threshold=0)
    report = fold_file(source, FoldOptions(output=tmp_path / "out.onnx"))
    assert report.written and report.folds == in_memory.folds and not report.left
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load_model(str(tmp_path / "out.onnx")).graph.initializer}
    assert all(written[name].tobytes() == array.tobytes() for name, array in expected.items())

