"""Random small ONNX models in which a BatchNormalization must travel to be folded.

At inference a BN is the per-channel affine map ``y = s·x + t``. It folds into a layer
that is not its direct neighbour when every op in between commutes with that map:
pools, resizes, slices, pads, reshapes that keep channels as blocks, concats, Adds of
layers, pass-through nodes. Where an op does not commute (a max after a negative
scale, an average that counts padding, a constant pad after a shift) or a value on
the way is read by another node, the BN must stay.

One generator per class of op. Each draws its shapes and parameters from a
:class:`Choices` — :class:`RandomChoices` around a ``random.Random``, or
:class:`DrawChoices` around a hypothesis ``draw`` (:func:`travel_cases` gives the
strategy) — and returns a :class:`TravelCase`: the model and what an ideal fold of it
must do. Where it helps to check that statement, the case also carries a
``reference`` model: the BN's affine applied as Mul/Add at the layer that should
absorb it (or, for sibling branches, the branches merged into as few Convs as their kernels
allow). It computes
the same function as the model exactly when the BN may travel; for a BN that must
stay for a numerical reason it is the wrong fold, and differs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from math import gcd, prod
from typing import Protocol, TypeVar

import numpy as np
import onnx
from hypothesis import strategies as st

from sample_models.modelkit import GraphBuilder

T = TypeVar("T")

# The kind of reason for a BatchNormalization that must stay; a rule's reason should say as much.
NEGATIVE_SCALE = "negative scale"  # a max over a window: a negative s turns the max into a min
COUNTED_PADDING = "counted padding"  # AveragePool averages padded zeros in, scaling t at the border
PADDED_CONSTANT = "padded constant"  # a constant Pad's value does not go through s·x + t
OTHER_READER = "other reader"  # a value the fold would change is also read by another node
NOT_ABSORBABLE = "not absorbable"  # a Concat segment, Add operand or reader that is no layer
SCALE_VARIES = "scale varies within a channel"  # positions sharing one weight would need different scales
OTHER_AXIS = "another axis"  # the BN scales an axis that is not the layer's channel axis

SEED_LIMIT = 2**31 - 1


class Choices(Protocol):
    """Where a generator's decisions come from."""

    def integer(self, low: int, high: int) -> int:
        """An integer in ``[low, high]``."""
        ...

    def choice(self, options: Sequence[T]) -> T: ...

    def boolean(self) -> bool: ...


@dataclass
class RandomChoices:
    """Decisions from a ``random.Random`` (plain loops, benchmarks)."""

    rng: random.Random

    def integer(self, low: int, high: int) -> int:
        return self.rng.randint(low, high)

    def choice(self, options: Sequence[T]) -> T:
        return self.rng.choice(list(options))

    def boolean(self) -> bool:
        return self.rng.random() < 0.5


@dataclass
class DrawChoices:
    """Decisions from hypothesis, so failing cases shrink."""

    draw: st.DrawFn

    def integer(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def choice(self, options: Sequence[T]) -> T:
        return self.draw(st.sampled_from(list(options)))

    def boolean(self) -> bool:
        return self.draw(st.booleans())


@dataclass(frozen=True)
class TravelCase:
    """A generated model and what an ideal fold of it must do.

    ``refusals`` has one kind of reason (the constants above) per BatchNormalization that
    must stay; every other BN must fold. ``ops_after`` gives node counts the
    construction fixes after the fold (e.g. one Conv for sibling branches, a Gemm and no
    MatMul for a rank-2 linear layer). ``reference`` is described in the module's
    docstring; None where no such model says anything.
    """

    generator: str
    description: str
    model: onnx.ModelProto
    refusals: tuple[str, ...] = ()
    ops_after: dict[str, int] = field(default_factory=dict)
    reference: onnx.ModelProto | None = None

    @property
    def batchnorms(self) -> int:
        return sum(node.op_type == "BatchNormalization" for node in self.model.graph.node)

    @property
    def batchnorms_left(self) -> int:
        return len(self.refusals)


# -- building blocks -----------------------------------------------------------------------


@dataclass(frozen=True)
class BatchNormParameters:
    """A BN's statistics, float64; ``scale`` and ``shift`` are the map ``s·x + t`` they compute."""

    gamma: np.ndarray
    beta: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float

    @property
    def scale(self) -> np.ndarray:
        return self.gamma / np.sqrt(self.var + self.epsilon)

    @property
    def shift(self) -> np.ndarray:
        return self.beta - self.mean * self.scale


def draw_batchnorm(choose: Choices, channels: int, *, negative: bool, zero_shift: bool = False) -> BatchNormParameters:
    """Random statistics; with ``negative`` some γ (at least one) are negative; with
    ``zero_shift`` mean and β are 0, so ``t`` is exactly 0."""
    rng = np.random.default_rng(choose.integer(0, SEED_LIMIT))
    gamma = rng.uniform(0.5, 1.5, channels)
    if negative:
        signs = rng.choice([-1.0, 1.0], channels)
        signs[rng.integers(channels)] = -1.0
        gamma *= signs
    mean = np.zeros(channels) if zero_shift else rng.normal(0.0, 1.0, channels)
    beta = np.zeros(channels) if zero_shift else rng.normal(0.0, 0.5, channels)
    return BatchNormParameters(gamma, beta, mean, rng.uniform(0.5, 2.0, channels), choose.choice((1e-5, 1e-3)))


@dataclass
class Value:
    """A tensor of the graph being built and its static shape."""

    name: str
    shape: list[int]


def add_batchnorm(b: GraphBuilder, x: Value, bn: BatchNormParameters) -> Value:
    parameters = [b.const(base, values.astype(b.dtype))
                  for base, values in zip(("gamma", "beta", "mean", "var"), (bn.gamma, bn.beta, bn.mean, bn.var))]
    return Value(b.node("BatchNormalization", [x.name, *parameters], epsilon=bn.epsilon), x.shape)


def add_affine(b: GraphBuilder, x: Value, scale: np.ndarray, shift: np.ndarray | None, axis: int) -> Value:
    """``x·scale + shift`` with both laid along ``axis`` of ``x``: a BN's map placed elsewhere."""
    broadcast = [1] * (len(x.shape) - axis - 1) if axis >= 0 else [1] * (-axis - 1)
    shape = [len(scale), *broadcast]
    out = b.node("Mul", [x.name, b.const("s", scale.reshape(shape).astype(b.dtype))])
    if shift is not None:
        out = b.node("Add", [out, b.const("t", shift.reshape(shape).astype(b.dtype))])
    return Value(out, x.shape)


def ints(b: GraphBuilder, base: str, values: int | Sequence[int]) -> str:
    """An int64 constant: a scalar or a vector."""
    return b.const(base, np.array(values, np.int64))


def ir_version(opset: int) -> int:
    """The IR version that onnx pairs with ``opset`` (IR 8 reaches opset 18, IR 9 opset 20)."""
    return 8 if opset <= 18 else 9


def finish(b: GraphBuilder, outputs: Sequence[Value], opset: int) -> onnx.ModelProto:
    for value in outputs:
        b.output(value.name, value.shape or None)
    return b.model("travel", opset=opset, ir_version=ir_version(opset))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def conv_output(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int = 1) -> int:
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


@dataclass(frozen=True)
class ConvSpec:
    """A drawn Conv (NCHW); its weights come from the builder's seeded rng when built."""

    c_in: int
    c_out: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]
    group: int
    bias: bool

    def output_size(self, size: Sequence[int]) -> list[int]:
        return [conv_output(size[i], self.kernel[i], self.strides[i], self.pads[i], self.pads[i + 2]) for i in (0, 1)]

    def build(self, b: GraphBuilder, x: Value) -> Value:
        name = b.conv(x.name, self.c_in, self.c_out, self.kernel, group=self.group, bias=self.bias,
                      strides=list(self.strides), pads=list(self.pads))
        return Value(name, [x.shape[0], self.c_out, *self.output_size(x.shape[2:])])


