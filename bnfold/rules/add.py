"""An affine after an Add (or Sum) scales every operand and shifts one of them.

``s * (y1 + y2) + t = (s * y1 + t) + s * y2``: the layer behind each operand absorbs the scale
and one of them the shift too, so the Add of the absorbed layers computes the affine's output.
A constant operand absorbs its part in place (``s * c``, and it takes the shift when there is
one). Pre-activation ResNets end in ``bn(conv2(...) + shortcut(...))``: both Convs absorb it.
An operand may reach its layer through movers, and an operand that is itself an Add is split
again, so any tree of Adds (``a + b + c``) folds into all its layers.

Preconditions: the Add's output feeds only the affine; its operands are distinct values, each
of which carries the channel axis (no operand broadcasts along it), and *every* one can absorb
the scale. An operand no layer can absorb (a Relu, a graph input, a layer whose output other
nodes read) leaves the affine whole, and the refusal names that operand: scaling the others
alone would change the sum.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from bnfold.graph import GraphIndex, describe
from bnfold.rules.base import AbsorbedPiece, Piece, absorb_piece, split_plan
from bnfold.rules.plan import Affine, FoldPlan, FoldRule, Refusal, RuleSet, TensorUpdate
from bnfold.rules.sums import is_sum


class AddSplit(FoldRule):
    """``affine(y1 + y2 + ...)`` → ``y1' + y2' + ...``: every layer scaled, one shifted."""

    name = "add-split"

    def plan(self, affine: Affine, graph: GraphIndex, rules: RuleSet) -> FoldPlan | Refusal | None:
        node = graph.producer_of(affine.input_name)
        if node is None or not is_sum(node) or node.output[0] != affine.input_name:
            return None
        other_uses = graph.other_uses(affine.input_name, besides=affine.node)
        if other_uses:
            return Refusal(f"{describe(node)} output also feeds {', '.join(other_uses)}")
        if len(set(node.input)) != len(node.input) or not all(node.input):
            return Refusal(f"{describe(node)} reads one value twice")
        rank = graph.rank_of(affine.input_name)
        pieces = []
        for slot, name in enumerate(node.input):
            found = _piece(node, slot, affine, rank, graph)
            if isinstance(found, Refusal):
                return found
            pieces.append(found)
        return self._absorbed(affine, node, pieces, graph, rules)

    def _absorbed(self, affine: Affine, node: onnx.NodeProto, pieces: list[Piece], graph: GraphIndex,
                  rules: RuleSet) -> FoldPlan | Refusal:
        """Every operand scaled (an operand whose scale is 1 needs nothing), then the shift given
        to one of them: a constant if there is one (it costs nothing), else the first layer that
        takes it without a new Add node, else the first that takes it at all."""
        absorbed: dict[int, FoldPlan | TensorUpdate] = {}
        claimed: dict[int, set[int]] = {}
        for piece in pieces:
            if piece.is_identity:
                continue
            result = self._absorb(piece, claimed, node, graph, rules)
            if isinstance(result, Refusal):
                return Refusal(f"{piece.describe()} cannot absorb the scale: {result.reason}")
            absorbed[piece.slot], claimed[piece.slot] = result, _touched(result, node, graph)
        if np.any(affine.t != 0):
            carrier = self._shift_carrier(affine, node, pieces, claimed, graph, rules)
            if isinstance(carrier, Refusal):
                return carrier
            shifted, absorbed[shifted.slot] = carrier
            pieces = [shifted if piece.slot == shifted.slot else piece for piece in pieces]
        return split_plan(self.name, affine, node, [(piece, absorbed[piece.slot]) for piece in pieces
                                                   if piece.slot in absorbed])

    def _shift_carrier(self, affine: Affine, node: onnx.NodeProto, pieces: list[Piece],
                       claimed: dict[int, set[int]], graph: GraphIndex, rules: RuleSet
                       ) -> AbsorbedPiece | Refusal:
        """The operand that takes the shift too, and what absorbs its piece then."""
        fallback = None
        constants_first = sorted(pieces, key=lambda piece: graph.constant_value(piece.name) is None)
        for piece in constants_first:
            shifted = dataclasses.replace(piece, part=f"input {piece.slot} with the shift",
                                          affine=dataclasses.replace(piece.affine, t=affine.t))
            others = {slot: touched for slot, touched in claimed.items() if slot != piece.slot}
            result = self._absorb(shifted, others, node, graph, rules)
            if isinstance(result, Refusal):
                continue
            if not (isinstance(result, FoldPlan) and result.added_biases):
                return shifted, result
            fallback = fallback or (shifted, result)
        return fallback or Refusal(f"no operand of {describe(node)} can take the shift")

    @staticmethod
    def _absorb(piece: Piece, claimed: dict[int, set[int]], node: onnx.NodeProto, graph: GraphIndex,
                rules: RuleSet) -> FoldPlan | TensorUpdate | Refusal:
        """What absorbs ``piece``, refused when its plan touches a layer another operand's plan changes."""
        result = absorb_piece(piece, graph, rules)
        if isinstance(result, FoldPlan) and any(_touched(result, node, graph) & other for other in claimed.values()):
            return Refusal(f"{describe(result.target)} also computes another operand")
        return result


def _piece(node: onnx.NodeProto, slot: int, affine: Affine, rank: int | None, graph: GraphIndex) -> Piece | Refusal:
    """The scale (no shift yet) on operand ``slot``, on that operand's channel axis.

    Operands broadcast against each other from the last axis, so an axis counted from the end
    is the same in all of them; axis ``a`` of the rank-``rank`` sum is axis ``a - (rank - r)``
    of a rank-``r`` operand.
    """
    name = node.input[slot]
    constant = graph.constant_value(name)
    operand_rank = constant.ndim if constant is not None else graph.rank_of(name)
    axis = affine.channel_axis
    if axis < 0:
        axes_after = -axis - 1
    elif rank is None:
        return Refusal(f"{describe(node)} adds values of unknown rank")
    else:
        axes_after = rank - 1 - axis
    exact = True  # a constant is scaled in place, whatever its size on the channel axis
    if constant is None:
        if operand_rank is None:
            return Refusal(f"{describe(node)} input {slot} '{name}' has an unknown rank")
        if axis >= 0 and rank is not None and operand_rank != rank:
            axis -= rank - operand_rank
        shape = graph.static_shape(name)
        size = shape[axis] if shape is not None and -len(shape) <= axis < len(shape) else None
        if axes_after >= operand_rank or (size == 1 and affine.channels > 1):
            return Refusal(f"{describe(node)} input {slot} '{name}' broadcasts along the channel axis, "
                           f"so it cannot absorb a per-channel scale")
        exact = size == affine.channels
    on_operand = dataclasses.replace(affine, nodes=(node,), input_name=name, output_name=name, channel_axis=axis,
                                     t=np.zeros_like(affine.t), exact_channels=exact)
    return Piece(slot, None, on_operand, axes_after)


def _touched(result: FoldPlan | TensorUpdate | Refusal, node: onnx.NodeProto, graph: GraphIndex) -> set[int]:
    """Positions of the nodes a piece's plan changes, besides the Add itself."""
    if not isinstance(result, FoldPlan):
        return set()
    return {graph.position_of(touched) for touched in result.touched_nodes} - {graph.position_of(node)}
