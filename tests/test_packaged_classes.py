"""Classes of models that real packages ship, one generator each, folded and checked in onnxruntime.

Each generator builds random models of one class from a seed (the pattern as an exporter
writes it, with random sizes, opsets and neighbours); the tests fold them and require every
output to match in onnxruntime, exact counts of what is left, and the kind of reason for
anything refused. The real models of each class are in tests/test_packaged_models.py.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper

import bnfold
from bnfold.graph import GraphIndex
from bnfold.rules import build_rules
from sample_models.modelkit import GraphBuilder
from tests.support import assert_one_line_error, fold_and_compare, op_count, run_cli

BN = "BatchNormalization"
EXAMPLES = 15
seeds = st.integers(min_value=0, max_value=2**32 - 1)


@dataclass
class Generated:
    """A generated model, and the input sizes to verify it with when it has symbolic dims."""

    model: onnx.ModelProto
    shapes: dict[str, tuple[int, ...]] | None = None


# -- initializers that are also graph inputs (IR 4+; PyTorch 1.x lists every weight) -----------


def overridable_weights(seed: int) -> Generated:
    """Conv / ConvTranspose → BN blocks, every initializer also listed as a graph input (as
    PyTorch 1.2 exports), sometimes a weight shared by two layers and a constant no fold reads."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(seed=seed)
    channels = int(rng.integers(2, 6))
    x = b.input("x", [1, channels, 6, 6])
    shared = b.random("W", [channels, channels, 1, 1]) if rng.random() < 0.5 else None
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.5:
            weight = shared or b.random("W", [channels, channels, 3, 3], scale=0.3)
            x = b.node("Conv", [x, weight], pads=[0] * 4 if shared else [1] * 4)
        else:
            x = b.conv_transpose(x, channels, channels, (2, 2), strides=[1, 1], pads=[0, 0, 1, 1],
                                 bias=bool(rng.random() < 0.5))
        x = b.node("Relu", [b.batchnorm(x, channels)])
    if rng.random() < 0.5:
        x = b.node("Add", [x, b.random("offset", [1, channels, 1, 1])])
    b.output(x)
    model = b.model(opset=int(rng.choice([9, 11, 13])), ir_version=int(rng.integers(4, 9)))
    declared = {value.name for value in model.graph.input}
    model.graph.input.extend(
        helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
        for tensor in model.graph.initializer if tensor.name not in declared
    )
    onnx.checker.check_model(model, full_check=True)
    return Generated(model)


def initializer_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}


@settings(max_examples=EXAMPLES)
@given(seed=seeds)
def test_overridable_initializers_fold_and_only_the_replaced_ones_leave_the_inputs(seed: int) -> None:
    generated = overridable_weights(seed)
    check = fold_and_compare(generated.model)
    assert op_count(check.folded, BN) == 0 and not check.outcome.left
    before, after = initializer_values(check.original), initializer_values(check.folded)
    inputs_before = [value.name for value in check.original.graph.input]
    inputs_after = {value.name for value in check.folded.graph.input}
    removed = [name for name in inputs_before if name not in inputs_after]
    assert check.outcome.overridable_inputs_removed == removed
    assert removed and all(name in before for name in removed)
    # Every initializer still listed as an input holds its original value: feeding it still
    # means what it meant. Each one removed was replaced or dropped.
    for name in inputs_after & set(after):
        np.testing.assert_array_equal(after[name], before[name])
    for name in removed:
        assert name not in after or after[name].shape != before[name].shape or not np.array_equal(
            after[name], before[name])


@settings(max_examples=5)
@given(seed=seeds)
def test_keep_overridable_refuses_every_fold_that_reads_them(seed: int) -> None:
    generated = overridable_weights(seed)
    check = fold_and_compare(generated.model, rules=build_rules(keep_overridable=True))
    assert not check.outcome.folds and not check.outcome.overridable_inputs_removed
    assert check.folded.SerializeToString() == check.original.SerializeToString()
    assert all("--keep-overridable" in left.reason for left in check.outcome.left)


def test_the_api_folds_them_too_and_keeps_them_when_asked() -> None:
    model = overridable_weights(7).model
    folded = bnfold.fold(model)
    assert folded.report.overridable_inputs_removed and folded.report.passed
    kept = bnfold.fold(model, keep_overridable=True)
    assert not kept.report.folds and not kept.report.overridable_inputs_removed and kept.report.passed


def test_cli_reports_the_overridable_inputs_removed_and_check_compares_the_two_models(tmp_path: Path) -> None:
    original = tmp_path / "exported.onnx"
    onnx.save(overridable_weights(3).model, str(original))
    report = tmp_path / "report.json"
    result = run_cli(original, "--json", report)
    assert result.exit_code == 0, result.output
    document = json.loads(report.read_text())
    removed = document["overridable_inputs_removed"]
    folded = onnx.load(str(tmp_path / "exported.folded.onnx"))
    assert removed and not set(removed) & {value.name for value in folded.graph.input}
    assert "overridable initializer" in result.stdout
    assert run_cli("check", original, tmp_path / "exported.folded.onnx").exit_code == 0
    kept = run_cli(original, "--keep-overridable", "-o", tmp_path / "kept.onnx", "-q")
    assert kept.exit_code == 0 and "folded 0 of" in kept.stdout and "overridable" not in kept.stdout


# -- BN → 1×1 Conv with auto_pad=SAME_* on symbolic sizes ---------------------------------------


