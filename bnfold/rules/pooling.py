"""What the pooling and reducing movers share: which axes an op combines, and where its windows read.

A pool or a reduction combines values along some axes (H and W for a pool, ``axes`` for a
Reduce op) and keeps the others; a per-channel affine crosses it only when its channel axis
is one of the kept ones (:class:`Pooling`). The windows of MaxPool and AveragePool may reach
into padding, which matters for an average that counts padded zeros and for a window that
holds no value at all (:func:`window_facts`). :class:`PoolingMover` is the movers' template.
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, attribute, attributes, describe
from bnfold.rules.layout import channel_axis
from bnfold.rules.plan import Affine, Mover, Refusal

GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool"})
WINDOW_POOLS = frozenset({"AveragePool", "MaxPool"})
REDUCTIONS = frozenset({"ReduceMean", "ReduceMax", "ReduceMin"})


@dataclasses.dataclass(frozen=True)
class Pooling:
    """Which input axes an op combines, and where the others go: output axis ``i`` is input
    axis ``sources[i]`` (a reduced axis kept with ``keepdims=1`` is still combined)."""

    sources: list[int]
    combined: frozenset[int]
    input_rank: int

    def backward(self, node: onnx.NodeProto, affine: Affine) -> Affine | Refusal:
        """The affine on the op's input, given the affine on its output."""
        rank = len(self.sources)
        if not -rank <= affine.channel_axis < rank:
            return Refusal(f"{describe(node)} has a rank-{rank} output, which has no axis {affine.channel_axis}")
        source = self.sources[affine.channel_axis % rank]
        if source in self.combined:
            return Refusal(f"{describe(node)} combines values along the affine's axis {affine.channel_axis}")
        return dataclasses.replace(affine, channel_axis=channel_axis(source, self.input_rank))

    def forward(self, node: onnx.NodeProto, affine: Affine) -> Affine | Refusal:
        """The affine on the op's output, given the affine on its input."""
        if not -self.input_rank <= affine.channel_axis < self.input_rank:
            return Refusal(
                f"{describe(node)} reads a rank-{self.input_rank} input, which has no axis {affine.channel_axis}"
            )
        axis = affine.channel_axis % self.input_rank
        if axis in self.combined:
            return Refusal(f"{describe(node)} combines values along the affine's axis {affine.channel_axis}")
        return dataclasses.replace(affine, channel_axis=channel_axis(self.sources.index(axis), len(self.sources)))


def _reduced_axes(node: onnx.NodeProto, graph: GraphIndex) -> list[int] | Refusal | None:
    """A Reduce op's ``axes``: an attribute before opset 18, input 1 from it on; None for none given."""
    if len(node.input) > 1 and node.input[1]:
        value = graph.constant_value(node.input[1])
        if value is None:
            return Refusal(f"{describe(node)} axes are not a constant")
        return [int(v) for v in np.asarray(value).reshape(-1)]
    found = attribute(node, "axes")
    return None if found is None else [int(v) for v in found]


def pooling(node: onnx.NodeProto, affine_axis: int, graph: GraphIndex) -> Pooling | Refusal:
    """The axes a pool or a Reduce op combines. Without a known input rank only a pool whose
    channels are axis 1 (never pooled) can be answered."""
    rank = graph.rank_of(node.input[0])
    if node.op_type in GLOBAL_POOLS or node.op_type in WINDOW_POOLS:
        if rank is None:
            if affine_axis != 1:
                return Refusal(f"{describe(node)} reads an input of unknown rank")
            rank = 2  # axes 0 and 1 are all that matter: every other axis is pooled
        return Pooling(list(range(rank)), frozenset(range(2, rank)), rank)
    if rank is None:
        return Refusal(f"{describe(node)} reduces an input of unknown rank")
    axes = _reduced_axes(node, graph)
    if isinstance(axes, Refusal):
        return axes
    if not axes:
        if attribute(node, "noop_with_empty_axes", 0):
            return Pooling(list(range(rank)), frozenset(), rank)
        axes = list(range(rank))
    combined = frozenset(axis % rank for axis in axes)
    keep = int(attribute(node, "keepdims", 1))
    sources = [axis for axis in range(rank) if keep or axis not in combined]
    return Pooling(sources, combined, rank)


