"""Identity and inference Dropout: ops that pass values through, which an affine crosses as is.

Older exporters leave an ``Identity`` after a layer, or an inference-mode ``Dropout``
(paddle2onnx writes ``ConvTranspose → Identity → Add → Identity → BN``). Both return their
input unchanged, so ``affine(M(x)) = M(affine(x))`` on the same axis. A Dropout qualifies only
when it cannot drop anything: its ``training_mode`` input (opset 12+) is absent or a constant
false, before opset 7 its ``is_test`` is set, and its mask output is unused.
"""

from __future__ import annotations

import onnx

from bnfold.graph import GraphIndex, attribute, describe
from bnfold.rules.plan import Affine, Refusal, SymmetricMover


class PassThroughMover(SymmetricMover):
    """``affine(Identity(x)) = Identity(affine(x))``; likewise for an inference Dropout."""

    ops = frozenset({"Identity", "Dropout"})

    def cross(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal:
        if node.op_type == "Dropout":
            mask_used = len(node.output) > 1 and node.output[1] and graph.use_count(node.output[1])
            training = graph.constant_value(node.input[2]) if len(node.input) > 2 and node.input[2] else False
            if graph.default_opset() < 7 and not attribute(node, "is_test", 0):
                training = True
            if mask_used or training is None or bool(training):
                return Refusal(f"{describe(node)} may drop values (training mode or its mask is used)")
        return affine
