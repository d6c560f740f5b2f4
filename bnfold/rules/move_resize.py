"""Resize and Upsample: every output value is a weighted sum of input values of its channel
with weights that add up to 1, so a per-channel affine crosses unchanged.

With weights ``w_i`` over input values ``x_i`` of channel ``c`` and ``sum(w_i) = 1``::

    sum(w_i * (s_c * x_i + t_c)) = s_c * sum(w_i * x_i) + t_c

Nearest picks one value (one weight 1); linear and cubic interpolation (any
``cubic_coeff_a``; ``exclude_outside`` renormalizes the weights that remain; ``antialias``
normalizes its wider filter) weigh neighbours with weights that sum to 1, and clamp at the
border. Preconditions:

1. the channel axis is not resized: its scale is 1 or its size stays (an interpolation
   across channels would mix channels), and ``keep_aspect_ratio_policy`` does not rescale
   it with the other axes;
2. the scales or sizes are constants;
3. ``tf_crop_and_resize`` writes ``extrapolation_value`` where it samples outside the input,
   a constant the affine would move: it crosses only when ``s * v + t = v`` in every channel,
   and when the channel axis's region of interest is the whole axis.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import Dim, GraphIndex, attribute, describe
from bnfold.rules.layout import absolute_axis
from bnfold.rules.plan import Affine, Refusal, SymmetricMover


def _text(value: object, default: str) -> str:
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


def _constant(node: onnx.NodeProto, slot: int, graph: GraphIndex) -> np.ndarray | None:
    """Input ``slot`` as a flat float64 array; None when absent or empty."""
    if slot >= len(node.input) or not node.input[slot]:
        return None
    value = graph.constant_value(node.input[slot])
    if value is None:
        raise _NotConstant(node.input[slot])
    value = np.asarray(value, dtype=np.float64).reshape(-1)
    return value if value.size else None


class _NotConstant(Exception):
    """A Resize input that decides which values are combined is computed at run time."""


def _sizes(node: onnx.NodeProto, graph: GraphIndex) -> list[Dim] | None:
    """Resize's ``sizes`` (input 3): constants, or computed from the input's own sizes
    (``interpolate(x, size=(h, w))`` writes ``Concat(Shape(x)[:2], [h, w])``)."""
    if len(node.input) < 4 or not node.input[3]:
        return None
    entries = graph.shape_entries(node.input[3])
    if entries is None:
        raise _NotConstant(node.input[3])
    return entries or None


def _factors(node: onnx.NodeProto, graph: GraphIndex, opset: int) -> tuple[str, list[float] | list[Dim] | None]:
    """Whether the op is given ``scales`` or ``sizes``, and the values (None: only H and W
    are scaled, as Upsample before opset 7 does)."""
    if node.op_type == "Upsample" and opset < 7:
        return "scales", None
    if node.op_type == "Upsample" and opset < 9:
        return "scales", [float(v) for v in attribute(node, "scales", [])]
    scales = _constant(node, 1 if node.op_type == "Upsample" or opset < 11 else 2, graph)
    if scales is not None or node.op_type == "Upsample" or opset < 11:
        return "scales", None if scales is None else [float(v) for v in scales]
    return "sizes", _sizes(node, graph)


class ResizeMover(SymmetricMover):
    """``affine(resize(x)) = resize(affine(x))`` for interpolations whose weights sum to 1."""

    ops = frozenset({"Resize", "Upsample"})

    def cross(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal:
        shape = graph.static_shape(node.input[0])
        rank = None if shape is None else len(shape)
        axis = absolute_axis(affine.channel_axis, rank)
        if axis is None:
            return Refusal(f"{describe(node)} reads an input of unknown rank")
        opset = graph.default_opset()
        try:
            kind, factors = _factors(node, graph, opset)
            roi = _constant(node, 1, graph) if node.op_type == "Resize" and opset >= 11 else None
        except _NotConstant as error:
            return Refusal(f"{describe(node)} input '{error}' is not a constant")
        resized_axes = [int(a) for a in attribute(node, "axes", [])]
        if factors is None and node.op_type == "Resize":
            return Refusal(f"{describe(node)} has neither scales nor sizes")
        if factors is None:  # Upsample-1: height_scale and width_scale of an NCHW input
            axes = [2, 3]
        elif not resized_axes:  # scales or sizes for every axis
            axes = list(range(len(factors)))
        elif rank is None and min(resized_axes) < 0:
            return Refusal(f"{describe(node)} resizes axes {resized_axes} of an input of unknown rank")
        else:
            axes = [a % rank if rank else a for a in resized_axes]
        position = axes.index(axis) if axis in axes else None
        if position is not None and factors is not None:
            if kind == "scales" and factors[position] != 1.0:
                return Refusal(f"{describe(node)} resizes the channel axis {axis} by {factors[position]:g}")
            dims = graph.symbolic_shape(node.input[0])
            size = dims[axis] if dims is not None else None
            channels = size if size is not None else (affine.channels if affine.exact_channels else None)
            if kind == "sizes" and (factors[position] is None or factors[position] != channels):
                return Refusal(f"{describe(node)} resizes the channel axis {axis} to {factors[position]} entries")
            policy = _text(attribute(node, "keep_aspect_ratio_policy"), "stretch")
            if kind == "sizes" and policy != "stretch":
                return Refusal(
                    f"{describe(node)} keeps the aspect ratio ({policy}), which rescales the channel axis too"
                )
        if _text(attribute(node, "coordinate_transformation_mode"), "half_pixel") == "tf_crop_and_resize":
            value = float(attribute(node, "extrapolation_value", 0.0))
            moved = fold_math.first_changed_pad_value(affine.s, affine.t, value)
            if moved is not None:
                return Refusal(
                    f"{describe(node)} writes extrapolation_value {value:g} outside its crop, which the "
                    f"affine would change at channel {moved}"
                )
            if position is not None and (roi is None or (roi[position], roi[position + len(axes)]) != (0.0, 1.0)):
                return Refusal(f"{describe(node)} crops the channel axis {axis}")
        mode = _text(attribute(node, "mode"), "nearest")
        if mode not in ("nearest", "linear", "bilinear", "cubic"):
            return Refusal(f"{describe(node)} interpolates in mode '{mode}'")
        return affine
