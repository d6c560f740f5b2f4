"""An affine that computes nothing (``x * 1``, ``x / 1``, ``x - 0``) is removed: its readers read its input.

PaddleOCR exports swish as ``x * sigmoid(1.0 * x)``, leaving a ``Mul`` by 1 on every such
activation; onnxslim and onnxsim drop them. Such a node returns its input bit for bit, so no layer
needs to absorb it. Only single nodes are removed, of those three forms: ``x + 0`` turns ``-0.0``
into ``+0.0``, and a chain such as ``x * 2 * 0.5`` may overflow half-way, so neither is exactly
its input. The data must be known not to be widened by the constant (a ``[C]`` constant on data of
unknown size might broadcast one channel to C), and every reader must read the value directly
(not from inside an If/Loop/Scan body, which a rewiring does not reach), nor may it be a graph
output, whose name must stay.
"""

from __future__ import annotations

import numpy as np

from bnfold.graph import GraphIndex, describe, names_used_by_subgraphs
from bnfold.rules.decomposed import constant_operand
from bnfold.rules.plan import Affine, FoldPlan, FoldRule, Refusal, RuleSet

REMOVABLE = {"Mul": 1.0, "Div": 1.0, "Sub": 0.0}
"""Op types, by the constant value that makes them return their data input unchanged."""


class IdentityAffine(FoldRule):
    """``readers(x * 1)`` → ``readers(x)``, likewise ``x / 1`` and ``x - 0``."""

    name = "identity"

    def plan(self, affine: Affine, graph: GraphIndex, rules: RuleSet) -> FoldPlan | Refusal | None:
        if len(affine.nodes) != 1 or not (affine.uniform or affine.exact_channels):
            return None
        node = affine.node
        operand = constant_operand(node, graph)
        if node.op_type not in REMOVABLE or operand is None or (operand[0] != 1 and node.op_type != "Mul"):
            return None  # not one of the three forms (``c - x`` and ``c / x`` are not the data)
        if not np.all(operand[1].astype(np.float64) == REMOVABLE[node.op_type]):
            return None
        if affine.output_name in graph.graph_outputs:
            return Refusal(f"{describe(node)} computes nothing, but its output is a graph output")
        readers = graph.consumers_of(affine.output_name)
        if not readers or any(affine.output_name in names_used_by_subgraphs(reader) for reader in readers):
            return None
        return FoldPlan(
            rule=self.name, affine=affine, target=readers[0], direction="forward", updates=[],
            also_targets=readers[1:], notes=[f"{describe(node)} returns its input unchanged"],
        )
