"""External data laid out every way the spec allows, and weights in every field a tensor has.

The spec makes ``length`` optional (the tensor then takes dims × element size bytes from
``offset``), lets several tensors share one file at any offset, and lets a tensor keep its
values in a typed field (``float_data``, ``int32_data`` for float16, ``double_data``) while
others of the same model are raw or external. Each case is generated (tensor order, offsets,
gaps, which tensors declare a length, which field holds which weight come from a seed) and
judged independently of bnfold: the input files are unchanged, the written model passes
``onnx.checker`` from its path with full checks, onnxruntime loads it and computes what the
original computes, and every tensor keeps its values in exactly one place.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import external_data_helper, numpy_helper

from bnfold.inputs import generate_inputs, input_specs
from bnfold.io.store import TensorStore, all_tensors, has_conflicting_data
from sample_models.modelkit import GraphBuilder
from tests.support import assert_one_line_error, op_count, run_cli

BN = "BatchNormalization"


def layered_model(seed: int, dtype: type) -> onnx.ModelProto:
    """Conv → BN → Relu → Conv → BN → Flatten → Gemm → BN (float64: Gemm stacks only,
    onnxruntime has no float64 Conv on CPU)."""
    b = GraphBuilder(seed=seed, dtype=dtype)
    if np.dtype(dtype) == np.float64:
        x = b.input("x", ["batch", 12])
        y = b.node("Relu", [b.batchnorm(b.gemm(x, 12, 16), 16)])
        b.output(b.batchnorm(b.gemm(y, 16, 6, bias=False), 6))
    else:
        x = b.input("x", ["batch", 3, 5, 5])
        y = b.node("Relu", [b.batchnorm(b.conv(x, 3, 8, bias=seed % 2 == 0), 8)])
        y = b.node("Flatten", [b.batchnorm(b.conv(y, 8, 4, kernel=(1, 1), pads=[0, 0, 0, 0]), 4)])
        b.output(b.batchnorm(b.gemm(y, 4 * 25, 6), 6))
    return b.model()


def _typed_field(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    """Store ``values`` in the typed field the spec gives the tensor's type."""
    tensor.ClearField("raw_data")
    flat = values.ravel()
    if values.dtype == np.float32:
        tensor.float_data.extend(flat.tolist())
    elif values.dtype == np.float16:
        tensor.int32_data.extend(flat.view(np.uint16).astype(np.int32).tolist())
    elif values.dtype == np.float64:
        tensor.double_data.extend(flat.tolist())
    else:
        raise AssertionError(values.dtype)


def write_layout(model: onnx.ModelProto, path: Path, seed: int, *, lengths: str, files: int,
                 typed_share: float = 0.0) -> dict[str, str]:
    """Save ``model`` with its initializers spread over ``files`` data files in a random
    order, at unaligned offsets with random gaps, some kept in the protobuf (raw or in their
    typed field). ``lengths``: "none", "some" or "all" declare a ``length``. Returns where
    each tensor went ("external", "typed" or "raw")."""
    rng = np.random.default_rng(seed)
    handles = {f"part{i}.bin": bytearray(rng.integers(0, 256, int(rng.integers(0, 5)), dtype=np.uint8).tobytes())
               for i in range(files)}
    placement: dict[str, str] = {}
    tensors = list(model.graph.initializer)
    for index in rng.permutation(len(tensors)):
        tensor = tensors[index]
        values = numpy_helper.to_array(tensor)
        roll = rng.random()
        if roll < typed_share:
            _typed_field(tensor, values)
            placement[tensor.name] = "typed"
            continue
        if roll < typed_share + 0.15:
            placement[tensor.name] = "raw"
            continue
        name = f"part{int(rng.integers(0, files))}.bin"
        blob = handles[name]
        offset = len(blob)
        blob += values.tobytes() + bytes(int(rng.integers(0, 7)))
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value=name)
        tensor.external_data.add(key="offset", value=str(offset))
        if lengths == "all" or (lengths == "some" and rng.random() < 0.5):
            tensor.external_data.add(key="length", value=str(values.nbytes))
        placement[tensor.name] = "external"
    for name, blob in handles.items():
        (path.parent / name).write_bytes(bytes(blob))
    onnx.save_model(model, str(path))
    return placement


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def assert_written_model_is_sound(original: Path, output: Path, *, runnable: bool) -> None:
    """Checked without bnfold: full checker from the path, no BN left, one data place per
    tensor, and (when onnxruntime has the kernels) the same outputs as the original."""
    onnx.checker.check_model(str(output), full_check=True)
    written = onnx.load_model(str(output), load_external_data=False)
    assert op_count(written, BN) == 0
    assert not [t.name for t in external_data_helper._get_all_tensors(written) if has_conflicting_data(t)]
    if runnable:
        feeds = generate_inputs(input_specs(written, {}, 3), 1)
        dtype = next(iter(feeds.values())).dtype
        tolerance = {np.float16: 2e-2, np.float32: 1e-4, np.float64: 1e-9}[dtype.type]
        for expected, actual in zip(session(original).run(None, feeds), session(output).run(None, feeds), strict=True):
            np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                                       atol=tolerance, rtol=tolerance)


LAYOUTS = [(seed, lengths, files) for seed, (lengths, files) in
           enumerate([("none", 1), ("none", 2), ("some", 1), ("some", 3), ("all", 2), ("none", 3)])]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("seed,lengths,files", LAYOUTS)