@dataclasses.dataclass(frozen=True)
class WindowFacts:
    """Where a MaxPool's or AveragePool's windows read: True when certain, True also when the
    input's spatial sizes are unknown and it might be so (the safe answer)."""

    reads_counted_padding: bool
    """Some window takes a padded position that an AveragePool with ``count_include_pad=1``
    averages in as a zero."""
    holds_no_value: bool
    """Some window lies wholly in the padding."""


def window_facts(node: onnx.NodeProto, graph: GraphIndex) -> WindowFacts:
    """What the windows of a MaxPool or AveragePool read (:func:`fold_math.pool_windows`)."""
    settings = attributes(node)
    kernel = [int(k) for k in settings.get("kernel_shape", [])]
    count = len(kernel)
    strides = [int(v) for v in settings.get("strides", [1] * count)]
    dilations = [int(v) for v in settings.get("dilations", [1] * count)]
    ceil_mode = bool(settings.get("ceil_mode", 0))
    auto_pad = settings.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    shape = graph.static_shape(node.input[0])
    known = shape is not None and len(shape) == count + 2 and None not in shape[2:]
    spatial = [int(d) for d in shape[2:] if d is not None] if known and shape is not None else None
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if any(dilation > 1 for dilation in dilations):
            # onnxruntime sizes SAME padding from the undilated kernel, so a dilated window can
            # reach past it into nothing (all padding at a width of 1): whatever the sizes, unsure.
            return WindowFacts(True, True)
        if spatial is None:
            return WindowFacts(True, False)  # SAME pads less than a kernel, so no window is all padding
        pads = fold_math.same_padding(auto_pad, tuple(spatial), tuple(kernel), strides, dilations)
    elif auto_pad == "VALID":
        pads = [0] * (2 * count)
    else:
        pads = [int(p) for p in settings.get("pads", [0] * (2 * count))]
    extents = [dilation * (k - 1) + 1 for k, dilation in zip(kernel, dilations)]
    if spatial is None:
        # An input smaller than a window still gets one in onnxruntime (its output size rounds
        # toward zero), which reads past the end: counted padding, wherever a window spans more
        # than one position.
        counted = any(pads) or any(extent > 1 for extent in extents)
        return WindowFacts(counted, any(pad >= extent for pad, extent in zip(pads, extents * 2)))
    counted = False
    empty = False
    for axis, size in enumerate(spatial):
        begin, end = pads[axis], pads[axis + count]
        windows = fold_math.pool_windows(size, kernel[axis], strides[axis], begin, end, dilations[axis], ceil_mode)
        # Undilated windows count padding up to the end of the padded input (as onnxruntime
        # does); for dilated ones every position outside the input is taken as counted.
        counted_end = end if dilations[axis] == 1 else max(end, extents[axis])
        counted = counted or fold_math.windows_read_padding(windows, size, counted_end)
        empty = empty or fold_math.windows_without_values(windows, size)
    return WindowFacts(counted, empty)


class PoolingMover(Mover):
    """A mover for ops that combine the values of each channel (pools, reductions): the
    affine crosses onto the axis its channels take on the other side, when
    :meth:`refusal` finds the combination commutes with it."""

    def backward(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal | None:
        refusal = self.refusal(node, affine, graph)
        if refusal:
            return refusal
        combined = pooling(node, affine.channel_axis, graph)
        return combined if isinstance(combined, Refusal) else combined.backward(node, affine)

    def forward(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal | None:
        refusal = self.refusal(node, affine, graph)
        if refusal:
            return refusal
        combined = pooling(node, affine.channel_axis, graph)
        return combined if isinstance(combined, Refusal) else combined.forward(node, affine)

    @abstractmethod
    def refusal(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Refusal | None:
        """Why combining ``node``'s values does not commute with ``affine`` (None when it does)."""
