"""Constants and shapes that real models use: old-opset constant subexpressions (Caffe2 and
old-exporter models) and values created inside If/Loop/Scan bodies.

Each class is generated (hypothesis draws the opset, the op that computes the constant, the
pattern and the sizes) and judged by onnxruntime on inputs of the judge's own, with the
checker run on every folded model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from sample_models.modelkit import GraphBuilder
from tests.hostile_support import (
    assert_same_function,
    conditions,
    count_ops,
    fold_copy,
    ir_version_for,
    judge_feeds,
    model_of,
)

BN = "BatchNormalization"

# -- 6. constant subexpressions at the model's own opset -----------------------------------------

# The ops that compute a [C, 1, 1] constant in their pre-opset-13 forms, with the last opset
# where that form is valid: attributes that later became inputs.
OLD_FORMS = {
    "unsqueeze": 12,  # axes attribute until 13
    "squeeze": 12,
    "clip": 10,  # min / max attributes until 11
    "slice": 9,  # starts / ends / axes attributes until 10
    "pad": 10,  # pads / value attributes until 11
    "split": 12,  # split attribute until 13
    "reduce_mean": 12,  # axes attribute until 18
    "reshape": 12,  # shape input since 5: the form that never changed, for contrast
}


def per_channel_constant(b: GraphBuilder, form: str, values: np.ndarray) -> str:
    """A ``[C, 1, 1]`` constant computed from an initializer by one op in its old form."""
    c = values.size
    if form == "unsqueeze":
        return b.node("Unsqueeze", [b.const("raw", values)], axes=[1, 2])
    if form == "squeeze":
        return b.node("Squeeze", [b.const("raw", values.reshape(1, c, 1, 1))], axes=[0])
    if form == "clip":
        return b.node("Clip", [b.const("raw", values.reshape(c, 1, 1) * 2)], min=-1.0, max=1.5)
    if form == "slice":
        padded = np.concatenate([[7.0], values, [-7.0]]).astype(values.dtype).reshape(c + 2, 1, 1)
        return b.node("Slice", [b.const("raw", padded)], starts=[1], ends=[c + 1], axes=[0])
    if form == "pad":
        return b.node("Pad", [b.const("raw", values[1:].reshape(c - 1, 1, 1))], pads=[1, 0, 0, 0, 0, 0],
                      mode="constant", value=0.75)
    if form == "split":
        doubled = np.concatenate([values, values[::-1]]).reshape(2 * c, 1, 1)
        return b.node("Split", [b.const("raw", doubled)], n_outputs=2, axis=0, split=[c, c])
    if form == "reduce_mean":
        spread = np.stack([values - 0.25, values + 0.25], axis=-1).reshape(c, 1, 1, 2)
        return b.node("ReduceMean", [b.const("raw", spread.astype(values.dtype))], axes=[3], keepdims=0)
    shape = b.const("shape", np.array([c, 1, 1], dtype=np.int64))
    return b.node("Reshape", [b.const("raw", values), shape])


def scale_and_shift(b: GraphBuilder, x: str, channels: int, form: str, swap: bool) -> str:
    """Caffe's Scale layer as old converters write it: ``x * s + t`` by ``[C, 1, 1]`` constants."""
    scale = per_channel_constant(b, form, b.rng.uniform(0.5, 1.5, channels).astype(np.float32))
    shift = per_channel_constant(b, form, b.rng.normal(0.0, 0.5, channels).astype(np.float32))
    scaled = b.node("Mul", [scale, x] if swap else [x, scale])
    return b.node("Add", [shift, scaled] if swap else [scaled, shift])


PATTERNS = ("conv_scale", "conv_bn_scale", "preactivation")