def draw_conv(choose: Choices, c_in: int, c_out: int, size: Sequence[int], *, min_output: int = 1) -> ConvSpec:
    """A random Conv: kernel 1-3, stride 1-2, pads within the kernel, any common group;
    falls back to stride 1 and centered padding when the output would be smaller than
    ``min_output``."""
    kernel = (choose.integer(1, 3), choose.integer(1, 3))
    strides = (choose.integer(1, 2), choose.integer(1, 2))
    pads = tuple(choose.integer(0, kernel[i % 2] - 1) for i in range(4))
    spec = ConvSpec(c_in, c_out, kernel, strides, pads,  # type: ignore[arg-type]
                    choose.choice(divisors(gcd(c_in, c_out))), choose.boolean())
    if min(spec.output_size(size)) < min_output:
        centered = (kernel[0] // 2, kernel[1] // 2) * 2
        spec = ConvSpec(c_in, c_out, kernel, (1, 1), centered, spec.group, spec.bias)  # type: ignore[arg-type]
    return spec


def spatial_input(choose: Choices, b: GraphBuilder, low: int = 3, high: int = 7) -> Value:
    shape = [choose.integer(1, 2), choose.integer(1, 4), choose.integer(low, high), choose.integer(low, high)]
    return Value(b.input("x", shape), shape)


def relu(b: GraphBuilder, x: Value) -> Value:
    return Value(b.node("Relu", [x.name]), x.shape)


def activation(b: GraphBuilder, x: Value) -> Value:
    """What follows a BN: LeakyRelu takes no BN forward, and unlike Relu it hides no sign,
    so a reference that differs from the model shows at the output."""
    return Value(b.node("LeakyRelu", [x.name], alpha=0.1), x.shape)


def case_with_reference(
    generator: str, description: str, build: Callable[[bool], onnx.ModelProto], refusals: tuple[str, ...],
    **extra: object,
) -> TravelCase:
    """The model (``build(False)``) and its reference (``build(True)``), built from one seed."""
    return TravelCase(generator, description, build(False), refusals, reference=build(True), **extra)  # type: ignore[arg-type]


# -- pools --------------------------------------------------------------------------------------


def pool_windows(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int,
                 ceil_mode: bool) -> list[list[int]]:
    """The input positions each output of a pool reads along one axis (below 0 or from
    ``size`` on: padding). With ``ceil_mode`` a last window that would start in the end
    padding is dropped."""
    span = dilation * (kernel - 1) + 1
    room = size + pad_begin + pad_end - span
    count = (-(-room // stride) if ceil_mode else room // stride) + 1
    if ceil_mode and (count - 1) * stride >= size + pad_begin:
        count -= 1
    return [[i * stride - pad_begin + j * dilation for j in range(kernel)] for i in range(count)]


def most_real_values(windows: list[list[int]], size: int) -> int:
    return max(sum(0 <= position < size for position in window) for window in windows)


def reads_padding(windows: list[list[int]], size: int, pad_end: int) -> bool:
    """Whether a window reaches into the padding (not just past it, where ``ceil_mode``
    windows may hang over and nothing is counted)."""
    return any(position < 0 or size <= position < size + pad_end for window in windows for position in window)


POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")
MAX_POOLS = ("MaxPool", "GlobalMaxPool", "ReduceMax")


def pool_case(choose: Choices) -> TravelCase:
    """Conv → pool → BN → LeakyRelu. Average pools and means commute with ``s·x + t`` unless
    padded zeros are counted; max pools only when every ``s`` is positive."""
    op = choose.choice(POOLS)
    opset = choose.choice((13, 18))
    seed = choose.integer(0, SEED_LIMIT)
    shape = [choose.integer(1, 2), choose.integer(1, 4), choose.integer(3, 7), choose.integer(3, 7)]
    channels = choose.integer(1, 6)
    conv = draw_conv(choose, shape[1], channels, shape[2:], min_output=2)
    pooled_size = conv.output_size(shape[2:])
    attributes: dict[str, object] = {}
    axes: list[int] = []
    refusals: tuple[str, ...] = ()
    if op in ("MaxPool", "AveragePool"):
        kernel = [choose.integer(1, min(3, pooled_size[i])) for i in (0, 1)]
        if op == "MaxPool" and kernel == [1, 1]:
            kernel[0] = 2  # a 1x1 max is a subsampling, which commutes whatever the sign
        pads = [choose.integer(0, kernel[i % 2] - 1) for i in range(4)]
        strides = [choose.integer(1, 2), choose.integer(1, 2)]
        ceil_mode = choose.boolean()
        dilations = [choose.integer(1, 2), 1] if op == "MaxPool" and choose.boolean() else [1, 1]
        if conv_output(pooled_size[0], kernel[0], 1, pads[0], pads[2], dilations[0]) < 1:
            dilations = [1, 1]
        windows = [pool_windows(pooled_size[i], kernel[i], strides[i], pads[i], pads[i + 2], dilations[i], ceil_mode)
                   for i in (0, 1)]
        if op == "MaxPool" and prod(most_real_values(windows[i], pooled_size[i]) for i in (0, 1)) < 2:
            pads, dilations = [0, 0, 0, 0], [1, 1]  # no window compares two real values: the max never picks
        attributes = {"kernel_shape": kernel, "strides": strides, "pads": pads, "ceil_mode": int(ceil_mode)}
        if dilations != [1, 1]:
            attributes["dilations"] = dilations
        if op == "AveragePool":
            attributes["count_include_pad"] = int(choose.boolean())
            padded = any(reads_padding(windows[i], pooled_size[i], pads[i + 2]) for i in (0, 1))
            if attributes["count_include_pad"] and padded:
                refusals = (COUNTED_PADDING,)
    elif op in ("ReduceMean", "ReduceMax"):
        axes = choose.choice(([2], [3], [2, 3], [-1], [-2, -1]))
        attributes["keepdims"] = int(choose.boolean())
    negative = choose.boolean()
    if op in MAX_POOLS and negative:
        refusals = (NEGATIVE_SCALE,)
    bn = draw_batchnorm(choose, channels, negative=negative)

    def build(moved: bool) -> onnx.ModelProto:
        b = GraphBuilder(seed)
        y = conv.build(b, Value(b.input("x", shape), shape))
        if moved:
            y = add_affine(b, y, bn.scale, bn.shift, axis=1)
        inputs = [y.name]
        node_attributes = dict(attributes)
        if axes and opset >= 18:
            inputs.append(ints(b, "axes", axes))
        elif axes:
            node_attributes["axes"] = axes
        pooled = Value(b.node(op, inputs, **node_attributes), [])
        if not moved:
            pooled = add_batchnorm(b, pooled, bn)
        return finish(b, [activation(b, pooled)], opset)

    return case_with_reference("pool", f"{op} {attributes} axes={axes} opset={opset} negative γ={negative}",
                               build, refusals)


# -- resize --------------------------------------------------------------------------------------


def resize_case(choose: Choices) -> TravelCase:
    """Conv → Resize (or opset 9's Upsample) → BN → LeakyRelu. Nearest picks one value and
    linear / cubic take weights summing to 1, so ``s·x + t`` always commutes."""
    opset = choose.choice((9, 11, 13, 18, 19))
    seed = choose.integer(0, SEED_LIMIT)
    shape = [choose.integer(1, 2), choose.integer(1, 4), choose.integer(2, 5), choose.integer(2, 5)]
    channels = choose.integer(1, 5)
    conv = draw_conv(choose, shape[1], channels, shape[2:])
    size = conv.output_size(shape[2:])
    attributes: dict[str, object] = {"mode": choose.choice(("nearest", "linear") if opset == 9
                                                           else ("nearest", "linear", "cubic"))}
    use_sizes = opset > 9 and choose.boolean()
    factors = [choose.choice((1.0, 2.0, 3.0) if opset == 9 else (0.5, 1.0, 1.5, 2.0, 3.0)) for _ in range(2)]
    sizes = [choose.integer(1, 2 * n + 1) for n in size]
    if opset > 9:
        attributes["coordinate_transformation_mode"] = choose.choice(
            ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric"))
        if attributes["mode"] == "nearest":
            attributes["nearest_mode"] = choose.choice(("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"))
        if attributes["mode"] == "cubic":
            attributes["cubic_coeff_a"] = choose.choice((-0.75, -0.5))
            attributes["exclude_outside"] = int(choose.boolean())
        if opset >= 18 and attributes["mode"] != "nearest":
            attributes["antialias"] = int(choose.boolean())
    bn = draw_batchnorm(choose, channels, negative=choose.boolean())

    def build(moved: bool) -> onnx.ModelProto:
        b = GraphBuilder(seed)
        y = conv.build(b, Value(b.input("x", shape), shape))
        if moved:
            y = add_affine(b, y, bn.scale, bn.shift, axis=1)
        scales = b.const("scales", np.array([1.0, 1.0, *factors], np.float32))
        if opset == 9:
            inputs = [y.name, scales]
        else:
            empty = b.const("empty", np.zeros(0, np.float32))
            roi = empty if opset == 11 else ""
            inputs = ([y.name, roi, empty if opset == 11 else "", ints(b, "sizes", [*y.shape[:2], *sizes])]
                      if use_sizes else [y.name, roi, scales])
        resized = Value(b.node("Upsample" if opset == 9 else "Resize", inputs, **attributes), [])
        if not moved:
            resized = add_batchnorm(b, resized, bn)
        return finish(b, [activation(b, resized)], opset)

    target = f"sizes={sizes}" if use_sizes else f"scales={factors}"
    return case_with_reference("resize", f"{attributes} {target} opset={opset}", build, ())


# -- slice, split, pad --------------------------------------------------------------------------

BIG = 2**62


def draw_slice(choose: Choices, length: int) -> tuple[int, int, int]:
    """start, end, step on an axis of ``length`` (ONNX and Python agree on these), never empty."""
    step = choose.choice((1, 1, 2, -1, -2))
    start = choose.choice((choose.integer(-length, length), BIG if step > 0 else -BIG))
    end = choose.choice((choose.integer(-length, length), BIG if step > 0 else -BIG))
    if step > 0 and start == -BIG or step < 0 and start == BIG:
        start = 0 if step > 0 else length
    if not len(range(length)[slice(start, end, step)]):
        return 0, BIG, 1
    return start, end, step


def slice_case(choose: Choices) -> TravelCase:
    """Conv → Slice on spatial (or batch) axes → BN → LeakyRelu: a slice keeps every channel,
    so the BN folds into the Conv."""
    opset = choose.choice((9, 10, 13))
    seed = choose.integer(0, SEED_LIMIT)
    shape = [choose.integer(1, 2), choose.integer(1, 4), choose.integer(3, 7), choose.integer(3, 7)]
    channels = choose.integer(1, 5)
    conv = draw_conv(choose, shape[1], channels, shape[2:])
    out_shape = [shape[0], channels, *conv.output_size(shape[2:])]
    candidates = [2, 3] + ([0] if shape[0] > 1 else [])
    axes = [axis for axis in candidates if choose.boolean()] or [choose.choice(candidates)]
    bounds = [draw_slice(choose, out_shape[axis]) for axis in axes]
    if opset == 9:  # no steps before opset 10
        bounds = [(start, end, 1) if step == 1 else (0, BIG, 1) for start, end, step in bounds]
    # negative axes from opset 10 on
    written_axes = [axis - 4 if axis and opset > 9 and choose.boolean() else axis for axis in axes]
    bn = draw_batchnorm(choose, channels, negative=choose.boolean())

    def build(moved: bool) -> onnx.ModelProto:
        b = GraphBuilder(seed)
        y = conv.build(b, Value(b.input("x", shape), shape))
        if moved:
            y = add_affine(b, y, bn.scale, bn.shift, axis=1)
        starts, ends, steps = (list(values) for values in zip(*bounds))
        if opset == 9:
            sliced = b.node("Slice", [y.name], starts=starts, ends=ends, axes=written_axes)
        else:
            sliced = b.node("Slice", [y.name, ints(b, "starts", starts), ints(b, "ends", ends),
                                      ints(b, "axes", written_axes), ints(b, "steps", steps)])
        kept = [len(range(out_shape[axis])[slice(*bound)]) for axis, bound in zip(axes, bounds)]
        out = Value(sliced, [dict(zip(axes, kept)).get(axis, n) for axis, n in enumerate(out_shape)])
        if not moved:
            out = add_batchnorm(b, out, bn)
        return finish(b, [activation(b, out)], opset)

    return case_with_reference("slice", f"axes={written_axes} bounds={bounds} opset={opset}", build, ())


def split_case(choose: Choices) -> TravelCase:
    """Split on a spatial axis, either way round.

    Backward: Conv → Split → BN on one part: the other parts read the Conv too, so the
    BN stays. Forward: BN → Split → an unpadded Conv on every part: each Conv absorbs
    the BN, unless one part goes to a Relu instead.
    """
    opset = choose.choice((11, 13, 18))
    forward = choose.boolean()
    b = GraphBuilder(choose.integer(0, SEED_LIMIT))
    x = spatial_input(choose, b, 4, 8)
    bn = draw_batchnorm(choose, x.shape[1], negative=choose.boolean())
    split_input = add_batchnorm(b, x, bn) if forward else \
        draw_conv(choose, x.shape[1], x.shape[1], x.shape[2:], min_output=3).build(b, x)
    axis = choose.choice((2, 3))
    length = split_input.shape[axis]
    count = choose.integer(2, 3)
    attributes: dict[str, object] = {}
    if opset >= 18 and length % count == 0 and choose.boolean():
        parts, attributes = [length // count] * count, {"num_outputs": count}
    else:
        cuts = sorted({choose.integer(1, length - 1) for _ in range(count - 1)})
        parts = [high - low for low, high in zip([0, *cuts], [*cuts, length])]
        attributes = {"split": parts} if opset < 13 else {}
    written_axis = axis - 4 if choose.boolean() else axis
    inputs = [split_input.name] + ([ints(b, "split", parts)] if opset >= 13 and "num_outputs" not in attributes else [])
    first = b.node("Split", inputs, len(parts), axis=written_axis, **attributes)
    # GraphBuilder names the outputs first, first1, first2, …
    pieces = [Value(first if i == 0 else f"{first}{i}", [*split_input.shape[:axis], size, *split_input.shape[axis + 1:]])
              for i, size in enumerate(parts)]
    refusals: tuple[str, ...] = ()
    if forward:
        outputs = []
        for piece in pieces:
            if choose.integer(0, 4) == 0:
                refusals = (NOT_ABSORBABLE,)
                outputs.append(relu(b, piece))
                continue
            kernel = [1, 1]
            kernel[axis - 2] = choose.integer(1, min(3, piece.shape[axis]))
            spec = ConvSpec(x.shape[1], choose.integer(1, 4), (kernel[0], kernel[1]), (1, 1), (0, 0, 0, 0), 1,
                            choose.boolean())
            outputs.append(spec.build(b, piece))
    else:
        outputs = [activation(b, add_batchnorm(b, pieces[0], bn)), *pieces[1:]]
        refusals = (OTHER_READER,)
    model = finish(b, outputs, opset)
    direction = "forward" if forward else "backward"
    return TravelCase("split", f"{direction} axis={written_axis} parts={parts} opset={opset}", model, refusals)


def pad_case(choose: Choices) -> TravelCase:
    """Conv → Pad on H and W → BN → LeakyRelu. Reflect, edge and wrap pads copy real values, so
    they commute; a constant pad only when ``t = 0`` and the value is 0."""
    opset = choose.choice((10, 13, 19))
    mode = choose.choice(("constant", "reflect", "edge", "wrap") if opset >= 19 else ("constant", "reflect", "edge"))
    seed = choose.integer(0, SEED_LIMIT)
    shape = [choose.integer(1, 2), choose.integer(1, 4), choose.integer(3, 7), choose.integer(3, 7)]
    channels = choose.integer(1, 5)
    conv = draw_conv(choose, shape[1], channels, shape[2:], min_output=3)
    spatial = [choose.integer(0, 2) for _ in range(4)]
    if not any(spatial):
        spatial[choose.integer(0, 3)] = 1
    value = choose.choice((0.0, 0.0, 1.5, -0.7)) if mode == "constant" else 0.0
    zero_shift = choose.boolean()
    with_axes = opset >= 19 and choose.boolean()
    refusals = (PADDED_CONSTANT,) if mode == "constant" and not (zero_shift and value == 0.0) else ()
    bn = draw_batchnorm(choose, channels, negative=choose.boolean(), zero_shift=zero_shift)

    def build(moved: bool) -> onnx.ModelProto:
        b = GraphBuilder(seed)
        y = conv.build(b, Value(b.input("x", shape), shape))
        if moved:
            y = add_affine(b, y, bn.scale, bn.shift, axis=1)
        pads = [0, 0, spatial[0], spatial[1], 0, 0, spatial[2], spatial[3]]
        if opset == 10:
            padded = b.node("Pad", [y.name], mode=mode, pads=pads, value=value)
        else:
            inputs = [y.name, ints(b, "pads", spatial if with_axes else pads),
                      b.const("value", np.array(value, np.float32))]
            if with_axes:
                inputs.append(ints(b, "axes", [2, 3]))
            padded = b.node("Pad", inputs, mode=mode)
        out = Value(padded, [])
        if not moved:
            out = add_batchnorm(b, out, bn)
        return finish(b, [activation(b, out)], opset)

    description = f"mode={mode} pads={spatial} value={value} t=0: {zero_shift} opset={opset}"
    return case_with_reference("pad", description, build, refusals)


# -- reshape and flatten ------------------------------------------------------------------------

RESHAPES = ("linear-view", "conv-flatten", "conv-merge-channels", "flatten-spatial", "split-channels")


def reshape_case(choose: Choices) -> TravelCase:
    """A layer → Reshape / Flatten → BN → LeakyRelu.

    The BN folds backward when each channel of the layer lands in one BN channel:
    ``fc(z).view(-1, C, H, W)`` (each feature is a channel of its own), a Conv whose
    ``[N, C, 1, 1]`` output is flattened, a reshape merging whole Conv channels. It stays
    when one Conv channel spreads over several BN channels (flatten of a ``H·W > 1`` map,
    a reshape splitting channels): positions that share a weight would need different
    scales.
    """
    kind = choose.choice(RESHAPES)
    seed = choose.integer(0, SEED_LIMIT)
    batch = choose.integer(1, 3)
    negative = choose.boolean()
    refusals: tuple[str, ...] = (SCALE_VARIES,) if kind in ("flatten-spatial", "split-channels") else ()
    channels = choose.integer(1, 4)
    if kind == "linear-view":
        rest = [choose.integer(1, 3) for _ in range(choose.integer(1, 2))]
        features = channels * prod(rest)
        k = choose.integer(1, 6)
        layer = choose.choice(("Gemm", "MatMul", "MatMul+Add"))
        batch_dim = choose.choice((batch, 0, -1))
        runtime_shape = choose.boolean()
        trans_b = choose.boolean()
        bn = draw_batchnorm(choose, channels, negative=negative)
        description = f"{layer} [N,{features}] → [{batch_dim},{channels},{rest}] runtime shape={runtime_shape}"

        def build(moved: bool) -> onnx.ModelProto:
            b = GraphBuilder(seed)
            x = b.input("x", [batch, k])
            if layer == "Gemm":
                y = b.gemm(x, k, features, trans_b=int(trans_b))
            else:
                y = b.node("MatMul", [x, b.random("W", [k, features])])
                if layer == "MatMul+Add":
                    y = b.node("Add", [y, b.random("c", [features], scale=0.1)])
            value = Value(y, [batch, features])
            if moved:
                value = add_affine(b, value, np.repeat(bn.scale, prod(rest)), np.repeat(bn.shift, prod(rest)), -1)
            if runtime_shape:
                first = b.node("Shape", [x], start=0, end=1)
                target = b.node("Concat", [first, ints(b, "dims", [channels, *rest])], axis=0)
            else:
                target = ints(b, "shape", [batch_dim, channels, *rest])
            out = Value(b.node("Reshape", [value.name, target]), [batch, channels, *rest])
            if not moved:
                out = add_batchnorm(b, out, bn)
            return finish(b, [activation(b, out)], 15)

        return case_with_reference("reshape", f"{kind}: {description}", build, refusals)

    shape = [batch, choose.integer(1, 3), choose.integer(1, 4), choose.integer(1, 4)]
    group = choose.integer(2, 3)
    if kind == "conv-flatten":
        conv = ConvSpec(shape[1], channels, (shape[2], shape[3]), (1, 1), (0, 0, 0, 0), 1, choose.boolean())
        flatten = choose.choice(("Flatten", "Reshape [0,-1]", "Reshape [N,C]", "Squeeze"))
        bn_channels, repeat = channels, 1
    elif kind == "conv-merge-channels":
        conv = draw_conv(choose, shape[1], channels * group, shape[2:])
        flatten, bn_channels, repeat = "Reshape merge", channels, group
    elif kind == "split-channels":
        conv = draw_conv(choose, shape[1], channels, shape[2:])
        flatten, bn_channels, repeat = "Reshape split", channels * group, 0
        shape[2] = shape[2] * group  # room for H·W / group positions per part
    else:  # flatten-spatial
        shape[2] = max(shape[2], 2)
        conv = ConvSpec(shape[1], channels, (1, 1), (1, 1), (0, 0, 0, 0), 1, choose.boolean())
        flatten, bn_channels, repeat = "Flatten", channels * shape[2] * shape[3], 0
    out_size = conv.output_size(shape[2:])
    if kind == "split-channels" and (out_size[0] * out_size[1]) % group:
        conv = ConvSpec(conv.c_in, conv.c_out, (1, 1), (1, 1), (0, 0, 0, 0), conv.group, conv.bias)
        out_size = conv.output_size(shape[2:])
    if kind == "flatten-spatial":
        bn_channels = channels * out_size[0] * out_size[1]
    bn = draw_batchnorm(choose, bn_channels, negative=negative)

    def build_conv(moved: bool) -> onnx.ModelProto:
        b = GraphBuilder(seed)
        y = conv.build(b, Value(b.input("x", shape), shape))
        if moved:
            y = add_affine(b, y, np.repeat(bn.scale, repeat), np.repeat(bn.shift, repeat), axis=1)
        area = out_size[0] * out_size[1]
        if flatten == "Flatten":
            out = b.node("Flatten", [y.name], axis=1)
        elif flatten == "Squeeze":
            out = b.node("Squeeze", [y.name, ints(b, "axes", [2, 3])])
        else:
            target = {"Reshape [0,-1]": [0, -1], "Reshape [N,C]": [batch, channels],
                      "Reshape merge": [batch, channels, group * area],
                      "Reshape split": [batch, channels * group, area // group]}[flatten]
            out = b.node("Reshape", [y.name, ints(b, "shape", target)])
        value = Value(out, [])
        if not moved:
            value = add_batchnorm(b, value, bn)
        return finish(b, [activation(b, value)], 13)

    description = f"{kind}: Conv {conv} on {shape} → {flatten} → BN({bn_channels})"
    if refusals:
        return TravelCase("reshape", description, build_conv(False), refusals)
    return case_with_reference("reshape", description, build_conv, refusals)


# -- concat and add -------------------------------------------------------------------------------

SOURCES = ("conv", "conv", "conv", "shared", "relu", "input")


def refusal_for(kinds: Sequence[str]) -> tuple[str, ...]:
    """Why a BN over these operands must stay: the first operand no layer can take decides."""
    for kind in kinds:
        if kind == "shared":
            return (OTHER_READER,)
        if kind in ("relu", "input"):
            return (NOT_ABSORBABLE,)
    return ()


def source(b: GraphBuilder, kind: str, index: int, shape: list[int], c_in: int, outputs: list[Value]) -> Value:
    """An operand of ``shape``: a Conv on an input of its own (``shared``: also a graph
    output), a Relu of such a Conv, or a graph input itself."""
    if kind == "input":
        return Value(b.input(f"x{index}", shape), shape)
    x = Value(b.input(f"x{index}", [shape[0], c_in, *shape[2:]]), [shape[0], c_in, *shape[2:]])
    y = b.conv(x.name, c_in, shape[1], (3, 3), pads=[1, 1, 1, 1])
    value = Value(y, shape)
    if kind == "shared":
        outputs.append(Value(b.node("Identity", [y]), shape))
    return relu(b, value) if kind == "relu" else value


def concat_case(choose: Choices) -> TravelCase:
    """BN(Concat(a, b, …)) → LeakyRelu. Along channels the BN splits into one piece per
    segment; along H or W every segment takes the whole BN. It folds when every segment
    is a layer read only by the Concat."""
    seed = choose.integer(0, SEED_LIMIT)
    axis = choose.choice((1, 1, 2, 3))
    written_axis = axis - 4 if choose.boolean() else axis
    count = choose.integer(2, 4)
    absorbable_only = choose.boolean()
    kinds = [choose.choice(("conv",) if absorbable_only else SOURCES) for _ in range(count)]
    base = [choose.integer(1, 2), choose.integer(1, 3), choose.integer(2, 4), choose.integer(2, 4)]
    c_in = choose.integer(1, 3)
    shapes = []
    for _ in kinds:
        shape = list(base)
        shape[axis] = choose.integer(1, 3)
        shapes.append(shape)
    total = [*base[:axis], sum(shape[axis] for shape in shapes), *base[axis + 1:]]
    bn = draw_batchnorm(choose, total[1], negative=choose.boolean())
    refusals = refusal_for(kinds)

    def build(moved: bool) -> onnx.ModelProto:
        b = GraphBuilder(seed)
        outputs: list[Value] = []
        segments = []
        offset = 0
        for index, (kind, shape) in enumerate(zip(kinds, shapes)):
            segment = source(b, kind, index, shape, c_in, outputs)
            if moved:
                piece = slice(offset, offset + shape[1]) if axis == 1 else slice(None)
                segment = add_affine(b, segment, bn.scale[piece], bn.shift[piece], axis=1)
            offset += shape[1]
            segments.append(segment.name)
        out = Value(b.node("Concat", segments, axis=written_axis), total)
        if not moved:
            out = add_batchnorm(b, out, bn)
        return finish(b, [activation(b, out), *outputs], 13)

    description = f"axis={written_axis} segments={list(zip(kinds, shapes))}"
    if refusals:
        return TravelCase("concat", description, build(False), refusals)
    return case_with_reference("concat", description, build, refusals)


def add_case(choose: Choices) -> TravelCase:
    """BN(Add(a, b[, c])) → LeakyRelu, as an Add chain or one Sum: it folds when every operand is
    a layer read only by the Add, or a constant (scaled in place); ``t`` goes in once."""
    seed = choose.integer(0, SEED_LIMIT)
    count = choose.integer(2, 3)
    absorbable_only = choose.boolean()
    kinds = [choose.choice(("conv", "constant") if absorbable_only else (*SOURCES, "constant")) for _ in range(count)]
    if all(kind == "constant" for kind in kinds):
        kinds[0] = "conv"
    shape = [choose.integer(1, 2), choose.integer(1, 4), choose.integer(2, 4), choose.integer(2, 4)]
    constant_shapes = [choose.choice(([], [shape[1], 1, 1], [1, shape[1], 1, 1], shape[1:])) for _ in kinds]
    c_in = choose.integer(1, 3)
    use_sum = choose.boolean()
    bn = draw_batchnorm(choose, shape[1], negative=choose.boolean())
    refusals = refusal_for(kinds)

    def build(moved: bool) -> onnx.ModelProto:
        b = GraphBuilder(seed)
        outputs: list[Value] = []
        operands = []
        for index, kind in enumerate(kinds):
            if kind == "constant":
                operand = Value(b.random("c", constant_shapes[index]), constant_shapes[index])
                if moved:  # a constant is scaled in place (its shape may grow to per-channel)
                    operand = Value(b.node("Mul", [operand.name, b.const("s", bn.scale.reshape(-1, 1, 1)
                                                                         .astype(np.float32))]), shape)
            else:
                operand = source(b, kind, index, shape, c_in, outputs)
                if moved:
                    operand = add_affine(b, operand, bn.scale, None, axis=1)
            operands.append(operand.name)
        if moved:
            operands[0] = add_affine(b, Value(operands[0], shape), np.ones_like(bn.scale), bn.shift, axis=1).name
        if use_sum:
            total = b.node("Sum", operands)
        else:
            total = operands[0]
            for name in operands[1:]:
                total = b.node("Add", [total, name])
        out = Value(total, shape)
        if not moved:
            out = add_batchnorm(b, out, bn)
        return finish(b, [activation(b, out), *outputs], 13)

    description = f"{'Sum' if use_sum else 'Add'} of {kinds} constants {constant_shapes}"
    if refusals:
        return TravelCase("add", description, build(False), refusals)
    return case_with_reference("add", description, build, refusals)


# -- sibling branches (RepVGG, ACNet, MobileOne) --------------------------------------------------


@dataclass(frozen=True)
class Branch:
    """One Conv branch of a re-parameterizable block, with "same" padding."""

    kernel: tuple[int, int]
    dilation: int
    group: int
    bias: bool
    batchnorm: bool
    shared: bool  # its output is also a graph output, so it cannot merge

    def reach(self) -> tuple[int, int]:
        """The kernel's extent once dilated."""
        return (self.dilation * (self.kernel[0] - 1) + 1, self.dilation * (self.kernel[1] - 1) + 1)

    def offsets(self, axis: int) -> set[int]:
        """Where its taps read along ``axis``, relative to the output position ("same" padding)."""
        return {i * self.dilation - (self.reach()[axis] - 1) // 2 for i in range(self.kernel[axis])}

    def fits_in(self, other: Branch) -> bool:
        """Whether one Conv with ``other``'s kernel can compute this branch too: each of its taps
        reads what a tap of ``other`` reads, and its groups lie inside ``other``'s."""
        return self.group % other.group == 0 and all(self.offsets(axis) <= other.offsets(axis) for axis in (0, 1))


def merge_classes(branches: list[Branch], cost: Callable[[Branch], int]) -> list[list[Branch]]:
    """The Convs sibling branches become: the costliest branch takes every branch that fits in
    its kernel, then the costliest of the rest, and so on. A branch that fits in none stays a
    Conv of its own, since merging it would make a larger kernel than either (1×3 beside 3×1
    alone, a depthwise kernel beside a dense one, two dilations)."""
    classes = []
    remaining = sorted(branches, key=lambda branch: -cost(branch))
    while remaining:
        outer = remaining[0]
        classes.append([branch for branch in remaining if branch.fits_in(outer)])
        remaining = [branch for branch in remaining if not branch.fits_in(outer)]
    return classes


def merged_kernel(weights: list[tuple[Branch, np.ndarray, np.ndarray]], c_in: int,
                  identity: BatchNormParameters | None) -> tuple[np.ndarray, np.ndarray]:
    """One dense, undilated kernel and bias equal to the sum of the branches (each with
    its BN applied) and the identity BN: every kernel centred in the largest reach."""
    reach_h = max([branch.reach()[0] for branch, _, _ in weights] + [1])
    reach_w = max([branch.reach()[1] for branch, _, _ in weights] + [1])
    c_out = weights[0][1].shape[0] if weights else c_in
    kernel = np.zeros((c_out, c_in, reach_h, reach_w))
    bias = np.zeros(c_out)
    for branch, weight, branch_bias in weights:
        dense = np.zeros((c_out, c_in, *branch.reach()))
        per_group_out, per_group_in = c_out // branch.group, c_in // branch.group
        for g in range(branch.group):
            rows = slice(g * per_group_out, (g + 1) * per_group_out)
            dense[rows, g * per_group_in:(g + 1) * per_group_in, ::branch.dilation, ::branch.dilation] = weight[rows]
        top, left = (reach_h - branch.reach()[0]) // 2, (reach_w - branch.reach()[1]) // 2
        kernel[:, :, top:top + branch.reach()[0], left:left + branch.reach()[1]] += dense
        bias += branch_bias
    if identity is not None:
        kernel[np.arange(c_in), np.arange(c_in), reach_h // 2, reach_w // 2] += identity.scale
        bias += identity.shift
    return kernel, bias


def siblings_case(choose: Choices) -> TravelCase:
    """A train-form block: Conv(→BN) branches with "same" padding and one stride, plus BN(x)
    when shapes allow, summed by Adds, then LeakyRelu. Re-parameterized, the branches whose
    kernels fit in a sibling's merge into it (:func:`merge_classes`: one Conv for RepVGG's
    3×3 + 1×1, ACNet's 3×3 + 1×3 + 3×1); a branch whose output is also read elsewhere stays a
    Conv of its own, and BN(x) joins a merged Conv, or stays when no mergeable Conv branch is
    there to take it."""
    seed = choose.integer(0, SEED_LIMIT)
    shape = [choose.integer(1, 2), choose.integer(1, 6), choose.integer(3, 7), choose.integer(3, 7)]
    c_in = shape[1]
    stride = choose.choice((1, 1, 2))
    c_out = c_in if stride == 1 and choose.boolean() else choose.integer(1, 6)
    identity = draw_batchnorm(choose, c_in, negative=choose.boolean()) \
        if c_out == c_in and stride == 1 and choose.boolean() else None
    all_shared = identity is not None and choose.integer(0, 3) == 0  # BN(x) has no sibling to go to
    branches = []
    for index in range(choose.integer(1 if identity else 2, 3)):
        kernel = (choose.choice((1, 3, 3, 5)), choose.choice((1, 3, 3)))
        batchnorm = choose.integer(0, 4) > 0 or (index == 0 and identity is None)  # at least one BN
        branches.append(Branch(kernel, choose.choice((1, 1, 2)) if max(kernel) > 1 else 1,
                               choose.choice(divisors(gcd(c_in, c_out))), choose.boolean(),
                               batchnorm, all_shared or choose.integer(0, 5) == 0))
    batchnorms = [draw_batchnorm(choose, c_out, negative=choose.boolean()) for _ in branches]
    mergeable = [branch for branch in branches if not branch.shared]
    classes = merge_classes(mergeable, lambda branch: c_out * (c_in // branch.group) * prod(branch.kernel))
    refusals = (OTHER_READER,) if identity is not None and not mergeable else ()
    terms = sum(branch.shared for branch in branches) + len(classes) + bool(refusals)
    ops_after = {"Conv": sum(branch.shared for branch in branches) + len(classes), "Add": terms - 1}
    out_size = [conv_output(n, 1, stride, 0, 0) for n in shape[2:]]

    def build(merged: bool) -> onnx.ModelProto:
        b = GraphBuilder(seed)
        x = Value(b.input("x", shape), shape)
        terms: list[str] = []
        outputs: list[Value] = []
        to_merge: dict[int, tuple[Branch, np.ndarray, np.ndarray]] = {}
        for branch, bn in zip(branches, batchnorms):
            reach = branch.reach()
            weight = b.random("W", [c_out, c_in // branch.group, *branch.kernel], scale=0.3)
            bias = b.random("b", [c_out], scale=0.1) if branch.bias else None
            if merged and not branch.shared:
                tensors = {t.name: onnx.numpy_helper.to_array(t) for t in b.initializers}
                w, bb = tensors[weight].astype(np.float64), tensors[bias].astype(np.float64) if bias else np.zeros(c_out)
                if branch.batchnorm:
                    w, bb = w * bn.scale[:, None, None, None], bb * bn.scale + bn.shift
                to_merge[id(branch)] = (branch, w, bb)
                continue
            pads = [(reach[0] - 1) // 2, (reach[1] - 1) // 2] * 2
            y = Value(b.node("Conv", [x.name, weight] + ([bias] if bias else []), group=branch.group,
                             strides=[stride, stride], pads=pads, dilations=[branch.dilation] * 2),
                      [shape[0], c_out, *out_size])
            if branch.batchnorm:
                y = add_batchnorm(b, y, bn)
            if branch.shared:
                outputs.append(Value(b.node("Identity", [y.name]), y.shape))
            terms.append(y.name)
        if merged:
            for index, members in enumerate(classes):
                kernel, merged_bias = merged_kernel([to_merge[id(branch)] for branch in members], c_in,
                                                    identity if index == 0 else None)
                pads = [(kernel.shape[2] - 1) // 2, (kernel.shape[3] - 1) // 2] * 2
                terms.append(b.node("Conv", [x.name, b.const("Wm", kernel.astype(np.float32)),
                                             b.const("bm", merged_bias.astype(np.float32))],
                                    strides=[stride, stride], pads=pads))
        elif identity is not None:
            terms.append(add_batchnorm(b, x, identity).name)
        total = terms[0]
        for term in terms[1:]:
            total = b.node("Add", [total, term])
        return finish(b, [activation(b, Value(total, [])), *outputs], 13)

    description = f"x={shape} stride={stride} c_out={c_out} identity={identity is not None} branches={branches}"
    if refusals:
        return TravelCase("siblings", description, build(False), refusals, ops_after)
    return case_with_reference("siblings", description, build, refusals, ops_after=ops_after)


# -- rank-2 linear layers, Shape readers, pass-through chains -------------------------------------

LINEAR_PATTERNS = ("matmul-bn", "matmul-add-bn", "gemm-bn", "bn-matmul", "bn-matmul-add", "bn-gemm")


def linear_case(choose: Choices) -> TravelCase:
    """Rank-2 MatMul (+ Add) or Gemm with a BN1d before or after it, then LeakyRelu: one Gemm
    after the fold, no MatMul, no Add."""
    pattern = choose.choice(LINEAR_PATTERNS)
    b = GraphBuilder(choose.integer(0, SEED_LIMIT))
    n, k, m = choose.integer(1, 4), choose.integer(1, 6), choose.integer(1, 6)
    x = b.input("x", [n, k])
    bn_before = pattern.startswith("bn-")
    if bn_before:
        x = add_batchnorm(b, Value(x, [n, k]), draw_batchnorm(choose, k, negative=choose.boolean())).name
    layer = pattern.removeprefix("bn-").removesuffix("-bn")
    if layer == "gemm":
        y = b.gemm(x, k, m, trans_b=int(choose.boolean()), bias=choose.boolean(), alpha=choose.choice((1.0, 0.5)))
    else:
        y = b.node("MatMul", [x, b.random("W", [k, m])])
        if layer == "matmul-add":
            y = b.node("Add", [y, b.random("c", [m], scale=0.1)] if choose.boolean() else [b.random("c", [m]), y])
    out = Value(y, [n, m])
    if not bn_before:
        out = add_batchnorm(b, out, draw_batchnorm(choose, m, negative=choose.boolean()))
    model = finish(b, [activation(b, out)], 13)
    return TravelCase("linear", f"{pattern} [{n},{k}]→[{n},{m}]", model, (), {"Gemm": 1, "MatMul": 0, "Add": 0})


def shape_reader_case(choose: Choices) -> TravelCase:
    """A layer whose output feeds a BN and a Shape (whose result sizes a later Reshape):
    Shape reads no values, so the BN still folds; a second reader of the values stops it."""
    opset = choose.choice((13, 15))
    seed = choose.integer(0, SEED_LIMIT)
    conv_layer = choose.boolean()
    value_reader = choose.integer(0, 3) == 0
    sliced_shape = opset >= 15 and choose.boolean()
    shape = [choose.integer(1, 3), choose.integer(1, 4), choose.integer(2, 5), choose.integer(2, 5)]
    channels = choose.integer(1, 5)
    conv = draw_conv(choose, shape[1], channels, shape[2:])
    bn = draw_batchnorm(choose, channels, negative=choose.boolean())
    refusals = (OTHER_READER,) if value_reader else ()

    def build(moved: bool) -> onnx.ModelProto:
        b = GraphBuilder(seed)
        if conv_layer:
            y = conv.build(b, Value(b.input("x", shape), shape))
        else:
            y = Value(b.gemm(b.input("x", shape[:2]), shape[1], channels), [shape[0], channels])
        outputs = [relu(b, Value(y.name, y.shape))] if value_reader else []
        if sliced_shape:
            batch = b.node("Shape", [y.name], start=0, end=1)
        else:
            batch = b.node("Unsqueeze", [b.node("Gather", [b.node("Shape", [y.name]), ints(b, "zero", 0)]),
                                         ints(b, "axes", [0])])
        target = b.node("Concat", [batch, ints(b, "rest", [-1])], axis=0)
        normalized = add_affine(b, y, bn.scale, bn.shift, axis=1) if moved else add_batchnorm(b, y, bn)
        flat = Value(b.node("Reshape", [activation(b, normalized).name, target]), [y.shape[0], prod(y.shape[1:])])
        return finish(b, [flat, *outputs], opset)

    description = f"{'Conv' if conv_layer else 'Gemm'} read by Shape{' (start/end)' if sliced_shape else ''}" \
                  f"{' and by a Relu' if value_reader else ''} opset={opset}"
    if refusals:
        return TravelCase("shape-reader", description, build(False), refusals)
    return case_with_reference("shape-reader", description, build, refusals)


def passthrough(choose: Choices, b: GraphBuilder, x: Value, axis: int, opset: int) -> tuple[Value, int]:
    """One node that moves values without changing them (Identity, inference Dropout,
    Transpose, Unsqueeze, Squeeze of a size-1 axis); returns it and where ``axis`` went."""
    rank = len(x.shape)
    ones = [i for i, n in enumerate(x.shape) if n == 1 and i != axis]
    kinds = ["Identity", "Dropout", "Transpose"] + (["Unsqueeze"] if rank < 5 else []) + (["Squeeze"] if ones and rank > 2 else [])
    kind = choose.choice(kinds)
    if kind == "Identity":
        return Value(b.node("Identity", [x.name]), x.shape), axis
    if kind == "Dropout":
        inputs = [x.name]
        if choose.boolean():
            inputs += [b.const("ratio", np.array(0.5, np.float32)), b.const("training", np.array(False))]
        return Value(b.node("Dropout", inputs), x.shape), axis
    if kind == "Transpose":
        perm = list(range(rank))
        random.Random(choose.integer(0, SEED_LIMIT)).shuffle(perm)
        return Value(b.node("Transpose", [x.name], perm=perm), [x.shape[p] for p in perm]), perm.index(axis)
    if kind == "Unsqueeze":
        where = choose.integer(0, rank)
        shape = [*x.shape[:where], 1, *x.shape[where:]]
        return Value(b.node("Unsqueeze", [x.name, ints(b, "axes", [where])]), shape), axis + (where <= axis)
    where = choose.choice(ones)
    shape = [n for i, n in enumerate(x.shape) if i != where]
    return Value(b.node("Squeeze", [x.name, ints(b, "axes", [where])]), shape), axis - (where < axis)


def move_axis(b: GraphBuilder, x: Value, source_axis: int, target: int) -> Value:
    """A Transpose taking ``source_axis`` to ``target`` (nothing when it is there already)."""
    if source_axis == target:
        return x
    order = [i for i in range(len(x.shape)) if i != source_axis]
    order.insert(target, source_axis)
    return Value(b.node("Transpose", [x.name], perm=order), [x.shape[i] for i in order])


def chain_case(choose: Choices) -> TravelCase:
    """A BN and a layer with 1-4 pass-through nodes between them, either way round.

    Backward: Conv or Gemm → chain → (Transpose bringing the channel axis to 1) → BN →
    LeakyRelu. Forward: BN → chain → Transpose bringing the channel axis last → MatMul. The
    refused variant brings another axis (of size ≥ 2) where the BN or the MatMul looks.
    """
    opset = 13
    b = GraphBuilder(choose.integer(0, SEED_LIMIT))
    forward = choose.boolean()
    wrong_axis = choose.integer(0, 3) == 0
    if forward:
        rank = choose.integer(2, 4)
        shape = [choose.integer(1, 3), choose.integer(1, 4), *(choose.integer(1, 3) for _ in range(rank - 2))]
        bn = draw_batchnorm(choose, shape[1], negative=choose.boolean())
        value = add_batchnorm(b, Value(b.input("x", shape), shape), bn)
    else:
        conv_layer = choose.boolean()
        shape = [choose.integer(1, 3), choose.integer(1, 4), choose.integer(1, 4), choose.integer(1, 4)]
        channels = choose.integer(1, 5)
        if conv_layer:
            value = draw_conv(choose, shape[1], channels, shape[2:]).build(b, Value(b.input("x", shape), shape))
        else:
            value = Value(b.gemm(b.input("x", shape[:2]), shape[1], channels), [shape[0], channels])
    axis = 1
    steps = choose.integer(1, 4)
    for _ in range(steps):
        value, axis = passthrough(choose, b, value, axis, opset)
    others = [i for i, n in enumerate(value.shape) if i != axis and n >= 2]
    refusals: tuple[str, ...] = ()
    if wrong_axis and others:
        axis = choose.choice(others)
        refusals = (OTHER_AXIS,)
    if forward:
        value = move_axis(b, value, axis, len(value.shape) - 1)
        out = b.node("MatMul", [value.name, b.random("W", [value.shape[-1], choose.integer(1, 4)])])
    else:
        value = move_axis(b, value, axis, 1)
        out = activation(b, add_batchnorm(b, value, draw_batchnorm(choose, value.shape[1], negative=choose.boolean()))).name
    model = finish(b, [Value(out, [])], opset)
    kinds = [node.op_type for node in model.graph.node if node.op_type not in ("BatchNormalization", "LeakyRelu")]
    description = f"{'forward' if forward else 'backward'} through {kinds}"
    return TravelCase("chain", description, model, refusals)


GENERATORS: dict[str, Callable[[Choices], TravelCase]] = {
    "pool": pool_case,
    "resize": resize_case,
    "slice": slice_case,
    "split": split_case,
    "pad": pad_case,
    "reshape": reshape_case,
    "concat": concat_case,
    "add": add_case,
    "siblings": siblings_case,
    "linear": linear_case,
    "shape-reader": shape_reader_case,
    "chain": chain_case,
}


def travel_cases(generator: Callable[[Choices], TravelCase]) -> st.SearchStrategy[TravelCase]:
    """A hypothesis strategy drawing every decision of ``generator``, so cases shrink."""
    return st.composite(lambda draw: generator(DrawChoices(draw)))()


def sample(generator: Callable[[Choices], TravelCase], seed: int) -> TravelCase:
    """One case from a plain ``random.Random(seed)``."""
    return generator(RandomChoices(random.Random(seed)))