def same_padded_pointwise(seed: int) -> Generated:
    """A BN (or a Mul/Add by [C, 1, 1]) before a Conv whose kernel is 1 on every axis, with
    ``auto_pad`` SAME_UPPER or SAME_LOWER and any strides, on symbolic spatial sizes (dilations
    stay 1: onnxruntime runs no dilated SAME Conv, and a size-1 kernel never dilates)."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(seed=seed)
    channels, out_channels = int(rng.integers(2, 6)), int(rng.integers(1, 5))
    rank = int(rng.choice([3, 4]))
    x = b.input("x", ["N", channels, *(f"D{axis}" for axis in range(rank - 2))])
    y = b.node("Relu", [x])
    if rng.random() < 0.5:
        y = b.batchnorm(y, channels)
    else:
        shape = [channels] + [1] * (rank - 2)
        y = b.node("Add", [b.node("Mul", [y, b.random("m", shape)]), b.random("a", shape)])
    group = channels if rng.random() < 0.3 else 1
    out_channels = channels if group > 1 else out_channels
    kernel = [1] * (rank - 2)
    auto_pad = str(rng.choice(["SAME_UPPER", "SAME_LOWER"]))
    b.output(b.conv(y, channels, out_channels, kernel, group=group, auto_pad=auto_pad,
                    strides=[int(s) for s in rng.integers(1, 4, rank - 2)]))
    sizes = tuple(int(n) for n in rng.integers(1, 12, rank - 2))
    return Generated(b.model(), shapes={"x": (int(rng.integers(1, 3)), channels, *sizes)})


@settings(max_examples=EXAMPLES)
@given(seed=seeds)
def test_affine_before_a_pointwise_same_conv_folds_on_symbolic_sizes(seed: int) -> None:
    generated = same_padded_pointwise(seed)
    check = fold_and_compare(generated.model, shapes=generated.shapes)
    assert [fold.rule for fold in check.outcome.folds] == ["bn-conv"]
    assert [node.op_type for node in check.folded.graph.node] == ["Relu", "Conv"]


def test_a_same_conv_with_a_wider_kernel_on_symbolic_sizes_stays_refused() -> None:
    b = GraphBuilder(seed=1)
    y = b.batchnorm(b.node("Relu", [b.input("x", ["N", 3, "H", "W"])]), 3)
    b.output(b.conv(y, 3, 4, (1, 3), auto_pad="SAME_UPPER"))
    check = fold_and_compare(b.model(), shapes={"x": (1, 3, 5, 7)})
    (left,) = check.outcome.left
    assert "pads its input" in left.reason


# -- weights stored as sparse initializers ------------------------------------------------------


def as_sparse(model: onnx.ModelProto, name: str, coordinates: bool) -> None:
    """Move initializer ``name`` to ``sparse_initializer``, with linear or coordinate indices."""
    tensor = next(t for t in model.graph.initializer if t.name == name)
    dense = numpy_helper.to_array(tensor)
    flat = np.flatnonzero(dense)
    indices = np.stack(np.unravel_index(flat, dense.shape), axis=1) if coordinates else flat
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(dense.reshape(-1)[flat], name),
                                       numpy_helper.from_array(indices.astype(np.int64), f"{name}_indices"),
                                       list(dense.shape))
    model.graph.initializer.remove(tensor)
    model.graph.sparse_initializer.append(sparse)


def sparse_weights(seed: int) -> Generated:
    """Conv / Gemm / MatMul → BN whose weight (and sometimes a BN parameter) is a sparse
    initializer, pruned to a random density; sometimes the weight is shared by two layers, and
    sometimes a Conv's BN is a Mul/Add by [C, 1, 1] (read only when shapes are inferred)."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(seed=seed)
    channels = int(rng.integers(2, 6))
    kind = str(rng.choice(["Conv", "Gemm", "MatMul"]))
    shared = rng.random() < 0.3
    if kind == "Conv":
        x = b.input("x", [1, channels, 5, 5])
        weight = b.random("W", [channels, channels, 3, 3], scale=0.3)
        layers = [b.node("Conv", [x, weight], pads=[1] * 4) for _ in range(1 + shared)]
    else:
        x = b.input("x", [3, channels])
        weight = b.random("W", [channels, channels])
        layers = [b.node(kind, [x, weight]) for _ in range(1 + shared)]
    decomposed = kind == "Conv" and rng.random() < 0.5
    for layer in layers:
        if decomposed:
            shape = [channels, 1, 1]
            b.output(b.node("Add", [b.node("Mul", [layer, b.random("m", shape)]), b.random("a", shape)]))
        else:
            b.output(b.batchnorm(layer, channels))
    model = b.model(ir_version=int(rng.integers(6, 9)))
    pruned = next(t for t in model.graph.initializer if t.name == weight)
    values = numpy_helper.to_array(pruned).copy()
    values[rng.random(values.shape) < rng.uniform(0.2, 0.9)] = 0
    pruned.CopyFrom(numpy_helper.from_array(values, weight))
    as_sparse(model, weight, coordinates=bool(rng.random() < 0.5))
    if rng.random() < 0.5:
        as_sparse(model, model.graph.node[-1].input[1], coordinates=False)  # the last BN's scale, or Add's
    del model.graph.value_info[:]  # as exporters write it: shapes come from inference
    onnx.checker.check_model(model)  # shape inference (full_check) types a sparse initializer as sparse
    return Generated(model)