def caffe2_style_model(pattern: str, form: str, opset: int, blocks: int, channels: int, swap: bool,
                       seed: int) -> onnx.ModelProto:
    """Blocks of an old-exporter CNN.

    ``conv_scale``: Conv → Mul → Add → Relu (Inception-v2 from Caffe2); ``conv_bn_scale``: Conv →
    BN → Mul → Add → Relu; ``preactivation``: Conv → Relu → BN → Mul → Add → Relu → Conv 1x1
    (DenseNet-121's BN + Scale before each Conv).
    """
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", 3, 6, 6])
    c_in = 3
    for _ in range(blocks):
        y = b.conv(x, c_in, channels)
        if pattern == "preactivation":
            y = b.node("Relu", [y])
        if pattern != "conv_scale":
            y = b.batchnorm(y, channels)
        y = b.node("Relu", [scale_and_shift(b, y, channels, form, swap)])
        if pattern == "preactivation":
            y = b.conv(y, channels, channels, (1, 1), pads=[0, 0, 0, 0])
        x, c_in = y, channels
    b.output(x)
    return b.model(opset=opset, ir_version=ir_version_for(opset))


@st.composite
def old_exporter_models(draw: st.DrawFn) -> tuple[onnx.ModelProto, str, int]:
    form = draw(st.sampled_from(sorted(OLD_FORMS)))
    opset = draw(st.integers(7, OLD_FORMS[form]))
    pattern = draw(st.sampled_from(PATTERNS))
    blocks = draw(st.integers(1, 3))
    model = caffe2_style_model(pattern, form, opset, blocks, draw(st.integers(2, 5)), draw(st.booleans()),
                               draw(st.integers(0, 2**16)))
    return model, pattern, blocks


@settings(max_examples=40)
@given(old_exporter_models())
def test_old_exporter_scale_layers_fold_or_merge_completely(case: tuple[onnx.ModelProto, str, int]) -> None:
    model, pattern, blocks = case
    folded, outcome = fold_copy(model)
    assert count_ops(folded, "Mul") == count_ops(folded, "Add") == 0, outcome
    # A BN + Scale after a Relu has no layer before it: it merges into one BN per block.
    assert count_ops(folded, BN) == (blocks if pattern == "preactivation" else 0), outcome
    assert len(outcome.folds) == blocks * (2 if pattern == "conv_bn_scale" else 1)
    assert_same_function(model, folded, [judge_feeds(model, seed) for seed in range(2)])


@pytest.mark.parametrize("form", sorted(OLD_FORMS))
def test_every_old_form_is_evaluated_at_the_models_opset(form: str) -> None:
    """One model per form at its last valid opset: the constant is computed, the affine folds."""
    model = caffe2_style_model("conv_scale", form, OLD_FORMS[form], 1, 4, False, seed=3)
    folded, outcome = fold_copy(model)
    ((fold,),) = [outcome.folds]
    assert fold.kind == "Mul+Add" and fold.rule == "conv-bn"
    assert [node.op_type for node in folded.graph.node] == ["Conv", "Relu"]
    assert_same_function(model, folded, [judge_feeds(model, 0)])


# -- 7. shapes of values created inside If / Loop / Scan bodies ----------------------------------

Block = Callable[[GraphBuilder, str], str]


def matmul_bn(b: GraphBuilder, x: str) -> str:
    """Relu → MatMul → BN on ``[N, 6]``: rank 2, the BN's axis 1 is the MatMul's columns."""
    return b.batchnorm(b.node("MatMul", [b.node("Relu", [x]), b.random("W", [6, 4])]), 4)


def conv_scale(b: GraphBuilder, x: str) -> str:
    """Relu → Conv → Mul → Add by ``[1, C, 1, 1]`` constants."""
    conv = b.conv(b.node("Relu", [x]), 6, 4, (1, 1), pads=[0, 0, 0, 0])
    scaled = b.node("Mul", [conv, b.random("s", [1, 4, 1, 1])])
    return b.node("Add", [scaled, b.random("t", [1, 4, 1, 1])])


def sequence_matmul_bn(b: GraphBuilder, x: str) -> str:
    """Relu → MatMul → BN on ``[N, T, 6]``: the BN normalizes T, which no column owns (refused)."""
    return b.batchnorm(b.node("MatMul", [b.node("Relu", [x]), b.random("W", [6, 4])]), 3)


