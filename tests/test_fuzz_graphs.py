"""Fuzzing: random valid graphs fold into models that pass the checker and match in onnxruntime.

The strategy chains and branches Conv / ConvTranspose / Gemm / MatMul / BatchNormalization /
Relu / Add / Flatten with random shapes, groups, strides, pads and dilations, in float32 and
float16, with hostile BN statistics (tiny variance, large mean, zero scale), decomposed BNs
(Mul → Add by per-channel constants), constants that broadcast one channel to several, and If
nodes whose two branches both hold folds. The property: folding keeps the function (every If
branch taken), every BatchNormalization left has a reason, a broadcasting Mul is never folded. The absolute
tolerance scales with the output's magnitude (see tests/support.py): the hostile statistics
make outputs in the thousands next to elements near zero that come from cancellation, whose
rounding error (in the original as much as in the folded model) is relative to the large
terms. Folding bugs (a wrong axis, group or sign) give errors of the order of the values
themselves and are still caught.

CI runs a few hundred cases; ``pytest --hypothesis-profile=long tests/test_fuzz_graphs.py``
runs the long profile's count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from bnfold.inputs import generate_inputs, input_specs
from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare, op_count

CI_EXAMPLES = 300
# The active profile decides: at least the CI count, more under --hypothesis-profile=long.
EXAMPLES = max(CI_EXAMPLES, settings().max_examples)
MAX_SPATIAL = 12


@dataclass
class Tensor4D:
    """The running NCHW tensor of the graph being built."""

    name: str
    channels: int
    size: int


def hostile_batchnorm(draw: st.DrawFn, b: GraphBuilder, x: str, channels: int) -> str:
    """A BN whose statistics include the numerically awkward cases real models have."""
    rng = b.rng
    gamma = rng.uniform(0.5, 1.5, channels)
    mean = rng.normal(0, 0.5, channels)
    var = rng.uniform(0.5, 2.0, channels)
    # In half precision, amplifying statistics make the *original* model's own rounding
    # error (cancellation between large terms) larger than any fixed tolerance, so float16
    # graphs get realistic statistics; the overflow refusal has its own tests.
    quirks = ["plain", "zero_gamma"] if b.dtype == np.float16 else ["plain", "tiny_var", "large_mean", "zero_gamma"]
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


def per_channel_scale(draw: st.DrawFn, b: GraphBuilder, x: str, channels: int) -> str:
    """``x * c + d`` by per-channel constants (``[1, C, 1, 1]`` or ``[C, 1, 1]``): a decomposed BN."""
    shape = [1, channels, 1, 1] if draw(st.booleans()) else [channels, 1, 1]
    scaled = b.node("Mul", [x, b.const("c", b.rng.uniform(0.5, 1.5, shape).astype(b.dtype))])
    return b.node("Add", [scaled, b.random("d", shape)])


def same_shape_fold(draw: st.DrawFn, b: GraphBuilder, x: Tensor4D) -> str:
    """A foldable block that keeps ``x``'s shape: Conv → BN, BN → Conv or Mul → Add → Conv."""
    kind = draw(st.sampled_from(["conv_bn", "bn_conv", "scale_conv"]))
    if kind == "conv_bn":
        return hostile_batchnorm(draw, b, b.conv(x.name, x.channels, x.channels, (3, 3)), x.channels)
    normalized = (hostile_batchnorm(draw, b, x.name, x.channels) if kind == "bn_conv"
                  else per_channel_scale(draw, b, x.name, x.channels))
    return b.conv(normalized, x.channels, x.channels, (1, 1), pads=[0, 0, 0, 0])


def if_block(draw: st.DrawFn, b: GraphBuilder, x: Tensor4D) -> Tensor4D:
    """An If whose two branches both hold folds, with their own weights (the condition is a
    new graph input, which the property sets both ways)."""
    cond = b.input(b.fresh("cond"), [], TensorProto.BOOL)
    branches = []
    for name in ("then", "else"):
        with b.collecting() as (nodes, initializers):
            y = same_shape_fold(draw, b, x)
        declared = helper.make_tensor_value_info(y, b.elem_type, [2, x.channels, x.size, x.size])
        branches.append(helper.make_graph(nodes, name, [], [declared], initializers))
    return Tensor4D(b.node("If", [cond], then_branch=branches[0], else_branch=branches[1]), x.channels, x.size)