@settings(max_examples=EXAMPLES)
@given(seed=seeds)
def test_sparse_weights_fold_and_are_written_dense(seed: int) -> None:
    generated = sparse_weights(seed)
    check = fold_and_compare(generated.model)
    assert op_count(check.folded, BN) == op_count(check.folded, "Mul") == 0 and not check.outcome.left
    assert len(check.outcome.folds) == sum(node.op_type in (BN, "Mul") for node in check.original.graph.node)
    layers = [node for node in check.folded.graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    dense = {tensor.name for tensor in check.folded.graph.initializer}
    assert all(layer.input[1] in dense for layer in layers)
    assert not check.folded.graph.sparse_initializer


# -- scalar Mul/Add/Sub/Div next to a layer (PP-LCNetV3's learnable affine, the DB head's bias) ---

SCALAR_SHAPES = ([], [1], [1, 1], [1, 1, 1, 1])


def scalar(b: GraphBuilder, rng: np.random.Generator, rank: int) -> str:
    """A one-element constant of a random shape no longer than ``rank``, away from zero."""
    shape = [s for s in SCALAR_SHAPES if len(s) <= rank][int(rng.integers(0, 2 + (rank >= 4)))]
    value = rng.uniform(0.3, 1.5) * rng.choice([-1.0, 1.0])
    return b.const("k", np.full(shape, value, np.float32), as_node=bool(rng.random() < 0.3))


def scalar_chain(b: GraphBuilder, rng: np.random.Generator, x: str, rank: int) -> str:
    """One to three scalar Mul/Add/Sub/Div in a row, the constant on either side (``c / x`` excluded)."""
    for _ in range(int(rng.integers(1, 4))):
        op = str(rng.choice(["Mul", "Add", "Sub", "Div"]))
        c = scalar(b, rng, rank)
        x = b.node(op, [c, x] if op != "Div" and rng.random() < 0.5 else [x, c])
    return x


def learnable_affine(seed: int) -> Generated:
    """A layer followed by scalar arithmetic (PP-LCNetV3: ``Conv → Mul(s) → Add(t) → act``), or
    scalar arithmetic on the input of an unpadded layer (``x / 255 - 0.5 → Conv``), sometimes with
    a BN between the layer and the scalars."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(seed=seed)
    channels = int(rng.integers(1, 6))
    kind = str(rng.choice(["Conv", "ConvTranspose", "Gemm", "MatMul", "forward-Conv", "forward-MatMul"]))
    if kind.startswith("forward"):
        rank = 4 if kind == "forward-Conv" else int(rng.choice([2, 3]))
        x = b.input("x", [1, channels, 5, 5] if rank == 4 else [2, 3, channels][-rank:])
        y = scalar_chain(b, rng, b.node("Relu", [x]), rank)
        if kind == "forward-Conv":
            y = b.conv(y, channels, 3, (1, 1), pads=[0] * 4)
        else:
            y = b.node("MatMul", [y, b.random("W", [channels, 3])])
        b.output(b.node("Relu", [y]))
        return Generated(b.model())
    rank = 4 if kind.startswith("Conv") else int(rng.choice([2, 3])) if kind == "MatMul" else 2
    if kind == "Conv":
        x = b.input("x", ["N", 3, "H", "W"])
        y = b.conv(x, 3, channels, (3, 3), bias=bool(rng.random() < 0.5))
    elif kind == "ConvTranspose":
        x = b.input("x", ["N", 3, "H", "W"])
        y = b.conv_transpose(x, 3, channels, (2, 2), strides=[2, 2], bias=bool(rng.random() < 0.5))
    elif kind == "Gemm":
        y = b.gemm(b.input("x", ["N", 4]), 4, channels, bias=bool(rng.random() < 0.5))
    else:
        x = b.input("x", ["N", 4] if rank == 2 else ["N", "T", 4])
        y = b.node("MatMul", [x, b.random("W", [4, channels])])
        if rng.random() < 0.5:
            y = b.node("Add", [y, b.random("bias", [channels])])
    if rng.random() < 0.3 and rank in (2, 4):
        y = b.batchnorm(y, channels)
    b.output(b.node(str(rng.choice(["Relu", "Sigmoid", "HardSigmoid"])), [scalar_chain(b, rng, y, rank)]))
    shapes = {"x": (2, 3, 4, 6)} if kind.startswith("Conv") else {"x": (2, 4) if rank == 2 else (2, 3, 4)}
    return Generated(b.model(), shapes=shapes)


def arithmetic_count(model: onnx.ModelProto) -> int:
    return sum(op_count(model, op) for op in ("Mul", "Add", "Sub", "Div"))


@settings(max_examples=40)
@given(seed=seeds)
def test_scalar_arithmetic_next_to_a_layer_folds_into_it(seed: int) -> None:
    generated = learnable_affine(seed)
    check = fold_and_compare(generated.model, shapes=generated.shapes)
    assert op_count(check.folded, BN) == 0
    assert_only_matmul_biases_left(check.folded)
    scalar_folds = [fold for fold in check.outcome.folds if fold.kind != BN]
    assert all(fold.notes[0].startswith("scalar ") for fold in scalar_folds)
    assert scalar_folds or arithmetic_count(check.original) == 1  # a lone bias of a MatMul stays as it is


def db_head(seed: int) -> Generated:
    """paddle2onnx's DB head output: ``ConvTranspose(W [C, 1, 2, 2], no bias) → Add([1, 1, 1, 1]) →
    Sigmoid``, the one output channel's bias as a scalar-shaped constant."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(seed=seed)
    channels = int(rng.integers(2, 9))
    x = b.node("Relu", [b.input("x", ["N", channels, "H", "W"])])
    y = b.conv_transpose(x, channels, 1, (2, 2), strides=[2, 2], bias=False)
    b.output(b.node("Sigmoid", [b.node("Add", [y, b.random("bias", [1, 1, 1, 1])])]))
    return Generated(b.model(), shapes={"x": (1, channels, 3, 5)})


@settings(max_examples=5)
@given(seed=seeds)
def test_the_bias_of_a_one_channel_output_folds_into_its_layer(seed: int) -> None:
    generated = db_head(seed)
    check = fold_and_compare(generated.model, shapes=generated.shapes)
    assert [node.op_type for node in check.folded.graph.node] == ["Relu", "ConvTranspose", "Sigmoid"]
    assert [fold.rule for fold in check.outcome.folds] == ["convtranspose-bn"]


def test_scalar_arithmetic_nothing_can_absorb_is_left_alone() -> None:
    """A scalar whose layer output has other readers, between two activations, of higher rank
    than the data, or on data whose channel count is unknown: the model is unchanged."""
    b = GraphBuilder(seed=1)
    x = b.input("x", ["N", "C", 4, 4])
    conv = b.conv(b.input("y", [1, 3, 4, 4]), 3, 4)
    b.output(b.node("Mul", [conv, b.const("k", np.float32(0.5))]))
    b.output(b.node("Sigmoid", [conv]))
    b.output(b.node("Relu", [b.node("Add", [b.node("Relu", [conv]), b.const("k", np.float32(0.1))])]))
    b.output(b.node("Mul", [b.node("MatMul", [b.input("v", [2, 3]), b.random("W", [3, 4])]),
                            b.const("k", np.ones([1, 1, 1], np.float32))]))
    b.output(b.conv(b.node("Mul", [b.node("Relu", [x]), b.const("k", np.float32(2.0))]), 3, 3, (1, 1), pads=[0] * 4))
    model = b.model()
    check = fold_and_compare(model, shapes={"x": (1, 3, 4, 4)})
    assert not check.outcome.folds
    assert check.folded.SerializeToString() == model.SerializeToString()


# -- chains of pass-through nodes, in either direction -------------------------------------------

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def assert_only_matmul_biases_left(model: onnx.ModelProto) -> None:
    """No BN and no arithmetic left, but one bias Add (or Sub) right after a MatMul, which has
    no bias input of its own."""
    graph = GraphIndex(model)
    assert op_count(model, BN) == 0
    left = [node for node in graph.nodes if node.op_type in ("Mul", "Add", "Sub", "Div")]
    after = [[graph.producer_of(name) for name in node.input if graph.constant_value(name) is None] for node in left]
    assert all(node.op_type in ("Add", "Sub") for node in left)
    assert all(len(producers) == 1 and producers[0] and producers[0].op_type == "MatMul" for producers in after)
    assert len({producers[0].output[0] for producers in after}) == len(left)


def db_head_identities(seed: int) -> Generated:
    """paddle2onnx 2.x's DB head: ``ConvTranspose → Identity → Add(bias [1, C, 1, 1]) → Identity →
    BN → Relu``, with one to three Identity / inference Dropout nodes at each place."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(seed=seed)
    channels = int(rng.integers(2, 6))
    opset = int(rng.choice([11, 14, 17]))

    def passes(y: str) -> str:
        for _ in range(int(rng.integers(1, 4))):
            y = b.node(str(rng.choice(["Identity", "Dropout"])), [y])
        return y

    y = b.conv_transpose(b.input("x", ["N", 3, "H", "W"]), 3, channels, (2, 2), strides=[2, 2], bias=False)
    y = passes(b.node("Add", [passes(y), b.random("bias", [1, channels, 1, 1])]))
    b.output(b.node("Relu", [b.batchnorm(y, channels)]))
    return Generated(b.model(opset=opset), shapes={"x": (1, 3, 3, 4)})


@settings(max_examples=EXAMPLES)
@given(seed=seeds)
def test_db_head_bias_and_batchnorm_fold_through_identities(seed: int) -> None:
    generated = db_head_identities(seed)
    check = fold_and_compare(generated.model, shapes=generated.shapes)
    assert op_count(check.folded, BN) == op_count(check.folded, "Add") == 0
    assert [fold.kind for fold in check.outcome.folds] == ["Add", BN]
    assert all(fold.target.startswith(("Identity", "Dropout")) for fold in check.outcome.folds)


def squeezed_conv1d(seed: int) -> Generated:
    """``Conv(2-D, H = 1) → Squeeze(H) → Transpose(NCL → NLC) → Mul([C]) → Add([C])``, a Conv1D
    as exporters write it with a decomposed BN on the channels-last side."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(seed=seed)
    channels, opset = int(rng.integers(2, 6)), int(rng.choice([11, 13, 17]))
    y = b.conv(b.input("x", [1, 3, 1, 7]), 3, channels, (1, 3), pads=[0, 1, 0, 1])
    axes = {"axes": [2]} if opset < 13 else {}
    inputs = [y] if opset < 13 else [y, b.const("axes", np.array([2], np.int64))]
    y = b.node("Transpose", [b.node("Squeeze", inputs, **axes)], perm=[0, 2, 1])
    y = b.node("Add", [b.node("Mul", [y, b.random("m", [channels])]), b.random("a", [channels])])
    b.output(b.node("Relu", [y]))
    return Generated(b.model(opset=opset))


@settings(max_examples=5)
@given(seed=seeds)
def test_channels_last_affine_after_squeeze_and_transpose_folds_into_the_conv(seed: int) -> None:
    check = fold_and_compare(squeezed_conv1d(seed).model)
    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Squeeze", "Transpose", "Relu"]
    assert [fold.rule for fold in check.outcome.folds] == ["conv-bn through Squeeze, Transpose"]
    assert not any("LayerNorm" in note for note in check.outcome.folds[0].notes)


class Layout:
    """A value's shape as a chain is built, and which of its axes holds the channels."""

    def __init__(self, shape: list[int], axis: int) -> None:
        self.shape, self.axis = shape, axis

    @property
    def rank(self) -> int:
        return len(self.shape)


def pass_through(b: GraphBuilder, rng: np.random.Generator, y: str, layout: Layout, opset: int) -> str:
    """One node that moves or passes values: Identity, inference Dropout, Transpose, Unsqueeze, or
    Squeeze of a size-1 axis other than the channels'."""
    ones = [axis for axis, size in enumerate(layout.shape) if size == 1 and axis != layout.axis]
    kinds = ["Identity", "Dropout", "Transpose"] + (["Unsqueeze"] if layout.rank < 5 else []) + (
        ["Squeeze"] if ones and layout.rank > 2 else [])
    kind = str(rng.choice(kinds))
    if kind in ("Identity", "Dropout"):
        return b.node(kind, [y])
    if kind == "Transpose":
        perm = [int(axis) for axis in rng.permutation(layout.rank)]
        layout.shape, layout.axis = [layout.shape[axis] for axis in perm], perm.index(layout.axis)
        return b.node("Transpose", [y], perm=perm)
    if kind == "Unsqueeze":
        where = int(rng.integers(0, layout.rank + 1))
        layout.shape.insert(where, 1)
        layout.axis += where <= layout.axis
    else:
        where = int(rng.choice(ones))
        del layout.shape[where]
        layout.axis -= where < layout.axis
    if opset < 13:
        return b.node(kind, [y], axes=[where])
    return b.node(kind, [y, b.const("axes", np.array([where], np.int64))])


def channel_affine(b: GraphBuilder, rng: np.random.Generator, y: str, layout: Layout, channels: int) -> str:
    """A BN (channels on axis 1), a Mul/Add by per-channel constants (channels on axis 1 or the
    last axis) or by scalars (anywhere)."""
    kinds = ["scalar"] + (["bn"] if layout.axis == 1 else []) + (
        ["per-channel"] if layout.axis in (1, layout.rank - 1) else [])
    kind = str(rng.choice(kinds))
    if kind == "bn":
        return b.batchnorm(y, channels)
    shape = [1] if kind == "scalar" else [channels] + [1] * (layout.rank - 1 - layout.axis)
    y = b.node("Mul", [y, b.const("m", rng.uniform(0.5, 1.5, shape).astype(np.float32))])
    return b.node(str(rng.choice(["Add", "Sub"])), [y, b.random("a", shape)])


def passthrough_chain(seed: int) -> Generated:
    """A layer, then a random chain of pass-through nodes with affines anywhere in it (backward);
    or affines and pass-through nodes, then a MatMul or unpadded Conv (forward)."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(seed=seed)
    channels, opset = int(rng.integers(2, 6)), int(rng.choice([11, 13, 17]))
    backward = rng.random() < 0.6
    height = int(rng.choice([1, 3]))
    layer = str(rng.choice(LAYERS if backward else ("MatMul", "Conv")))
    if not backward:
        y = b.node("Relu", [b.input("x", [1, channels, height, 4])])
        layout = Layout([1, channels, height, 4], 1)
    elif layer in ("Conv", "ConvTranspose"):
        x = b.input("x", [1, 3, height, 4])
        y = b.node(layer, [x, b.random("W", [channels, 3, 1, 1] if layer == "Conv" else [3, channels, 1, 1])])
        layout = Layout([1, channels, height, 4], 1)
    elif layer == "Gemm":
        y, layout = b.gemm(b.input("x", [2, 4]), 4, channels), Layout([2, channels], 1)
    else:
        y = b.node("MatMul", [b.input("x", [2, height, 4]), b.random("W", [4, channels])])
        layout = Layout([2, height, channels], 2)
    steps = int(rng.integers(2, 7))
    affine_at = {int(rng.integers(0, steps))} | {step for step in range(steps) if rng.random() < 0.3}
    for step in range(steps):
        y = channel_affine(b, rng, y, layout, channels) if step in affine_at else pass_through(b, rng, y, layout, opset)
    if not backward and (layer == "MatMul" or layout.rank < 3):
        # Channels last, then a MatMul over them.
        perm = [axis for axis in range(layout.rank) if axis != layout.axis] + [layout.axis]
        y = b.node("MatMul", [b.node("Transpose", [y], perm=perm), b.random("W", [channels, 3])])
    elif not backward:
        # Channels on axis 1 (some other axis as the batch), then an unpadded pointwise Conv.
        others = [axis for axis in range(layout.rank) if axis != layout.axis]
        y = b.node("Transpose", [y], perm=[others[0], layout.axis, *others[1:]])
        y = b.node("Conv", [y, b.random("W", [3, channels] + [1] * (layout.rank - 2))])
    b.output(b.node("Relu", [y]))
    return Generated(b.model(opset=opset))


@settings(max_examples=60)
@given(seed=seeds)
def test_affines_anywhere_in_a_chain_of_pass_through_nodes_all_fold(seed: int) -> None:
    """Each fold leaves the chain as crossable as it found it: every affine folds, in either direction."""
    generated = passthrough_chain(seed)
    check = fold_and_compare(generated.model)
    assert_only_matmul_biases_left(check.folded)
    assert check.outcome.folds and not check.outcome.left


# -- a LayerNorm's affine (γ, β) before a Linear -------------------------------------------------


def layernorm_linear(seed: int) -> Generated:
    """LayerNorm over the last axis, decomposed as exporters before opset 17 write it
    (``ReduceMean → Sub → Pow → ReduceMean → Add(ε) → Sqrt → Div``) or as LayerNormalization with
    unit scale, then ``Mul(γ) → Add(β)`` by ``[D]`` constants, pass-through nodes, and a Linear
    (MatMul, with or without its bias Add, or Gemm)."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(seed=seed)
    width = int(rng.integers(2, 7))
    decomposed = rng.random() < 0.6
    rank = 2 if not decomposed and rng.random() < 0.3 else int(rng.choice([2, 3]))
    x = b.input("x", [2, 3, width][-rank:])
    if decomposed:
        mean = b.node("ReduceMean", [x], axes=[-1], keepdims=1)
        centered = b.node("Sub", [x, mean])
        variance = b.node("ReduceMean", [b.node("Pow", [centered, b.const("two", np.float32(2.0))])],
                          axes=[-1], keepdims=1)
        spread = b.node("Sqrt", [b.node("Add", [variance, b.const("eps", np.float32(1e-5))])])
        y = b.node("Div", [centered, spread])
        opset = 13 if rng.random() < 0.5 else 11
    else:
        y = b.node("LayerNormalization", [x, b.const("ones", np.ones(width, np.float32))], axis=-1)
        opset = 17
    y = b.node("Add", [b.node("Mul", [y, b.random("gamma", [width])]), b.random("beta", [width])])
    for _ in range(int(rng.integers(0, 3))):
        y = b.node(str(rng.choice(["Identity", "Dropout"])), [y])
    if rank == 2 and rng.random() < 0.5:
        y = b.gemm(y, width, 3)
    else:
        y = b.node("MatMul", [y, b.random("W", [width, 3])])
        if rng.random() < 0.5:
            y = b.node("Add", [y, b.random("bias", [3])])
    b.output(y)
    return Generated(b.model(opset=opset))


@settings(max_examples=EXAMPLES)
@given(seed=seeds)
def test_layernorm_affine_folds_into_the_linear_after_it_and_says_so(seed: int) -> None:
    check = fold_and_compare(layernorm_linear(seed).model)
    fold, *merged_biases = check.outcome.folds
    assert fold.kind == "Mul+Add" and fold.direction == "forward"
    assert fold.notes[0].startswith("LayerNorm affine")
    assert all(set(later.kind.split("+")) == {"Add"} for later in merged_biases)  # the shift joins the bias
    # The normalization stays; its γ and β are gone, leaving at most the Linear's bias Add.
    assert op_count(check.folded, "Mul") == 0 and op_count(check.folded, "Add") <= 2


# -- weights passed into model-local functions (PyTorch export_modules_as_functions) ------------

LOCAL = "pkg.modules"


def local_function(name: str, inputs: list[str], outputs: list[str], nodes: list[onnx.NodeProto],
                   attributes: tuple[str, ...] = ()) -> onnx.FunctionProto:
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(LOCAL, 1)]
    return helper.make_function(LOCAL, name, inputs, outputs, nodes, opsets, attributes=list(attributes))


