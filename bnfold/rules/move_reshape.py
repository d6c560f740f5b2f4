"""Reshape and Flatten that keep channels as contiguous blocks.

A reshape keeps every element's flat (row-major) index. A per-channel affine on axis ``a``
of one side scales the element at flat index ``f`` by ``s[(f // trailing) % C]``; it is a
per-channel affine on axis ``b`` of the other side when every entry of ``b`` holds elements
of a single channel (:func:`bnfold.fold_math.reshaped_affine`), and then each ``s`` and ``t``
is repeated once per entry of its block::

    Gemm → Reshape [N, C, H, W] → BN        channel c owns Gemm columns c·H·W … (c+1)·H·W − 1
    Conv [N, C, 1, 1] → Flatten → BN1d      channel c is column c
    BN2d → Flatten → Gemm                   column j belongs to channel j // (H·W)

A reshape that spreads one channel over several entries of every axis (flattening a
``H·W > 1`` map before a BN1d over its columns) would need different scales within one
channel of the layer, and is refused.

Sizes come from shape inference on both sides. Where inference leaves a size unknown, a
Reshape whose shape is computed at run time is resolved by reading that computation: the
exporters' ``x.view(x.size(0), -1)`` is ``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])``,
whose first entry is the batch size of ``x`` (a named symbolic size), so ``-1`` stands for
the product of the other input sizes. Two sizes are equal when they are the same number or
carry the same symbolic name (ONNX gives one size to one name).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import onnx

from bnfold import fold_math
from bnfold.graph import Dim, GraphIndex, attribute, describe
from bnfold.rules.layout import channel_axis
from bnfold.rules.plan import Affine, Mover, Refusal


def _product(dims: list[Dim]) -> tuple[int, Counter[str]] | None:
    """A product of sizes as a number times symbolic names; None when a size is unknown."""
    if any(dim is None for dim in dims):
        return None
    return math.prod(dim for dim in dims if isinstance(dim, int)), Counter(dim for dim in dims if isinstance(dim, str))


def _quotient(numerator: list[Dim], denominator: list[Dim]) -> Dim:
    """``prod(numerator) / prod(denominator)`` as a size, when it is a number or one name."""
    top, bottom = _product(numerator), _product(denominator)
    if top is None or bottom is None or bottom[0] == 0 or top[0] % bottom[0] or bottom[1] - top[1]:
        return None
    number, names = top[0] // bottom[0], top[1] - bottom[1]
    if not names:
        return number
    if number == 1 and list(names.values()) == [1]:
        return next(iter(names))
    return None


def _resolved_target(node: onnx.NodeProto, source: tuple[Dim, ...], graph: GraphIndex) -> list[Dim] | None:
    """The output sizes of a Reshape or Flatten, from its input sizes and its shape."""
    if node.op_type == "Flatten":
        axis = int(attribute(node, "axis", 1))
        axis += len(source) if axis < 0 else 0
        return [_quotient(list(source[:axis]), []), _quotient(list(source[axis:]), [])]
    entries = graph.shape_entries(node.input[1]) if len(node.input) > 1 else None
    if entries is None:
        return None
    keep_zeros = bool(attribute(node, "allowzero", 0))
    dims: list[Dim] = [
        source[i] if entry == 0 and not keep_zeros and i < len(source) else entry for i, entry in enumerate(entries)
    ]
    if dims.count(-1) == 1:
        position = dims.index(-1)
        dims[position] = _quotient(list(source), dims[:position] + dims[position + 1:])
    return dims


def _output_shape(node: onnx.NodeProto, source: tuple[Dim, ...], graph: GraphIndex) -> tuple[Dim, ...] | None:
    """The output sizes: inferred where shape inference knows them, else resolved here."""
    inferred = graph.symbolic_shape(node.output[0])
    resolved = _resolved_target(node, source, graph)
    if resolved is None or (inferred is not None and len(inferred) != len(resolved)):
        return inferred
    if inferred is None:
        return tuple(resolved)
    return tuple(_better(known, own) for known, own in zip(inferred, resolved))


def _better(inferred: Dim, resolved: Dim) -> Dim:
    """Of two answers for one size, a number over a name, and a name over nothing."""
    if isinstance(inferred, int) or resolved is None:
        return inferred
    if isinstance(resolved, int) or inferred is None:
        return resolved
    return inferred


def _moved(
    node: onnx.NodeProto, affine: Affine, shapes: tuple[tuple[Dim, ...], tuple[Dim, ...]], forward: bool
) -> Affine | Refusal:
    """The affine on one side of the reshape (its input when ``forward``) moved onto an axis
    of the other side that holds whole channels."""
    source, target = shapes if forward else shapes[::-1]
    rank = len(source)
    if not -rank <= affine.channel_axis < rank:
        return Refusal(f"{describe(node)}: a rank-{rank} tensor has no axis {affine.channel_axis}")
    axis = affine.channel_axis % rank
    size = source[axis]
    if isinstance(size, int) and size != affine.channels:
        return Refusal(
            f"{describe(node)}: axis {affine.channel_axis} has {size} entries, but the {affine.kind} has "
            f"{affine.channels} channels"
        )
    if not isinstance(size, int) and not affine.exact_channels:
        return Refusal(
            f"{describe(node)}: the size of axis {affine.channel_axis} is unknown, so the {affine.kind} "
            f"constant might broadcast it to {affine.channels} channels"
        )
    trailing = _product(list(source[axis + 1:]))
    unknown = trailing is None or bool(trailing[1])
    if not unknown:
        count = len(target)
        for b in dict.fromkeys(axis for axis in (1, count - 1, *range(count)) if 0 <= axis < count):
            after = _product(list(target[b + 1:]))
            length = target[b]
            if after is None or after[1] or not isinstance(length, int):
                unknown = True
                continue
            moved = fold_math.reshaped_affine(affine.s, affine.t, trailing[0], length, after[0])  # type: ignore[index]
            if moved is not None:
                s, t = moved
                return dataclasses.replace(affine, s=s, t=t, channel_axis=channel_axis(b, count), exact_channels=True)
    reshaped = f"{describe(node)} reshapes {_listed(shapes[0])} to {_listed(shapes[1])}"
    if unknown:
        return Refusal(f"{reshaped}: with sizes unknown, the entries each channel owns are unknown")
    return Refusal(f"{reshaped}: no axis holds whole channels, so the scale would vary within a channel")


def _listed(shape: tuple[Dim, ...]) -> str:
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"


class ReshapeMover(Mover):
    """``affine(reshape(x)) = reshape(affine'(x))`` with ``affine'`` repeated per block of a channel."""

    ops = frozenset({"Reshape", "Flatten"})

    def backward(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal | None:
        shapes = self._shapes(node, graph)
        return shapes if isinstance(shapes, Refusal) else _moved(node, affine, shapes, forward=False)

    def forward(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal | None:
        shapes = self._shapes(node, graph)
        return shapes if isinstance(shapes, Refusal) else _moved(node, affine, shapes, forward=True)

    @staticmethod
    def _shapes(node: onnx.NodeProto, graph: GraphIndex) -> tuple[tuple[Dim, ...], tuple[Dim, ...]] | Refusal:
        """The input and output sizes of ``node``."""
        source = graph.symbolic_shape(node.input[0])
        target = None if source is None else _output_shape(node, source, graph)
        if source is None or target is None:
            return Refusal(f"{describe(node)}: the rank of its {'input' if source is None else 'output'} is unknown")
        return source, target
