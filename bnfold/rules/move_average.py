"""AveragePool, GlobalAveragePool, ReduceMean: an average commutes with a per-channel affine.

Averaging ``n`` values of one channel ``c``::

    mean(s_c * x + t_c) = s_c * mean(x) + t_c

so the affine crosses unchanged, on the same channel axis (moved to its new position when
ReduceMean drops axes with ``keepdims=0``). Preconditions:

1. the op does not average along the affine's channel axis;
2. no window averages padded zeros in, unless ``t = 0``: an AveragePool with
   ``count_include_pad=1`` divides a border window's sum by the full window, so there it
   computes ``s * avg(x) + t * real / counted`` and the shift shrinks with the share of real
   values (``count_include_pad=0`` divides by the real values only, which is exact);
3. no window holds only padding (its result does not come from the input at all).
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.graph import GraphIndex, attribute, describe
from bnfold.rules.plan import Affine, Refusal
from bnfold.rules.pooling import PoolingMover, window_facts


class AverageMover(PoolingMover):
    """``affine(avg(x)) = avg(affine(x))`` for the averaging ops."""

    ops = frozenset({"AveragePool", "GlobalAveragePool", "ReduceMean"})

    def refusal(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Refusal | None:
        if node.op_type != "AveragePool":
            return None
        facts = window_facts(node, graph)
        if facts.holds_no_value:
            return Refusal(f"{describe(node)} has a window of padding only")
        shifted = np.flatnonzero(affine.t)
        if attribute(node, "count_include_pad", 0) and facts.reads_counted_padding and shifted.size:
            return Refusal(
                f"{describe(node)} counts its padding (count_include_pad=1): at the border the shift "
                f"would shrink with the share of real values (t ≠ 0 at channel {int(shifted[0])})"
            )
        return None
