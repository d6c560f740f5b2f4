"""MaxPool, GlobalMaxPool, ReduceMax, ReduceMin: a max commutes with a non-negative scale.

For one channel ``c`` with ``s_c >= 0``, ``x -> s_c * x + t_c`` keeps the order of values,
so::

    max(s_c * x + t_c) = s_c * max(x) + t_c        (likewise min)

(with ``s_c = 0`` both sides are the constant ``t_c``). A negative ``s_c`` reverses the
order and turns the max into ``s_c * min(x) + t_c``, which no affine of the max gives: the
affine crosses only when every ``s_c >= 0``, and the refusal names the first channel that is
not. Keras writes ``Conv2D → MaxPooling2D → BatchNormalization``, which then folds into the
Conv. Further preconditions: the op does not take the max along the affine's channel axis;
MaxPool's indices output is unused (the mover carries the values only); no window holds
only padding.
"""

from __future__ import annotations

import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, describe
from bnfold.rules.plan import Affine, Refusal
from bnfold.rules.pooling import PoolingMover, window_facts


class MaxMover(PoolingMover):
    """``affine(max(x)) = max(affine(x))`` when every scale is non-negative."""

    ops = frozenset({"MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin"})

    def refusal(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Refusal | None:
        negative = fold_math.first_negative(affine.s)
        if negative is not None:
            kind, other = ("min", "max") if node.op_type == "ReduceMin" else ("max", "min")
            return Refusal(f"{describe(node)}: negative scale at channel {negative} turns the {kind} into a {other}")
        if node.op_type == "MaxPool" and window_facts(node, graph).holds_no_value:
            return Refusal(f"{describe(node)} has a window of padding only")
        return None