def call(name: str, inputs: list[str], output: str, **attributes: object) -> onnx.NodeProto:
    return helper.make_node(name, inputs, [output], name=f"{output}_call", domain=LOCAL, **attributes)


def batchnorm_with_epsilon_from_call() -> onnx.NodeProto:
    node = helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], name="bn")
    node.attribute.append(onnx.AttributeProto(name="epsilon", ref_attr_name="eps", type=onnx.AttributeProto.FLOAT))
    return node


# How PyTorch writes modules as functions: each module's weights are inputs its caller fills.
CONV2D = local_function("Conv2d", ["x", "w"], ["y"], [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1] * 4)])
BATCHNORM2D = local_function("BatchNorm2d", ["x", "g", "b", "m", "v"], ["y"], [batchnorm_with_epsilon_from_call()],
                             attributes=("eps",))
BLOCK = local_function("Block", ["x", "w", "g", "b", "m", "v"], ["z"], [
    call("Conv2d", ["x", "w"], "c"),
    call("BatchNorm2d", ["c", "g", "b", "m", "v"], "n", eps=1e-3),
    helper.make_node("Relu", ["n"], ["z"]),
])
ACT = local_function("Act", ["x"], ["y"], [helper.make_node("HardSigmoid", ["x"], ["y"])])