@pytest.mark.parametrize("verify", [True, False])
def test_tensors_sharing_files_at_any_offset_with_or_without_length_fold(
    tmp_path: Path, seed: int, lengths: str, files: int, dtype: type, verify: bool
) -> None:
    source = tmp_path / "m.onnx"
    write_layout(layered_model(seed, dtype), source, seed, lengths=lengths, files=files)
    onnx.checker.check_model(str(source), full_check=True)  # the layout itself is valid
    before = snapshot(tmp_path)
    output = tmp_path / "out" / "folded.onnx"
    output.parent.mkdir()
    result = run_cli(source, "-o", output, "-q", *([] if verify else ["--no-verify"]))
    assert result.exit_code == 0, result.output
    assert ("equivalent" if verify else "unverified") in result.stdout
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("out/")} == before
    assert_written_model_is_sound(source, output, runnable=True)
    assert run_cli("check", source, output, "-q").exit_code == 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("where", ["inside the last tensor", "inside the first tensor", "at a tensor's start"])
def test_a_data_file_cut_short_is_refused_at_load_naming_the_tensor(tmp_path: Path, seed: int, where: str) -> None:
    source = tmp_path / "m.onnx"
    write_layout(layered_model(seed, np.float32), source, seed, lengths=["none", "some", "all"][seed % 3], files=1)
    model = onnx.load_model(str(source), load_external_data=False)
    spans = sorted(
        (int(entries.get("offset", 0)), 4 * math.prod(t.dims), t.name)
        for t in model.graph.initializer
        if (entries := {e.key: e.value for e in t.external_data})
    )
    offset, size, name = {"inside the last tensor": spans[-1], "inside the first tensor": spans[0],
                          "at a tensor's start": spans[len(spans) // 2]}[where]
    cut = offset if where == "at a tensor's start" else offset + 1 + seed % max(1, size - 1)
    data = tmp_path / "part0.bin"
    data.write_bytes(data.read_bytes()[:cut])
    before = snapshot(tmp_path)
    span_of = {tensor: (start, start + length) for start, length, tensor in spans}
    for args in ([source], [source, "--no-verify"], [source, "--dry-run"], ["check", source, source]):
        result = run_cli(*args)
        assert_one_line_error(result, 2, "'part0.bin' is cut short")
        named, start, end, has = re.search(r"tensor '(\w+)' needs bytes (\d+)\.\.(\d+) but the file has (\d+)",
                                           result.stderr).groups()
        # Any tensor the cut reaches may be named (the first in the model's order); the
        # last one by offset is the only one reached when the cut falls inside it.
        assert span_of[named] == (int(start), int(end)) and int(end) > cut == int(has)
        assert named == name or where != "inside the last tensor"
        assert snapshot(tmp_path) == before


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("seed", range(3))
def test_weights_in_typed_fields_next_to_raw_and_external_ones(tmp_path: Path, dtype: type, seed: int) -> None:
    """A model saved with external data keeps typed-field weights in the protobuf; whatever a
    fold rewrites must come out with its values in one place only, in the file written."""
    source = tmp_path / "m.onnx"
    placement = write_layout(layered_model(seed, dtype), source, seed + 10, lengths="some", files=1 + seed % 2,
                             typed_share=0.5)
    assert {"typed", "external"} <= set(placement.values())
    before = snapshot(tmp_path)
    output = tmp_path / "out.onnx"
    result = run_cli(source, "-o", output, "-q")
    assert result.exit_code == 0, result.output
    assert snapshot(tmp_path).items() >= before.items()
    assert_written_model_is_sound(source, output, runnable=True)


@pytest.mark.parametrize("external", [True, False])
def test_the_written_file_passes_the_checker_with_every_value_in_one_place(tmp_path: Path, external: bool) -> None:
    """What lands on disk is what the checker approved: the file read back passes the full
    check, and no tensor keeps a stale typed field beside its new data."""
    source = tmp_path / "m.onnx"
    if external:
        write_layout(layered_model(1, np.float32), source, 1, lengths="none", files=2, typed_share=0.4)
    else:
        onnx.save_model(layered_model(1, np.float32), str(source))
    output = tmp_path / "out.onnx"
    assert run_cli(source, "-o", output, "-q").exit_code == 0
    written = onnx.load_model(str(output), load_external_data=False)
    onnx.checker.check_model(str(output), full_check=True)
    assert not any(has_conflicting_data(tensor) for tensor in all_tensors(written))


@pytest.mark.parametrize("field", ["raw_data", "float_data", "external", "held"])
@pytest.mark.parametrize("size", [3, 600])
def test_replace_leaves_the_new_values_in_one_place(tmp_path: Path, field: str, size: int) -> None:
    """Whatever held a tensor's values before, after ``replace`` only the new values remain."""
    values = np.arange(size, dtype=np.float32)
    (tmp_path / "w.bin").write_bytes(values.tobytes())
    store = TensorStore(tmp_path)
    tensor = numpy_helper.from_array(values, "w")
    if field == "float_data":
        _typed_field(tensor, values)
    elif field == "external":
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value="w.bin")
    elif field == "held":
        store.replace(tensor, values * 3)
    new = np.linspace(-1, 1, size).astype(np.float32)
    store.replace(tensor, new)
    places = ["raw_data"] if tensor.HasField("raw_data") else []
    places += [name for name in ("float_data", "int32_data", "double_data") if len(getattr(tensor, name))]
    places += ["external"] if tensor.data_location == onnx.TensorProto.EXTERNAL else []
    assert len(places) == 1, places
    np.testing.assert_array_equal(store.read(tensor), new)
