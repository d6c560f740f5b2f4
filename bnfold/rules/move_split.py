"""Split along an axis other than the channel axis: every part holds whole channels.

``split(s * x + t)`` is ``s * part + t`` for every part, on the same axis. Forward, the
affine lies on every output, and the layers after every used output must absorb it (the
travelling rule asks each). Backward, a BN on one part can move before the Split only when
the other parts are unused, since moving it would change them too (two parts normalized by
equal BNs would be exact as well, but need several BNs removed by one fold: they are left).
A split of the channel axis itself would give each part another slice of ``s``; it is refused.
"""

from __future__ import annotations

import onnx

from bnfold.graph import GraphIndex, attribute, describe
from bnfold.rules.layout import absolute_axis
from bnfold.rules.plan import Affine, Refusal, SymmetricMover


class SplitMover(SymmetricMover):
    """``affine(part(x)) = part(affine(x))`` for each part of a Split off the channel axis."""

    ops = frozenset({"Split"})

    def affine_outputs(self, node: onnx.NodeProto) -> list[int]:
        return list(range(len(node.output)))

    def cross(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal:
        rank = graph.rank_of(node.input[0])
        split_axis = absolute_axis(int(attribute(node, "axis", 0)), rank)
        axis = absolute_axis(affine.channel_axis, rank)
        if axis is None or split_axis is None:
            return Refusal(f"{describe(node)} splits an input of unknown rank")
        if split_axis == axis:
            return Refusal(f"{describe(node)} splits the channel axis {axis}")
        return affine
