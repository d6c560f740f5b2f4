"""Decomposed BatchNormalization: a chain of Mul/Add/Sub/Div by per-channel constants.

tf2onnx writes every Keras BatchNormalization as ``x * m + a``; other exporters
emit ``x / d - c``, ``(x - c) * m``, or a lone Mul or Add (a layer scale, a bias
kept apart from its layer). Each such node is a per-channel affine
``s * x + t`` with, for a constant ``c``:

====================  ==========  ==========
node                  s           t
====================  ==========  ==========
``x * c``, ``c * x``  ``c``       ``0``
``x + c``, ``c + x``  ``1``       ``c``
``x - c``             ``1``       ``-c``
``c - x``             ``-1``      ``c``
``x / c``             ``1 / c``   ``0``
====================  ==========  ==========

and a chain composes into one affine (:func:`~bnfold.fold_math.compose_affines`),
which the backward rules fold like a BatchNormalization. ``c / x`` is not affine.

A constant is per-channel when exactly one of its axes has more than one entry:
``[C]`` or ``[1, C]`` scales the data's last axis (``channel_axis = -1``);
``[C, 1, 1]`` or ``[1, C, 1, 1]`` on a rank-4 tensor scales axis 1. A scalar or a
per-element constant is ordinary arithmetic, not a per-channel affine. Nor is a constant
that *broadcasts* the data: ``x[N, 1, H, W] * c[1, 3, 1, 1]`` makes three channels out of
one, so when the data's size on that axis is known it must be C. When it is unknown, the
affine is marked (``Affine.exact_channels`` False): a layer before it pins the size with its
weight's shape, but a fold into the layers after it cannot, and refuses.

A chain is read once, from its head: a node whose data input comes from another
link of the same chain (same axis and length, read by nothing else) returns
None, so the tail Add of ``x * m + a`` is never folded on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, is_standard
from bnfold.rules.layernorm import layernorm_note
from bnfold.rules.plan import Affine

AFFINE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})


@dataclass(frozen=True)
class AffineStep:
    """One node of a decomposed affine: ``output = s * data + t`` along ``channel_axis``."""

    data_input: str
    s: np.ndarray
    t: np.ndarray
    channel_axis: int
    exact_channels: bool
    """Whether the data is known to have C entries on ``channel_axis`` (no broadcast)."""


def per_channel_vector(constant: np.ndarray, data_rank: int | None) -> tuple[np.ndarray, int] | None:
    """The constant as a float64 ``[C]`` vector and the data axis it indexes (1 or -1), or None.

    None for a scalar, a per-element constant, a non-float or non-finite one,
    one that would broadcast the data to a higher rank, and one whose axis is
    neither the last nor (for a known rank) axis 1.
    """
    if constant.dtype.kind != "f" or constant.size < 2:
        return None
    long_axes = [axis for axis, size in enumerate(constant.shape) if size > 1]
    if len(long_axes) != 1 or (constant.ndim > (1 if data_rank is None else data_rank)):
        return None
    axes_from_end = constant.ndim - long_axes[0]
    if axes_from_end == 1:
        channel_axis = -1
    elif data_rank is not None and data_rank - axes_from_end == 1:
        channel_axis = 1
    else:
        return None
    vector = constant.reshape(-1).astype(np.float64)
    return (vector, channel_axis) if np.all(np.isfinite(vector)) else None


def affine_step(node: onnx.NodeProto, graph: GraphIndex) -> AffineStep | None:
    """Read one Mul/Add/Sub/Div of a runtime value and a per-channel constant (see the table)."""
    operand = constant_operand(node, graph)
    if operand is None:
        return None
    constant_slot, constant, data_input = operand
    data_shape = graph.static_shape(data_input)
    found = per_channel_vector(constant, None if data_shape is None else len(data_shape))
    if found is None:
        return None
    c, channel_axis = found
    data_channels = None if data_shape is None else data_shape[channel_axis]
    if data_channels is not None and data_channels != c.size:
        return None  # the constant broadcasts the data along the channel axis
    affine = step_affine(node.op_type, c, constant_slot)
    if affine is None:
        return None
    return AffineStep(data_input, *affine, channel_axis, exact_channels=data_channels == c.size)


def constant_operand(node: onnx.NodeProto, graph: GraphIndex) -> tuple[int, np.ndarray, str] | None:
    """For a two-input Mul/Add/Sub/Div with exactly one constant input: its slot, its value and
    the other (data) input's name."""
    if node.op_type not in AFFINE_OPS or not is_standard(node) or len(node.input) != 2:
        return None
    values = [graph.constant_value(name) for name in node.input]
    constants = [(slot, value) for slot, value in enumerate(values) if value is not None]
    if len(constants) != 1:
        return None  # two runtime values, or a constant subexpression
    slot, value = constants[0]
    return slot, value, node.input[1 - slot]


def step_affine(op_type: str, c: np.ndarray, constant_slot: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(s, t)`` of one Mul/Add/Sub/Div by constant ``c`` at input ``constant_slot`` (the
    table above); None for ``c / x`` or a division by zero."""
    ones, zeros = np.ones_like(c), np.zeros_like(c)
    if op_type == "Mul":
        return c, zeros
    if op_type == "Add":
        return ones, c
    if op_type == "Sub":
        return (ones, -c) if constant_slot == 1 else (-ones, c)
    if constant_slot == 1 and np.all(c != 0):
        return 1.0 / c, zeros
    return None


def _links(first: onnx.NodeProto, first_step: AffineStep, then_step: AffineStep, graph: GraphIndex) -> bool:
    """Whether a step continues the chain ending at ``first``: it reads ``first``'s
    output, which nothing else reads, along the same axis and channel count."""
    output = first.output[0]
    return (
        then_step.data_input == output
        and graph.use_count(output) == 1
        and then_step.channel_axis == first_step.channel_axis
        and then_step.s.shape == first_step.s.shape
    )


def read_decomposed_affine(node: onnx.NodeProto, graph: GraphIndex) -> Affine | None:
    """The longest per-channel affine chain headed by ``node``, or None if there is none
    or ``node`` is inside a chain that starts earlier. A LayerNorm's own γ and β say so in
    their note (:mod:`bnfold.rules.layernorm`)."""
    chain = read_chain(node, graph, affine_step)
    if chain is None:
        return None
    return dataclasses.replace(chain, note=layernorm_note(chain.input_name, chain.channel_axis, graph))


StepReader = Callable[[onnx.NodeProto, GraphIndex], AffineStep | None]


def read_chain(node: onnx.NodeProto, graph: GraphIndex, step: StepReader) -> Affine | None:
    """The longest chain of nodes that ``step`` reads, headed by ``node``, as one affine; None
    if ``step`` does not read ``node`` or ``node`` is inside a chain that starts earlier."""
    head = step(node, graph)
    if head is None:
        return None
    previous = graph.producer_of(head.data_input)
    if previous is not None:
        previous_step = step(previous, graph)
        if previous_step is not None and _links(previous, previous_step, head, graph):
            return None
    chain, s, t = [node], head.s, head.t
    last_step = head
    while True:
        consumers = graph.consumers_of(chain[-1].output[0])
        following = step(consumers[0], graph) if len(consumers) == 1 else None
        if following is None or not _links(chain[-1], last_step, following, graph):
            break
        chain.append(consumers[0])
        s, t = fold_math.compose_affines((s, t), (following.s, following.t))
        last_step = following
    return Affine(
        nodes=tuple(chain),
        input_name=head.data_input,
        output_name=chain[-1].output[0],
        s=s,
        t=t,
        channel_axis=head.channel_axis,
        exact_channels=head.exact_channels,
    )
