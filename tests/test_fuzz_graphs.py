"""Fuzzing: random valid graphs fold into models that pass the checker and match in onnxruntime.

The strategy chains and branches Conv / ConvTranspose / Gemm / MatMul / BatchNormalization /
Relu / Add / Flatten with random shapes, groups, strides, pads and dilations, in float32 and
float16, with hostile BN statistics (tiny variance, large mean, zero scale); per-channel Mul/Add
chains (decomposed BNs) before and after layers; Mul/Add constants that *broadcast* one channel
to many (``x[N,1,H,W]·c[1,C,1,1] + d`` around a Conv, ``x[N,1]·c[C] + d`` around a Gemm), which
are not per-channel affines; and If nodes whose two branches both hold folds and read outer
values and outer weights. The property: folding keeps the function, with the If condition
forced both ways so that both branches run, every BatchNormalization left has a reason, and no
node that broadcasts a channel is folded away. Loops run 0 to 2 times over bodies of the same
blocks, an If nested in them or not. The absolute
tolerance scales with the output's magnitude (see tests/support.py): the hostile statistics
make outputs in the thousands next to elements near zero that come from cancellation, whose
rounding error (in the original as much as in the folded model) is relative to the large
terms. Folding bugs (a wrong axis, group or sign) give errors of the order of the values
themselves and are still caught.

A second property runs the whole pipeline on random models with an If or a Loop (an If nested in
its body, or not): every body holding a fold is verified on its own (none withheld), and the
model is equivalent.

CI runs a few hundred cases; ``pytest --hypothesis-profile=long tests/test_fuzz_graphs.py``
runs the long profile's count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from tempfile import TemporaryDirectory
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnfold import fold_math
from bnfold.inputs import prepare_trials
from bnfold.io import store as store_module
from bnfold.options import VerifyOptions
from bnfold.pipeline import FoldOptions, fold_file
from bnfold.verify import Verification
from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare

CI_EXAMPLES = 300
# The active profile decides: at least the CI count, more under --hypothesis-profile=long.
EXAMPLES = max(CI_EXAMPLES, settings().max_examples)
# Whole-pipeline runs cost several onnxruntime sessions each: a tenth of the cases.
PIPELINE_EXAMPLES = max(20, EXAMPLES // 10)
MAX_SPATIAL = 12
BN = "BatchNormalization"


@dataclass
class Tensor4D:
    """The running NCHW tensor of the graph being built."""

    name: str
    channels: int
    size: int


class RealisticBuilder(GraphBuilder):
    """A builder whose BNs get realistic statistics only, for the pipeline property: it checks that
    bodies are extracted and verified with the command's default tolerances, which cannot judge
    outputs in the thousands next to elements near zero that come from cancellation. Hostile
    statistics are the first property's, whose tolerance scales with the output."""