# Per block: the data shape it reads, with N symbolic, and what it leaves at top level.
BLOCKS: dict[str, tuple[Block, list[int | str], int]] = {
    "matmul_bn": (matmul_bn, ["N", 6], 0),
    "conv_scale": (conv_scale, ["N", 6, 3, 3], 0),
    "sequence_matmul_bn": (sequence_matmul_bn, ["N", 3, 6], 1),
}


def _out(name: str, rank: int) -> onnx.ValueInfoProto:
    """A float value of known rank and unknown sizes (the checker wants a shape on outputs)."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)


def in_place(block: Block, shape: list[int | str], place: str, seed: int) -> onnx.ModelProto:
    """The block at top level, in both branches of an If, in a Loop body (a scan output of
    each iteration), or in a Scan body (over slices of a longer input), in a model that
    declares no shapes of the values inside its bodies (only their outputs' ranks)."""
    b = GraphBuilder(seed=seed)
    if place == "top":
        b.outputs.append(_out(block(b, b.input("x", shape)), len(shape)))
        return model_of(b.nodes, b.inputs, b.outputs, b.initializers, opset=17, ir_version=8, infer=False)
    x = b.input("x", ["T", *shape] if place == "scan" else shape)
    bodies = []
    for _ in range(2 if place == "if" else 1):
        with b.collecting() as (nodes, initializers):
            result = block(b, "x_t" if place == "scan" else x)
            outputs = [_out(result, len(shape))]
            if place == "loop":
                outputs.insert(0, helper.make_tensor_value_info(b.node("Identity", ["cond_in"]), TensorProto.BOOL, []))
        bodies.append((nodes, initializers, outputs))
    if place == "if":
        then_branch, else_branch = (helper.make_graph(*body[:1], name, [], body[2], body[1])
                                    for body, name in zip(bodies, ("then", "else")))
        cond = b.input("cond", [], TensorProto.BOOL)
        b.nodes.append(helper.make_node("If", [cond], ["y"], name="branch",
                                        then_branch=then_branch, else_branch=else_branch))
    elif place == "loop":
        nodes, initializers, outputs = bodies[0]
        body_inputs = [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                       helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])]
        body = helper.make_graph(nodes, "body", body_inputs, outputs, initializers)
        trips, go = b.const("trips", np.array(2)), b.const("go", np.array(True))
        b.nodes.append(helper.make_node("Loop", [trips, go], ["y"], name="repeat", body=body))
    else:
        nodes, initializers, outputs = bodies[0]
        body = helper.make_graph(nodes, "body", [_out("x_t", len(shape))], outputs, initializers)
        b.nodes.append(helper.make_node("Scan", [x], ["y"], name="scan", body=body, num_scan_inputs=1))
    b.outputs.append(_out("y", len(shape) + (place != "if")))
    model = helper.make_model(helper.make_graph(b.nodes, "bodies", b.inputs, b.outputs, b.initializers),
                              opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


@settings(max_examples=30)
@given(block=st.sampled_from(sorted(BLOCKS)), place=st.sampled_from(["if", "loop", "scan"]),
       seed=st.integers(0, 2**16))
def test_bodies_fold_what_the_main_graph_folds(block: str, place: str, seed: int) -> None:
    build, shape, left_at_top = BLOCKS[block]
    top, top_outcome = fold_copy(in_place(build, shape, "top", seed))
    assert len(top_outcome.left) == left_at_top
    model = in_place(build, shape, place, seed)
    folded, outcome = fold_copy(model)
    copies = 2 if place == "if" else 1
    assert len(outcome.folds) == copies * len(top_outcome.folds), outcome
    assert len(outcome.left) == copies * left_at_top, outcome
    assert count_ops(folded, BN) == copies * count_ops(top, BN)
    assert count_ops(folded, "Mul") == copies * count_ops(top, "Mul")
    fixed = [{}] if place != "if" else list(conditions(["cond"]))
    assert_same_function(model, folded, [judge_feeds(model, seed, fixed=f) for f in fixed])
