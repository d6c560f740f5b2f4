"""An affine after a Concat splits into one piece per input, which that input's layer absorbs.

Along the channel axis, ``s * Concat(y1, y2) + t = Concat(s1 * y1 + t1, s2 * y2 + t2)`` with
``(s_i, t_i)`` the entries of ``s`` and ``t`` over ``y_i``'s channels
(:func:`~bnfold.fold_math.affine_slices`); along any other axis every input takes the whole
affine. YOLOv5's BottleneckCSP computes ``bn(cat(cv3(...), cv2(x)))``: each half of the BN
folds into its Conv. Each piece goes to every rule that folds into a producer (a layer, the
same layer behind movers, another split); a constant input absorbs its piece in place.

Preconditions: the Concat's output feeds only the affine; its inputs are distinct values whose
layers are distinct nodes; along the channel axis each input's size on it is known and the
sizes add up to the affine's channels.

When exactly one input cannot absorb its piece, the others still fold, and that input keeps its
piece on the edge into the Concat: one BatchNormalization of its channels for a BN (a Mul/Add
for a decomposed affine). Never more nodes than before, and the affine then runs on part of the
data; the report says what became of each piece. With two or more such inputs the affine stays
whole, since keeping a piece on each would add nodes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, attribute, describe, is_standard
from bnfold.rules.base import AbsorbedPiece, Piece, absorb_piece, split_plan
from bnfold.rules.plan import (
    Affine,
    FoldPlan,
    FoldRule,
    InsertedAffine,
    Refusal,
    RuleSet,
)
from bnfold.rules.weights import cast_values


class ConcatSplit(FoldRule):
    """``affine(Concat(y1, y2, ...))`` → ``Concat(y1', y2', ...)``, each ``y_i'`` its layer with its piece."""

    name = "concat-split"

    def plan(self, affine: Affine, graph: GraphIndex, rules: RuleSet) -> FoldPlan | Refusal | None:
        concat = graph.producer_of(affine.input_name)
        if concat is None or concat.op_type != "Concat" or not is_standard(concat):
            return None
        other_uses = graph.other_uses(affine.input_name, besides=affine.node)
        if other_uses:
            return Refusal(f"{describe(concat)} output also feeds {', '.join(other_uses)}")
        if len(set(concat.input)) != len(concat.input):
            return Refusal(f"{describe(concat)} reads one value twice")
        pieces = _pieces(concat, affine, graph)
        if isinstance(pieces, Refusal):
            return pieces
        absorbed: list[AbsorbedPiece] = []
        refused: list[tuple[Piece, Refusal]] = []
        claimed = {graph.position_of(concat)}
        for piece in pieces:
            if piece.affine.channels == 0 or piece.is_identity:
                continue  # an empty input, or one whose piece changes nothing, needs nothing
            result = absorb_piece(piece, graph, rules)
            if isinstance(result, FoldPlan):
                touched = {graph.position_of(node) for node in result.touched_nodes}
                if touched & (claimed - {graph.position_of(concat)}):
                    result = Refusal(f"{describe(result.target)} also computes another input")
                claimed |= touched
            if isinstance(result, Refusal):
                refused.append((piece, result))
            else:
                absorbed.append((piece, result))
        if not refused:
            return split_plan(self.name, affine, concat, absorbed)
        kept = _kept(refused[0][0], affine, graph) if len(refused) == 1 and absorbed else None
        if isinstance(kept, InsertedAffine):
            return split_plan(self.name, affine, concat, absorbed, [(refused[0][0], kept)])
        return Refusal("; ".join(f"{piece.describe()} cannot absorb its part: {refusal.reason}"
                                 for piece, refusal in refused))


def _pieces(concat: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> list[Piece] | Refusal:
    """The piece of ``affine`` each input of ``concat`` takes."""
    axis = int(attribute(concat, "axis", 1))
    rank = graph.rank_of(affine.input_name) or graph.rank_of(concat.input[0])
    if rank is not None:
        along_channels = axis % rank == affine.channel_axis % rank
        axes_after: int | None = rank - 1 - affine.channel_axis % rank
    elif (axis < 0) == (affine.channel_axis < 0):
        along_channels = axis == affine.channel_axis
        axes_after = -affine.channel_axis - 1 if affine.channel_axis < 0 else None
    else:
        return Refusal(f"{describe(concat)} joins axis {axis} of values of unknown rank")

    def piece(slot: int, part: str | None, s: np.ndarray, t: np.ndarray, exact: bool) -> Piece:
        name = concat.input[slot]
        on_input = dataclasses.replace(affine, nodes=(concat,), input_name=name, output_name=name, s=s, t=t,
                                       exact_channels=exact)
        return Piece(slot, part, on_input, axes_after)

    if not along_channels:
        return [piece(slot, None, affine.s, affine.t, affine.exact_channels)
                for slot in range(len(concat.input))]
    sizes = []
    for name in concat.input:
        shape = graph.static_shape(name)
        size = shape[axis] if shape is not None and rank is not None and len(shape) == rank else None
        if size is None:
            return Refusal(f"the size of '{name}' on the axis {describe(concat)} joins is unknown")
        sizes.append(size)
    if sum(sizes) != affine.channels:
        return Refusal(f"{describe(concat)} joins {sum(sizes)} channels, {describe(affine.node)} scales "
                       f"{affine.channels}")
    bounds = np.cumsum([0, *sizes])
    return [piece(slot, f"channels {begin}-{end - 1}", s, t, True)
            for slot, (begin, end, (s, t)) in enumerate(zip(bounds[:-1], bounds[1:],
                                                            fold_math.affine_slices(affine.s, affine.t, sizes)))]


def _kept(piece: Piece, affine: Affine, graph: GraphIndex) -> InsertedAffine | None:
    """The piece an input keeps in front of the Concat, if that adds no node: one
    BatchNormalization for a BN (on axis 1, from opset 7, where BN needs no training flag),
    else a Mul and/or an Add, no more of them than the affine had."""
    parameter = graph.constant_value(affine.parameter_names[0])
    if parameter is None:  # the reader found it constant; only a changed graph gets here
        return None
    dtype = parameter.dtype
    rank = graph.rank_of(piece.name)
    batchnorm = (affine.kind == "BatchNormalization" and graph.default_opset() >= 7
                 and (piece.affine.channel_axis == 1 or (rank is not None and piece.affine.channel_axis % rank == 1)))
    if not batchnorm and piece.axes_after is None:
        return None
    shape = [-1] if batchnorm or piece.axes_after is None else [-1] + [1] * piece.axes_after
    scale = cast_values(piece.affine.node, piece.affine.s.reshape(shape), dtype, "scale")
    shift = cast_values(piece.affine.node, piece.affine.t.reshape(shape), dtype, "shift")
    if isinstance(scale, Refusal) or isinstance(shift, Refusal):
        return None
    kept = InsertedAffine(piece.affine.node, piece.slot, scale[0], shift[0], batchnorm,
                          affine.node.name if batchnorm else "")
    return kept if kept.node_count <= len(affine.nodes) else None