def hostile_batchnorm(draw: st.DrawFn, b: GraphBuilder, x: str, channels: int) -> str:
    """A BN whose statistics include the numerically awkward cases real models have."""
    rng = b.rng
    gamma = rng.uniform(0.5, 1.5, channels)
    mean = rng.normal(0, 0.5, channels)
    var = rng.uniform(0.5, 2.0, channels)
    # In half precision, amplifying statistics make the *original* model's own rounding
    # error (cancellation between large terms) larger than any fixed tolerance, so float16
    # graphs get realistic statistics; the overflow refusal has its own tests.
    realistic = b.dtype == np.float16 or isinstance(b, RealisticBuilder)
    quirks = ["plain", "zero_gamma"] if realistic else ["plain", "tiny_var", "large_mean", "zero_gamma"]
    quirk = draw(st.sampled_from(quirks))
    if quirk == "tiny_var":
        var[rng.integers(channels)] = 1e-6
    elif quirk == "large_mean":
        mean *= 1e3
    elif quirk == "zero_gamma":
        gamma[rng.integers(channels)] = 0.0
    beta = rng.normal(0, 0.5, channels)
    names = [b.const(n, v.astype(b.dtype)) for n, v in zip(("gamma", "beta", "mean", "var"), (gamma, beta, mean, var))]
    epsilon = draw(st.sampled_from([1e-5, 1e-3]))
    return b.node("BatchNormalization", [x, *names], epsilon=epsilon)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def random_conv(draw: st.DrawFn, b: GraphBuilder, x: Tensor4D) -> Tensor4D:
    group = draw(st.sampled_from(divisors(x.channels)))
    out_channels = group * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    stride = draw(st.integers(1, 2))
    pad = draw(st.integers(0, kernel // 2 + 1))
    span = dilation * (kernel - 1) + 1
    if x.size + 2 * pad < span:
        pad = (span - x.size + 1) // 2
    out = (x.size + 2 * pad - span) // stride + 1
    name = b.conv(x.name, x.channels, out_channels, (kernel, kernel), group=group, bias=draw(st.booleans()),
                  strides=[stride, stride], pads=[pad] * 4, dilations=[dilation, dilation])
    return Tensor4D(name, out_channels, out)


def random_conv_transpose(draw: st.DrawFn, b: GraphBuilder, x: Tensor4D) -> Tensor4D:
    group = draw(st.sampled_from(divisors(x.channels)))
    out_per_group = draw(st.integers(1, 2))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    output_padding = draw(st.integers(0, stride - 1))
    out = stride * (x.size - 1) + output_padding + kernel
    if out > MAX_SPATIAL:
        return x
    weight = b.random("Wt", [x.channels, out_per_group, kernel, kernel], scale=0.5)
    inputs = [x.name, weight] + ([b.random("bt", [out_per_group * group], scale=0.1)] if draw(st.booleans()) else [])
    name = b.node("ConvTranspose", inputs, group=group, strides=[stride, stride], output_padding=[output_padding] * 2)
    return Tensor4D(name, out_per_group * group, out)


SPREAD = "spread"
"""Name prefix of a constant that broadcasts one channel to many: the node reading it must survive
folding (it is not a per-channel affine of its data)."""


def affine(draw: st.DrawFn, b: GraphBuilder, x: str, channels: int, shape: list[int], *,
           broadcast: bool = False) -> str:
    """``x · scale + shift`` or ``(x + shift) · scale`` by constants of ``channels`` entries shaped
    ``shape`` (e.g. [1, C, 1, 1] or [C]). With ``broadcast`` (``x`` has one channel), the first
    node's constant is named as broadcasting: only that node spreads the channel; the second one is
    an ordinary per-channel affine of the spread value."""
    order = ("Mul", "Add") if draw(st.booleans()) else ("Add", "Mul")
    y = x
    for position, op in enumerate(order):
        base = SPREAD if broadcast and position == 0 else ""
        if op == "Mul":
            constant = b.const(f"{base}scale", b.rng.uniform(0.5, 1.5, channels).reshape(shape).astype(b.dtype))
        else:
            constant = b.const(f"{base}shift", b.rng.normal(0, 0.5, channels).reshape(shape).astype(b.dtype))
        y = b.node(op, [y, constant])
    return y


def broadcast_block(draw: st.DrawFn, b: GraphBuilder, x: Tensor4D) -> Tensor4D:
    """One channel made into many by a broadcasting Mul/Add: ``y[N,1,H,W]·c[1,C,1,1] + d``, next to
    a Conv before it (one output channel) or after it (C input channels). Not a per-channel affine
    of ``y``: a fold that reads it as one drops the broadcast."""
    channels = draw(st.integers(2, 5))
    shape = draw(st.sampled_from([[1, channels, 1, 1], [channels, 1, 1]]))
    if draw(st.booleans()):
        single = b.conv(x.name, x.channels, 1, (1, 1), bias=draw(st.booleans()))
    else:
        single = b.node("ReduceMean", [x.name], axes=[1], keepdims=1)
    spread = affine(draw, b, single, channels, shape, broadcast=True)
    if draw(st.booleans()):
        return Tensor4D(spread, channels, x.size)
    return random_conv(draw, b, Tensor4D(spread, channels, x.size))


def random_block(draw: st.DrawFn, b: GraphBuilder, x: Tensor4D) -> Tensor4D:
    kind = draw(st.sampled_from(["conv_bn", "conv_bn_relu", "convT_bn", "bn", "relu", "residual", "bn_conv", "bn_bn",
                                 "conv_affine", "affine_conv", "scale", "broadcast", "if", "loop"]))
    if kind == "scale":  # a decomposed BN on its own, folded into whatever follows, if anything
        shape = [1, x.channels, 1, 1] if draw(st.booleans()) else [x.channels, 1, 1]
        return Tensor4D(affine(draw, b, x.name, x.channels, shape), x.channels, x.size)
    if kind == "if":
        return random_if(draw, b, x)
    if kind == "loop":
        return random_loop(draw, b, x)
    if kind == "broadcast":
        return broadcast_block(draw, b, x)
    if kind == "conv_affine":
        y = random_conv(draw, b, x)
        return Tensor4D(affine(draw, b, y.name, y.channels, [y.channels, 1, 1]), y.channels, y.size)
    if kind == "affine_conv":
        scaled = affine(draw, b, x.name, x.channels, [1, x.channels, 1, 1])
        return random_conv(draw, b, Tensor4D(scaled, x.channels, x.size))
    if kind in ("conv_bn", "conv_bn_relu"):
        y = random_conv(draw, b, x)
        y = Tensor4D(hostile_batchnorm(draw, b, y.name, y.channels), y.channels, y.size)
        return Tensor4D(b.node("Relu", [y.name]), y.channels, y.size) if kind == "conv_bn_relu" else y
    if kind == "convT_bn":
        y = random_conv_transpose(draw, b, x)
        return Tensor4D(hostile_batchnorm(draw, b, y.name, y.channels), y.channels, y.size)
    if kind == "bn":
        return Tensor4D(hostile_batchnorm(draw, b, x.name, x.channels), x.channels, x.size)
    if kind == "bn_bn":
        y = hostile_batchnorm(draw, b, x.name, x.channels)
        return Tensor4D(hostile_batchnorm(draw, b, y, x.channels), x.channels, x.size)
    if kind == "relu":
        return Tensor4D(b.node("Relu", [x.name]), x.channels, x.size)
    if kind == "bn_conv":
        normalized = Tensor4D(hostile_batchnorm(draw, b, x.name, x.channels), x.channels, x.size)
        return random_conv(draw, b, normalized)
    # residual: a same-shape Conv→BN branch added back onto its input
    branch = b.conv(x.name, x.channels, x.channels, (3, 3), bias=draw(st.booleans()))
    branch = hostile_batchnorm(draw, b, branch, x.channels)
    return Tensor4D(b.node("Add", [branch, x.name]), x.channels, x.size)


@dataclass
class OuterWeights:
    """A [C, C, 3, 3] Conv weight and C-channel BN parameters of the main graph, read in a branch."""

    channels: int
    weight: str
    parameters: list[str]


def same_size_block(draw: st.DrawFn, b: GraphBuilder, x: Tensor4D, outer: OuterWeights) -> Tensor4D:
    """A block that keeps the spatial size (an If's branches must agree on their output's shape)."""
    kind = draw(st.sampled_from(["conv_bn", "outer_conv_bn", "bn", "bn_bn", "relu", "conv_affine", "affine_conv",
                                 "bn_conv"]))
    if kind == "outer_conv_bn" and x.channels == outer.channels:
        y = b.node("Conv", [x.name, outer.weight], pads=[1, 1, 1, 1])
        return Tensor4D(b.node(BN, [y, *outer.parameters]), x.channels, x.size)
    if kind in ("conv_bn", "outer_conv_bn", "conv_affine", "affine_conv", "bn_conv"):
        kernel = draw(st.sampled_from([1, 3]))
        source = x.name
        if kind in ("affine_conv", "bn_conv"):
            source = (affine(draw, b, x.name, x.channels, [1, x.channels, 1, 1]) if kind == "affine_conv"
                      else hostile_batchnorm(draw, b, x.name, x.channels))
            kernel = 1  # an unpadded Conv absorbs the affine before it
        out = draw(st.integers(1, 4))
        y = b.conv(source, x.channels, out, (kernel, kernel), pads=[kernel // 2] * 4, bias=draw(st.booleans()))
        if kind == "conv_affine":
            return Tensor4D(affine(draw, b, y, out, [out, 1, 1]), out, x.size)
        return Tensor4D(y if kind in ("affine_conv", "bn_conv") else hostile_batchnorm(draw, b, y, out), out, x.size)
    if kind == "bn":
        return Tensor4D(hostile_batchnorm(draw, b, x.name, x.channels), x.channels, x.size)
    if kind == "bn_bn":
        y = hostile_batchnorm(draw, b, x.name, x.channels)
        return Tensor4D(hostile_batchnorm(draw, b, y, x.channels), x.channels, x.size)
    return Tensor4D(b.node("Relu", [x.name]), x.channels, x.size)


def random_branch(draw: st.DrawFn, b: GraphBuilder, x: Tensor4D, channels: int, outer: OuterWeights
                  ) -> onnx.GraphProto:
    """One If branch on the outer value ``x``: blocks, then Conv→BN to ``channels``."""
    with b.collecting() as (nodes, initializers):
        y = x
        for _ in range(draw(st.integers(0, 2))):
            y = same_size_block(draw, b, y, outer)
        # Ends with Conv→BN to the If's channels: every branch holds a fold.
        y = Tensor4D(hostile_batchnorm(draw, b, b.conv(y.name, y.channels, channels, (1, 1)), channels),
                     channels, x.size)
    output = helper.make_tensor_value_info(y.name, b.elem_type, ["N", channels, x.size, x.size])
    return helper.make_graph(nodes, b.fresh("branch"), [], [output], initializers)


def random_if(draw: st.DrawFn, b: GraphBuilder, x: Tensor4D) -> Tensor4D:
    """An If on the model's ``cond`` input whose two branches both hold folds."""
    if not any(value.name == "cond" for value in b.inputs):
        b.input("cond", [], TensorProto.BOOL)
    channels = draw(st.integers(1, 4))
    outer = OuterWeights(x.channels, b.random("W_outer", [x.channels, x.channels, 3, 3]),
                         b.batchnorm_parameters(x.channels))
    then_branch = random_branch(draw, b, x, channels, outer)
    else_branch = random_branch(draw, b, x, channels, outer)
    output = b.fresh("if_out")
    b.nodes.append(helper.make_node("If", ["cond"], [output], name=b.fresh("if"),
                                    then_branch=then_branch, else_branch=else_branch))
    return Tensor4D(output, channels, x.size)


def random_loop(draw: st.DrawFn, b: GraphBuilder, x: Tensor4D) -> Tensor4D:
    """A Loop run 0 to 2 times whose body adds the outer value ``x`` to its carried value, runs
    blocks (an If among them, nested in the body) and ends with Conv→BN back to ``x``'s shape."""
    trips = b.const("trips", np.array(draw(st.integers(0, 2)), dtype=np.int64))
    keep_going = b.const("keep_going", np.array(True))
    counter, condition, carried = b.fresh("i"), b.fresh("cond_in"), b.fresh("carried")
    outer = OuterWeights(x.channels, b.random("W_outer", [x.channels, x.channels, 3, 3]),
                         b.batchnorm_parameters(x.channels))
    with b.collecting() as (nodes, initializers):
        y = Tensor4D(b.node("Add", [carried, x.name]), x.channels, x.size)
        for _ in range(draw(st.integers(0, 2))):
            y = random_if(draw, b, y) if draw(st.booleans()) else same_size_block(draw, b, y, outer)
        y = Tensor4D(hostile_batchnorm(draw, b, b.conv(y.name, y.channels, x.channels, (1, 1)), x.channels),
                     x.channels, x.size)
        keep = b.node("Identity", [condition])
    shape = ["N", x.channels, x.size, x.size]
    body = helper.make_graph(
        nodes, b.fresh("body"),
        [helper.make_tensor_value_info(counter, TensorProto.INT64, []),
         helper.make_tensor_value_info(condition, TensorProto.BOOL, []),
         helper.make_tensor_value_info(carried, b.elem_type, shape)],
        [helper.make_tensor_value_info(keep, TensorProto.BOOL, []),
         helper.make_tensor_value_info(y.name, b.elem_type, shape)],
        initializers,
    )
    output = b.fresh("loop_out")
    b.nodes.append(helper.make_node("Loop", [trips, keep_going, x.name], [output], name=b.fresh("loop"), body=body))
    # Shape inference gives a Loop's carried outputs no shape; this Reshape (to the shape they
    # have) lets the graph outputs after it declare one, as the checker wants.
    return Tensor4D(b.node("Reshape", [output, b.node("Shape", [x.name])]), x.channels, x.size)


def random_head(draw: st.DrawFn, b: GraphBuilder, x: Tensor4D) -> str:
    kind = draw(st.sampled_from(["none", "gemm_bn", "matmul_bn", "bn_gemm", "broadcast_gemm", "gemm_broadcast"]))
    if kind == "none":
        return x.name
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [x.name])])
    out = draw(st.integers(1, 5))
    spread = draw(st.integers(2, 5))
    shape = draw(st.sampled_from([[spread], [1, spread]]))
    if kind == "broadcast_gemm":  # x[N,1]·c[C] + d before a Gemm: not a per-channel affine of x
        single = b.node("ReduceMean", [flat], axes=[1], keepdims=1)
        return b.gemm(affine(draw, b, single, spread, shape, broadcast=True), spread, out)
    if kind == "gemm_broadcast":  # a one-output Gemm whose output is then broadcast to C
        return affine(draw, b, b.gemm(flat, x.channels, 1), spread, shape, broadcast=True)
    if kind == "gemm_bn":
        return hostile_batchnorm(draw, b, b.gemm(flat, x.channels, out, trans_b=int(draw(st.booleans()))), out)
    if kind == "matmul_bn":
        return hostile_batchnorm(draw, b, b.node("MatMul", [flat, b.random("Wm", [x.channels, out])]), out)
    normalized = hostile_batchnorm(draw, b, flat, x.channels)
    return b.gemm(normalized, x.channels, out)


@st.composite
def random_models(draw: st.DrawFn) -> onnx.ModelProto:
    dtype = draw(st.sampled_from([np.float32, np.float32, np.float16]))
    b = GraphBuilder(seed=draw(st.integers(0, 2**31 - 1)), dtype=dtype)
    x = Tensor4D(b.input("x", [2, draw(st.integers(1, 6)), 8, 8]), 0, 8)
    x.channels = b.inputs[0].type.tensor_type.shape.dim[1].dim_value
    for _ in range(draw(st.integers(1, 2 if dtype == np.float16 else 5))):
        x = random_block(draw, b, x)
    b.output(random_head(draw, b, x))
    return b.model(f"fuzz_{np.dtype(dtype).name}")


def all_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of ``graph`` and of every body nested in it."""
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                nodes += all_nodes(attribute.g)
    return nodes


def all_ops(graph: onnx.GraphProto) -> list[str]:
    """Op types of ``graph`` and of every body nested in it."""
    return [node.op_type for node in all_nodes(graph)]


def condition_variants(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], ...]:
    """Both values of the If condition when the model has one, so that both branches run."""
    if any(value.name == "cond" for value in model.graph.input):
        return ({"cond": np.array(True)}, {"cond": np.array(False)})
    return ({},)


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(model=random_models())
def test_random_graphs_fold_to_equivalent_models(model: onnx.ModelProto) -> None:
    batchnorms_before = all_ops(model.graph).count(BN)
    check = fold_and_compare(model, atol_scales_with_output=True, input_variants=condition_variants(model))
    left = all_ops(check.folded.graph).count(BN)
    assert len(check.outcome.left) == left
    assert all(record.reason for record in check.outcome.left)
    folded_batchnorms = sum(record.kind == BN for record in check.outcome.folds)
    assert batchnorms_before - folded_batchnorms == left
    # The Mul or Add that broadcasts one channel to many is never folded away.
    broadcasts = {node.name for node in all_nodes(model.graph) if any(n.startswith(SPREAD) for n in node.input)}
    assert broadcasts <= {node.name for node in all_nodes(check.folded.graph)}


@st.composite
def random_body_models(draw: st.DrawFn) -> onnx.ModelProto:
    """float32 models with an If whose branches hold folds, or a Loop (maybe with an If in its
    body), among other blocks."""
    b = RealisticBuilder(seed=draw(st.integers(0, 2**31 - 1)))
    x = Tensor4D(b.input("x", ["N", draw(st.integers(1, 4)), 6, 6]), 0, 6)
    x.channels = b.inputs[0].type.tensor_type.shape.dim[1].dim_value
    if draw(st.booleans()):
        x = random_block(draw, b, x)
    x = random_loop(draw, b, x) if draw(st.booleans()) else random_if(draw, b, x)
    b.output(random_head(draw, b, x))
    return b.model("fuzz_bodies")


def _assert_within_rounding_at_the_outputs_scale(model: onnx.ModelProto, batch: int, verification: Verification) -> None:
    """A top-level output judged different is only allowed where the atol, scaled by the output's
    largest magnitude, covers it (as the in-memory fuzz test scales it): a Loop that multiplies
    its state each iteration reaches values in the thousands, where the float32 rounding of the
    folded weights alone moves a small element beyond a fixed atol (one-ulp changes of the
    original's own weights move it as far). Bodies are always held to the plain tolerance."""
    (trial,) = prepare_trials(model, VerifyOptions(batch=batch))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    scale = {name: max(1.0, float(np.max(np.abs(value[np.isfinite(value)]), initial=0.0)))
             for name, value in zip(names, session.run(None, trial.feeds))}
    assert verification.unverified_bodies == [] and all(body.passed for body in verification.bodies), verification
    for output in verification.outputs:
        assert not output.nonfinite_mismatch and output.problem is None, output
        assert output.max_abs_error <= output.atol * scale[output.name], output


@settings(max_examples=PIPELINE_EXAMPLES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(model=random_body_models(), batch=st.integers(1, 3))
def test_random_bodies_are_verified_on_their_own(model: onnx.ModelProto, batch: int) -> None:
    with TemporaryDirectory(prefix="bnfold-fuzz-") as folder:
        path = Path(folder) / "model.onnx"
        onnx.save(model, str(path))
        report = fold_file(path, FoldOptions(dry_run=True, verify_options=VerifyOptions(batch=batch)))
    verification = report.verification
    if report.status != "equivalent":
        _assert_within_rounding_at_the_outputs_scale(model, batch, verification)
    assert verification.unverified_bodies == []
    in_bodies = {fold.batchnorm.rsplit(" / ", 1)[0] for fold in report.folds if " / " in fold.batchnorm}
    assert {body.label for body in verification.bodies} == in_bodies
    assert all(body.passed for body in verification.bodies)


@settings(max_examples=PIPELINE_EXAMPLES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(model=random_models())
def test_random_graphs_stream_their_folds_when_every_tensor_is_mapped(model: onnx.ModelProto) -> None:
    """With external data and every tensor read as a map of its file, each folded weight is kept
    as a recipe and computed while the output is written: the run ends as the run that holds
    every folded weight as an array does, with the same records (rounding errors measured while
    writing) and the same values, bit for bit."""
    runs = {}
    with TemporaryDirectory(prefix="bnfold-fuzz-") as folder:
        path = Path(folder) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="model.data", size_threshold=0)
        for name, mapped_from in (("streamed", 1), ("arrays", 2**62)):
            output = Path(folder) / f"{name}.onnx"
            # blocks of 5 elements, pieces of 3 blocks: a small weight still spans several of each
            with mock.patch.object(store_module, "MAP_AT_LEAST", mapped_from), \
                    mock.patch.object(fold_math, "_BLOCK", 5), mock.patch.object(fold_math, "_PIECE_ELEMENTS", 15):
                report = fold_file(path, FoldOptions(output=output, keep_failed=True))
            values = {t.name: numpy_helper.to_array(t, base_dir=folder)
                      for t in onnx.load_model(str(output), load_external_data=False).graph.initializer}
            runs[name] = report, values
    (streamed, streamed_values), (arrays, array_values) = runs["streamed"], runs["arrays"]
    assert streamed.status == arrays.status
    assert streamed.folds == arrays.folds and streamed.left == arrays.left
    assert streamed_values.keys() == array_values.keys()
    for name, array in array_values.items():
        assert streamed_values[name].tobytes() == array.tobytes(), name
