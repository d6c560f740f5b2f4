"""Folding every BatchNormalization that can be folded, to a fixed point.

Each pass indexes the graph, reads every BN, asks the rules in order for a plan,
and applies the plans that do not touch the same nodes. Passes repeat until
nothing changes, so chains (a BN whose producer was itself just folded, or a
plan held back because its target was busy) are handled without special cases.
Every BN still present at the end carries the reason it was left.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from bnfold.graph import GraphIndex, describe, node_id
from bnfold.rewrite import apply_plans
from bnfold.rules import AFFINE_READERS, RULES, BatchNorm, FoldPlan, FoldRule, Refusal

BATCHNORM = "BatchNormalization"


@dataclass(frozen=True)
class FoldRecord:
    """One BatchNormalization that was folded away."""

    batchnorm: str
    kind: str
    """The op types folded away: 'BatchNormalization', or e.g. 'Mul+Add' for a decomposed BN."""
    target: str
    rule: str
    direction: str
    notes: tuple[str, ...]


@dataclass(frozen=True)
class LeftRecord:
    """One BatchNormalization left in the graph, and why."""

    batchnorm: str
    reason: str


@dataclass
class FoldOutcome:
    folds: list[FoldRecord] = field(default_factory=list)
    left: list[LeftRecord] = field(default_factory=list)
    removed_initializers: list[str] = field(default_factory=list)


def is_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == BATCHNORM and node.domain in ("", "ai.onnx")


def _unmatched_reason(bn: BatchNorm, graph: GraphIndex) -> str:
    """Why no rule applied at all: name the neighbours that cannot absorb the BN."""
    producer = graph.producer_of(bn.input_name)
    source = describe(producer) if producer is not None else f"graph input '{bn.input_name}'"
    consumers = [describe(node) for node in graph.consumers_of(bn.output_name)]
    if bn.output_name in graph.graph_outputs:
        consumers.append("a graph output")
    readers = ", ".join(consumers) or "nothing"
    return f"no foldable neighbour: input from {source}, output to {readers}"


def _read_affine(node: onnx.NodeProto, graph: GraphIndex) -> BatchNorm | Refusal | None:
    for reader in AFFINE_READERS:
        found = reader(node, graph)
        if found is not None:
            return found
    return None


def _plan_for(bn: BatchNorm, graph: GraphIndex, rules: tuple[FoldRule, ...]) -> FoldPlan | Refusal:
    refusals: list[str] = []
    for rule in rules:
        outcome = rule.plan(bn, graph)
        if isinstance(outcome, FoldPlan):
            return outcome
        if isinstance(outcome, Refusal):
            refusals.append(outcome.reason)
    return Refusal("; ".join(refusals) if refusals else _unmatched_reason(bn, graph))


def fold_batchnorms(model: onnx.ModelProto, rules: tuple[FoldRule, ...] = RULES) -> FoldOutcome:
    """Fold in place every BatchNormalization of ``model.graph`` that a rule can fold.

    Affine maps found by the other readers (decomposed BN forms) are folded too
    when a rule can, but only BatchNormalization nodes are reported as left.
    """
    outcome = FoldOutcome()
    while True:
        graph = GraphIndex(model)
        plans: list[FoldPlan] = []
        busy: set[int] = set()
        left: list[LeftRecord] = []
        for node in graph.nodes:
            bn = _read_affine(node, graph)
            if bn is None:
                continue
            result = bn if isinstance(bn, Refusal) else _plan_for(bn, graph, rules)
            if isinstance(result, Refusal):
                if is_batchnorm(node):
                    left.append(LeftRecord(node_id(node), result.reason))
                continue
            changed = (*result.bn.nodes, result.target, *(update.node for update in result.updates))
            touched = {graph.position_of(n) for n in changed}
            if touched & busy:
                continue  # a node it touches changes in this pass; plan it again in the next
            busy |= touched
            plans.append(result)
        if not plans:
            outcome.left = left
            return outcome
        labels = [(node_id(plan.bn.node), describe(plan.target)) for plan in plans]
        outcome.removed_initializers += apply_plans(model, graph, plans)
        for plan, (bn_label, target_label) in zip(plans, labels):
            outcome.folds.append(
                FoldRecord(
                    bn_label,
                    "+".join(node.op_type for node in plan.bn.nodes),
                    target_label,
                    plan.rule,
                    plan.direction,
                    tuple(plan.notes),
                )
            )
