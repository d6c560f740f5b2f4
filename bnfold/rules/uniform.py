"""Mul/Add/Sub/Div by a scalar next to a layer: a per-channel affine with the same ``s`` and ``t``
on every channel.

PP-LCNetV3 (PaddleOCR v4 to v6) ends its blocks with a learnable affine, exported as
``Conv → Mul(scalar) → Add(scalar)``; paddle2onnx's DB head adds the bias of its one-channel
output as ``ConvTranspose(W [C, 1, k, k]) → Add([1, 1, 1, 1])``. ``s * x + t`` with scalars is
the per-channel affine whose ``s`` and ``t`` repeat one value over the channels, so a layer
absorbs it like a BatchNormalization, along whichever axis it has its channels: axis 1 after a
Conv, the last axis after a MatMul.

The reader takes chains of such nodes when the constant has one element and is not of higher
rank than the data (which it would otherwise broadcast to that rank), and only when the data's
rank is known. :class:`UniformAffine` then repeats ``s`` and ``t`` over each axis in turn (axis 1
and the last axis first), wherever that axis's size is known, and hands each to the other rules. A scalar
affine no layer can take stays silently, as every other Mul or Add does.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from bnfold.graph import GraphIndex
from bnfold.rules.base import delegate
from bnfold.rules.decomposed import AffineStep, constant_operand, read_chain, step_affine
from bnfold.rules.layout import channel_axis
from bnfold.rules.plan import Affine, FoldPlan, FoldRule, Refusal, RuleSet


def scalar_step(node: onnx.NodeProto, graph: GraphIndex) -> AffineStep | None:
    """One Mul/Add/Sub/Div of a runtime value of known rank and a one-element float constant."""
    operand = constant_operand(node, graph)
    if operand is None:
        return None
    constant_slot, constant, data_input = operand
    data_shape = graph.static_shape(data_input)
    if constant.dtype.kind != "f" or constant.size != 1 or data_shape is None or constant.ndim > len(data_shape):
        return None
    c = constant.reshape(1).astype(np.float64)
    affine = step_affine(node.op_type, c, constant_slot)
    if affine is None or not np.all(np.isfinite(c)):
        return None
    return AffineStep(data_input, *affine, channel_axis=1, exact_channels=False)


def read_uniform_affine(node: onnx.NodeProto, graph: GraphIndex) -> Affine | None:
    """The longest chain of scalar Mul/Add/Sub/Div headed by ``node``, as a uniform affine."""
    chain = read_chain(node, graph, scalar_step)
    return None if chain is None else dataclasses.replace(chain, uniform=True)


class UniformAffine(FoldRule):
    """A uniform affine, repeated over the entries of one axis at a time, for the other rules."""

    name = "uniform"

    def plan(self, affine: Affine, graph: GraphIndex, rules: RuleSet) -> FoldPlan | Refusal | None:
        if not affine.uniform:
            return None
        shape = graph.static_shape(affine.input_name)
        if not shape:
            return None
        rank = len(shape)
        others = tuple(rule for rule in rules.order if rule is not self)
        refusals = []
        # Axis 1 (NCHW) and the last axis (channels last) first; any other one, which a layer
        # may own once the affine has crossed a Transpose on its way there, after them.
        for axis in dict.fromkeys([*(axis % rank for axis in (1, -1) if axis < rank), *range(rank)]):
            size = shape[axis]
            if not size:
                continue  # unknown (or empty): the channels to repeat over are not known
            repeated = dataclasses.replace(
                affine, s=np.repeat(affine.s, size), t=np.repeat(affine.t, size),
                channel_axis=channel_axis(axis, rank), exact_channels=True, uniform=False,
            )
            planned = delegate(repeated, others, graph, rules)
            if isinstance(planned, FoldPlan):
                planned.notes.insert(0, f"scalar {affine.kind}, repeated over {size} channels")
                return planned
            if isinstance(planned, Refusal):
                refusals.append(planned.reason)
        return Refusal("; ".join(refusals)) if refusals else None
