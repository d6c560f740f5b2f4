"""Pad off the channel axis: reflect, edge and wrap copy values of the same channel; a
constant pad writes a value the affine would move.

Padded positions hold copies of real values of their channel in the ``reflect``, ``edge``
and ``wrap`` modes, so ``pad(s * x + t) = s * pad(x) + t`` on the same axis. In ``constant``
mode they hold ``v``, where the moved affine would write ``s * v + t``: the affine crosses
only when ``s * v + t = v`` in every channel, which for the usual ``v = 0`` means ``t = 0``
(:func:`bnfold.fold_math.first_changed_pad_value`). Preconditions: the pads (and the
constant) are constants, and the channel axis is not padded.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, attribute, describe
from bnfold.rules.layout import absolute_axis
from bnfold.rules.plan import Affine, Refusal, SymmetricMover


def _constant_ints(node: onnx.NodeProto, slot: int, graph: GraphIndex) -> list[int] | Refusal | None:
    if slot >= len(node.input) or not node.input[slot]:
        return None
    value = graph.constant_value(node.input[slot])
    if value is None:
        return Refusal(f"{describe(node)} input '{node.input[slot]}' is not a constant")
    return [int(v) for v in np.asarray(value).reshape(-1)]


def _pads_and_value(node: onnx.NodeProto, graph: GraphIndex) -> tuple[list[int], list[int] | None, float] | Refusal:
    """The pads, the axes they are for (None: every axis) and the constant value."""
    opset = graph.default_opset()
    if opset < 11:
        pads = attribute(node, "pads" if opset >= 2 else "paddings", [])
        return [int(p) for p in pads], None, float(attribute(node, "value", 0.0))
    pads = _constant_ints(node, 1, graph)
    axes = _constant_ints(node, 3, graph)
    for found in (pads, axes):
        if isinstance(found, Refusal):
            return found
    value = 0.0
    if len(node.input) > 2 and node.input[2]:
        constant = graph.constant_value(node.input[2])
        if constant is None:
            return Refusal(f"{describe(node)} constant_value is not a constant")
        value = float(np.asarray(constant, dtype=np.float64).reshape(-1)[0]) if np.size(constant) else 0.0
    return pads or [], axes, value  # type: ignore[return-value]


class PadMover(SymmetricMover):
    """``affine(pad(x)) = pad(affine(x))`` when padding copies values or writes one the affine keeps."""

    ops = frozenset({"Pad"})

    def cross(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal:
        found = _pads_and_value(node, graph)
        if isinstance(found, Refusal):
            return found
        pads, axes, value = found
        rank = graph.rank_of(node.input[0])
        if axes is None:
            rank = len(pads) // 2
            axes = list(range(rank))
        axis = absolute_axis(affine.channel_axis, rank)
        if axis is None or (rank is None and min(axes, default=0) < 0):
            return Refusal(f"{describe(node)} pads an input of unknown rank")
        padded = {(a % rank if rank else a) for i, a in enumerate(axes) if pads[i] or pads[i + len(axes)]}
        if axis in padded:
            return Refusal(f"{describe(node)} pads the channel axis {axis}")
        mode = attribute(node, "mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if mode == "constant":
            moved = fold_math.first_changed_pad_value(affine.s, affine.t, value)
            if moved is not None:
                return Refusal(
                    f"{describe(node)} pads with the constant {value:g}, which the affine would change "
                    f"at channel {moved} (t = {affine.t[moved]:.4g})"
                )
        return affine