def broadcast_block(draw: st.DrawFn, b: GraphBuilder, x: Tensor4D) -> Tensor4D:
    """The channel mean times ``c[1, K, 1, 1]`` plus ``d``: constants that broadcast one
    channel to K, which must never be folded as a per-channel affine."""
    channels = draw(st.integers(2, 4))
    mean = b.node("ReduceMean", [x.name], axes=[1], keepdims=1)
    spread = b.node("Mul", [mean, b.random("c", [1, channels, 1, 1])])
    return Tensor4D(b.node("Add", [spread, b.random("d", [1, channels, 1, 1])]), channels, x.size)


def random_block(draw: st.DrawFn, b: GraphBuilder, x: Tensor4D) -> Tensor4D:
    kind = draw(st.sampled_from(["conv_bn", "conv_bn_relu", "convT_bn", "bn", "relu", "residual", "bn_conv", "bn_bn",
                                 "if", "broadcast", "scale"]))
    if kind == "if":
        return if_block(draw, b, x)
    if kind == "broadcast":
        return broadcast_block(draw, b, x)
    if kind == "scale":
        return Tensor4D(per_channel_scale(draw, b, x.name, x.channels), x.channels, x.size)
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


def random_head(draw: st.DrawFn, b: GraphBuilder, x: Tensor4D) -> str:
    kind = draw(st.sampled_from(["none", "gemm_bn", "matmul_bn", "bn_gemm"]))
    if kind == "none":
        return x.name
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [x.name])])
    out = draw(st.integers(1, 5))
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


def seeds_taking_every_branch(model: onnx.ModelProto) -> list[int]:
    """Input seeds under which every If condition is seen both true and false (one seed when
    the model has no If): each branch, and so each fold in it, is compared in onnxruntime."""
    specs = input_specs(model, {})
    conditions = [spec.name for spec in specs if spec.dtype == "bool"]
    seen: dict[str, set[bool]] = {name: set() for name in conditions}
    seeds = [0]
    for seed in range(64):
        feeds = generate_inputs(specs, seed)
        if any(bool(feeds[name]) not in seen[name] for name in conditions):
            seeds.append(seed)
            for name in conditions:
                seen[name].add(bool(feeds[name]))
        if all(len(values) == 2 for values in seen.values()):
            break
    return sorted(set(seeds))


def all_op_count(model: onnx.ModelProto, op_type: str) -> int:
    """How many ``op_type`` nodes the main graph and the If branches in it hold."""
    branches = [attribute.g for node in model.graph.node for attribute in node.attribute
                if attribute.type == onnx.AttributeProto.GRAPH]
    return op_count(model, op_type) + sum(node.op_type == op_type for graph in branches for node in graph.node)


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(model=random_models())
def test_random_graphs_fold_to_equivalent_models(model: onnx.ModelProto) -> None:
    batchnorms_before = all_op_count(model, "BatchNormalization")
    for seed in seeds_taking_every_branch(model):
        check = fold_and_compare(model, seed=seed, atol_scales_with_output=True)
    left = all_op_count(check.folded, "BatchNormalization")
    assert len(check.outcome.left) == left
    assert all(record.reason for record in check.outcome.left)
    folded_batchnorms = sum(record.kind == "BatchNormalization" for record in check.outcome.folds)
    assert batchnorms_before - folded_batchnorms == left
    # A Mul that broadcasts one channel to K is never folded away.
    means = {node.output[0] for node in model.graph.node if node.op_type == "ReduceMean"}
    broadcasts = {node.name for node in model.graph.node if node.op_type == "Mul" and node.input[0] in means}
    assert broadcasts <= {node.name for node in check.folded.graph.node}
