"""Slice: it keeps or drops entries along some axes, and a per-channel affine crosses it.

Along any other axis than the channel axis a slice keeps whole channels, so
``slice(s * x + t) = s * slice(x) + t`` on the same axis. Along the channel axis it keeps
the channels ``idx`` (a range, possibly strided or reversed); then

* forward, the affine after the slice is ``s[idx]``, ``t[idx]``;
* backward, the affine before it is ``s`` and ``t`` on the kept channels, and 1 and 0 on
  the dropped ones (the layer before computes them for nobody: the slice is its only reader).

Preconditions: the slice's starts, ends, axes and steps are constants; for a slice of the
channel axis, the number of channels on its input is known.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from bnfold.graph import GraphIndex, describe
from bnfold.rules.layout import absolute_axis
from bnfold.rules.plan import Affine, Mover, Refusal


def _slice_arguments(node: onnx.NodeProto, graph: GraphIndex) -> list[tuple[int, int, int, int]] | Refusal:
    """(axis, start, end, step) for each sliced axis: attributes before opset 10, inputs from it on."""
    found = graph.slice_arguments(node)
    if isinstance(found, str):
        return Refusal(f"{describe(node)} input '{found}' is not a constant")
    starts, ends, axes, steps = found
    starts, ends = starts or [], ends or []
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    return list(zip(axes, starts, ends, steps))


def _kept(length: int, start: int, end: int, step: int) -> np.ndarray:
    """The indices a Slice keeps of an axis of ``length`` (ONNX clamps like Python slicing)."""
    return np.arange(length)[slice(start, end, step)]


class SliceMover(Mover):
    """``affine(slice(x)) = slice(affine'(x))``, ``affine'`` picked or padded along a sliced channel axis."""

    ops = frozenset({"Slice"})

    def backward(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal | None:
        kept = self._kept_channels(node, affine, graph)
        if kept is None or isinstance(kept, Refusal):
            return affine if kept is None else kept
        indices, length = kept
        if len(indices) != affine.channels:
            return Refusal(
                f"{describe(node)} keeps {len(indices)} channels, but the {affine.kind} has {affine.channels}"
            )
        s, t = np.ones(length), np.zeros(length)
        s[indices], t[indices] = affine.s, affine.t
        return dataclasses.replace(affine, s=s, t=t, exact_channels=True)

    def forward(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal | None:
        kept = self._kept_channels(node, affine, graph)
        if kept is None or isinstance(kept, Refusal):
            return affine if kept is None else kept
        indices, length = kept
        if length != affine.channels:
            return Refusal(f"{describe(node)} slices {length} channels, but the {affine.kind} has {affine.channels}")
        return dataclasses.replace(affine, s=affine.s[indices], t=affine.t[indices])

    @staticmethod
    def _kept_channels(
        node: onnx.NodeProto, affine: Affine, graph: GraphIndex
    ) -> tuple[np.ndarray, int] | Refusal | None:
        """The channels the slice keeps and how many its input has; None when it keeps them all."""
        arguments = _slice_arguments(node, graph)
        if isinstance(arguments, Refusal):
            return arguments
        shape = graph.static_shape(node.input[0])
        rank = None if shape is None else len(shape)
        axis = absolute_axis(affine.channel_axis, rank)
        if axis is None or (rank is None and any(sliced < 0 for sliced, *_ in arguments)):
            return Refusal(f"{describe(node)} slices an input of unknown rank")
        on_channels = [bounds for sliced, *bounds in arguments if (sliced % rank if rank else sliced) == axis]
        if not on_channels:
            return None
        length = shape[axis] if shape is not None else None
        if length is None:
            return Refusal(f"{describe(node)} slices the channel axis {axis}, whose size is unknown")
        indices = np.arange(length)
        for start, end, step in on_channels:
            indices = indices[_kept(len(indices), start, end, step)]
        if len(indices) == length and np.array_equal(indices, np.arange(length)):
            return None
        return indices, length