def fused_block(channels: int, rng: np.random.Generator) -> onnx.FunctionProto:
    """A function whose Conv and BN read constants of its own: it folds as it is and stays."""
    def constant(name: str, values: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(values.astype(np.float32), name))

    return local_function("Fused", ["x"], ["y"], [
        constant("w", rng.normal(0, 0.3, (channels, channels, 1, 1))),
        *(constant(name, rng.uniform(0.5, 1.5, channels)) for name in ("g", "v")),
        *(constant(name, rng.normal(0, 0.5, channels)) for name in ("b", "m")),
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
    ])


def functions_with_passed_weights(seed: int) -> tuple[Generated, set[str]]:
    """A chain of calls as PyTorch's ``export_modules_as_functions`` writes them: Block (Conv2d →
    BatchNorm2d → Relu, their weights passed down from the main graph's initializers, epsilon
    from the call), Conv2d then a BN in the main graph, functions that fold on their own (Fused)
    and ones without any BN (Act). Returns the model and the functions that must stay."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(seed=seed)
    channels = int(rng.integers(2, 5))
    y = b.input("x", [1, channels, 5, 5])
    used: dict[str, onnx.FunctionProto] = {}
    for _ in range(int(rng.integers(1, 5))):
        kind = str(rng.choice(["Block", "Conv2d+BN", "Fused", "Act"]))
        weight = b.random("W", [channels, channels, 3, 3], scale=0.3)
        output = b.fresh(kind.lower().replace("+", "_"))
        if kind == "Block":
            used.update(Block=BLOCK, Conv2d=CONV2D, BatchNorm2d=BATCHNORM2D)
            b.nodes.append(call("Block", [y, weight, *b.batchnorm_parameters(channels)], output))
        elif kind == "Conv2d+BN":
            used["Conv2d"] = CONV2D
            b.nodes.append(call("Conv2d", [y, weight], output))
            output = b.batchnorm(output, channels)
        else:
            used[kind] = fused_block(channels, rng) if kind == "Fused" else ACT
            b.nodes.append(call(kind, [y], output))
        y = output
    b.output(y, [1, channels, 5, 5])
    model = helper.make_model(
        helper.make_graph(b.nodes, "exported", b.inputs, b.outputs, b.initializers),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(LOCAL, 1)], ir_version=8,
        functions=list(used.values()),
    )
    onnx.checker.check_model(model)
    return Generated(model), {name for name in used if name in ("Fused", "Act")}


@settings(max_examples=EXAMPLES)
@given(seed=seeds)
def test_functions_whose_batchnorms_need_their_callers_are_inlined_and_fold(seed: int) -> None:
    generated, kept = functions_with_passed_weights(seed)
    check = fold_and_compare(generated.model)
    assert not check.outcome.left
    assert op_count(check.folded, BN) == 0
    assert all(node.op_type != BN for function in check.folded.functions for node in function.node)
    assert {function.name for function in check.folded.functions} == kept
    assert set(check.outcome.inlined_functions) == {function.name for function in check.original.functions} - kept


# -- symbolic input sizes in detectors with Resize: guessed from what the model says ----------


def feature_pyramid(seed: int, join: str | None = None) -> tuple[Generated, int]:
    """A detector's feature pyramid on symbolic H, W: strided Convs (or pooling) down, Resize
    (nearest, by 2 or to the lateral map's computed size) back up, each upsampled map joined to
    the lateral one (Add, or Concat as the DB head does), sometimes a bottom-up path after it, with
    BNs on the way; sometimes its size in the metadata as Ultralytics writes it (``imgsz``), or in
    value_info. Returns the model and the multiple its sizes must have."""
    rng = np.random.default_rng(seed)
    join = join or str(rng.choice(["Add", "Concat"]))
    b = GraphBuilder(seed=seed)
    channels, levels = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    y = b.input("x", ["N", 3, "H", "W"])
    maps, c_in = [], 3
    for _ in range(levels):
        if rng.random() < 0.3 and c_in == channels:
            y = b.node("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
        else:
            y = b.node("Relu", [b.batchnorm(b.conv(y, c_in, channels, (3, 3), strides=[2, 2]), channels)])
        maps.append(y)
        c_in = channels
    top, width = maps[-1], channels
    computed_sizes = rng.random() < 0.4
    for lateral in reversed(maps[:-1]):
        if computed_sizes:  # F.interpolate(top, size=lateral.shape[2:]), as paddle2onnx writes it for SLANet
            up = b.node("Resize", [top, "", "", b.node("Shape", [lateral])], mode="nearest")
        else:
            up = b.node("Resize", [top, "", b.const("scales", np.array([1, 1, 2, 2], np.float32))], mode="nearest")
        top = b.node("Add", [up, lateral]) if join == "Add" else b.node("Concat", [up, lateral], axis=1)
        width += 0 if join == "Add" else channels
    if computed_sizes and join == "Add":  # and a bottom-up path (PAN) back down the levels
        for lateral in maps[1:]:
            top = b.node("Add", [b.conv(top, channels, channels, (3, 3), strides=[2, 2]), lateral])
    b.output(b.batchnorm(b.conv(top, width, 1, (1, 1), pads=[0] * 4), 1))
    model = b.model(opset=13)
    multiple = 2**levels
    where = rng.choice(["graph", "metadata", "value_info"], p=[0.6, 0.2, 0.2])
    if where == "metadata":
        helper.set_model_props(model, {"imgsz": f"[{multiple * 2}, {multiple * 3}]", "stride": str(multiple)})
    elif where == "value_info":
        model.graph.value_info.append(helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                    [None, 3, multiple, multiple * 2]))
    return Generated(model), multiple


def pyramid_report(model: onnx.ModelProto, folder: Path, *arguments: str) -> dict:
    path = folder / "detector.onnx"
    onnx.save(model, str(path))
    result = run_cli(path, "--dry-run", "--json", "-", *arguments)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@settings(max_examples=EXAMPLES)
@given(seed=seeds)
def test_detector_sizes_are_guessed_from_what_the_model_says_and_reported(seed: int) -> None:
    generated, multiple = feature_pyramid(seed)
    with tempfile.TemporaryDirectory() as scratch:
        document = pyramid_report(generated.model, Path(scratch))
    assert document["status"] == "equivalent" and not document["left"]
    (guess,) = document["verification"]["guessed_sizes"]
    height, width = guess["shape"][2:]
    assert guess["input"] == "x" and guess["shape"][:2] == [1, 3]
    assert height % multiple == 0 and width % multiple == 0
    props = {prop.key: prop.value for prop in generated.model.metadata_props}
    if "imgsz" in props:
        assert [height, width] == [multiple * 2, multiple * 3] and "imgsz" in guess["reason"]
    elif any(value.name == "x" for value in generated.model.graph.value_info):
        assert [height, width] == [multiple, multiple * 2] and "value_info" in guess["reason"]
    else:
        assert [height, width] == [multiple, multiple] and f"multiples of {multiple}" in guess["reason"]


def test_a_detector_fed_the_one_by_one_guess_cannot_run(tmp_path: Path) -> None:
    """What the guess avoids: onnxruntime refuses the pyramid on 1×1 (the Resize of a 1×1 map
    gives 2×2, joined to a 1×1 map); exact sizes given by the user are used as they are."""
    generated, multiple = feature_pyramid(0, join="Concat")
    document = pyramid_report(generated.model, tmp_path, "--input-shape", f"x:1,3,{multiple * 3},{multiple}")
    assert not document["verification"]["guessed_sizes"]
    assert document["verification"]["trials"][0]["inputs"][0]["shape"] == [1, 3, multiple * 3, multiple]
    assert_one_line_error(run_cli(tmp_path / "detector.onnx", "--dry-run", "--input-shape", "x:1,3,1,1"), 3,
                          "onnxruntime cannot run the original model", "Concat")


def test_without_a_resize_symbolic_dims_are_still_set_to_one(tmp_path: Path) -> None:
    b = GraphBuilder(seed=2)
    b.output(b.batchnorm(b.conv(b.input("x", ["N", 3, "H", "W"]), 3, 4, (3, 3), strides=[2, 2]), 4))
    document = pyramid_report(b.model(), tmp_path)
    (guess,) = document["verification"]["guessed_sizes"]
    assert guess == {"input": "x", "shape": [1, 3, 1, 1], "axes": [0, 2, 3], "reason": "symbolic dims set to 1"}


def test_a_guess_that_still_cannot_run_is_named_with_its_reason(tmp_path: Path) -> None:
    b = GraphBuilder(seed=3)
    y = b.conv(b.input("x", ["N", 3, "H", "W"]), 3, 2, (3, 3), strides=[2, 2])
    up = b.node("Resize", [y, "", b.const("scales", np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    b.output(b.node("Reshape", [b.batchnorm(up, 2), b.const("shape", np.array([1, -1, 7], np.int64))]))
    path = tmp_path / "fixed.onnx"
    onnx.save(b.model(opset=13), str(path))
    assert_one_line_error(run_cli(path, "--dry-run"), 3, "x was 1,3,2,2 (multiples of 2:", "--input-shape")


# -- arithmetic that computes nothing (PaddleOCR's swish: x * sigmoid(1.0 * x)) ------------------


def swish_by_one(seed: int) -> Generated:
    """Conv → BN → ``y * sigmoid(op(y))`` with ``op`` one of ``y * 1``, ``1 * y``, ``y / 1``,
    ``y - 0`` (by a scalar or a ``[C, 1, 1]`` constant), as PaddleOCR exports swish."""
    rng = np.random.default_rng(seed)
    b = GraphBuilder(seed=seed)
    channels = int(rng.integers(2, 6))
    y = b.batchnorm(b.conv(b.input("x", ["N", 3, "H", "W"]), 3, channels), channels)
    op = str(rng.choice(["Mul", "Div", "Sub"]))
    shape = [] if rng.random() < 0.5 else [channels, 1, 1]
    constant = b.const("k", np.full(shape, 0.0 if op == "Sub" else 1.0, np.float32), as_node=bool(rng.random() < 0.3))
    inner = b.node(op, [constant, y] if op == "Mul" and rng.random() < 0.5 else [y, constant])
    b.output(b.node("Mul", [y, b.node("Sigmoid", [inner])]))
    return Generated(b.model(), shapes={"x": (1, 3, 4, 5)})


@settings(max_examples=EXAMPLES)
@given(seed=seeds)
def test_arithmetic_that_computes_nothing_is_removed(seed: int) -> None:
    generated = swish_by_one(seed)
    check = fold_and_compare(generated.model, shapes=generated.shapes)
    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Sigmoid", "Mul"]
    assert sorted(fold.rule for fold in check.outcome.folds) == ["conv-bn", "identity"]


def test_arithmetic_that_only_looks_like_nothing_stays() -> None:
    """``y + 0`` (turns -0.0 into +0.0), ``y * 2 * 0.5`` (may overflow half-way), a graph output,
    and a ``[C]`` constant of ones on data whose size might be 1 (it would widen it)."""
    b = GraphBuilder(seed=5)
    y = b.node("Relu", [b.input("x", ["N", "C", "L"])])
    b.output(b.node("Mul", [y, b.node("Sigmoid", [b.node("Add", [y, b.const("zero", np.float32(0.0))])])]))
    doubled = b.node("Mul", [y, b.const("two", np.float32(2.0))])
    b.output(b.node("Mul", [y, b.node("Sigmoid", [b.node("Mul", [doubled, b.const("half", np.float32(0.5))])])]))
    b.output(b.node("Mul", [y, b.const("one", np.float32(1.0))]))
    b.output(b.node("Sigmoid", [b.node("Mul", [y, b.const("ones", np.ones(4, np.float32))])]))
    model = b.model()
    check = fold_and_compare(model, shapes={"x": (2, 3, 4)})
    assert not check.outcome.folds
    assert check.folded.SerializeToString() == model.SerializeToString()
