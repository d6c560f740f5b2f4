"""Folding every BatchNormalization that can be folded, to a fixed point.

Each pass indexes the graph, reads every BN, asks the rules in order for a plan,
and applies the plans that do not touch the same nodes. Passes repeat until
nothing changes, so chains (a BN whose producer was itself just folded, or a
plan held back because its target was busy) are handled without special cases.
Every BN still present at the end carries the reason it was left.

Subgraphs (If/Loop/Scan bodies) are folded after their enclosing graph, with an
index that sees the enclosing graph's constants; model-local functions are
folded through a graph view of their body.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx
from onnx import helper

from bnfold.errors import first_line
from bnfold.graph import GraphIndex, describe, names_used_by_subgraphs, node_id, subgraphs
from bnfold.io import HeldTensors
from bnfold.rewrite import apply_plans, remove_unused_constants
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
    max_relative_weight_change: float | None = None
    """Largest ``|W' - W| / |W|`` over the target's weight (None: not measured by the rule)."""
    max_rounding_error: float | None = None
    """Largest ``|cast - float64|`` when the new tensors were cast back to the model's dtype."""


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
        try:
            outcome = rule.plan(bn, graph)
        except Exception as error:  # noqa: BLE001 - rules only plan: the graph is untouched
            # A rule that trips over an unforeseen model leaves this BN in place, with the
            # reason, instead of ending the whole run.
            outcome = Refusal(f"rule {rule.name} failed ({type(error).__name__}: {first_line(error)})")
        if isinstance(outcome, FoldPlan):
            return outcome
        if isinstance(outcome, Refusal):
            refusals.append(outcome.reason)
    return Refusal("; ".join(refusals) if refusals else _unmatched_reason(bn, graph))


def _largest(values: list[float | None]) -> float | None:
    measured = [value for value in values if value is not None]
    return max(measured) if measured else None


# New tensor bytes one pass may plan before applying them (see _fold_graph).
PASS_BUDGET_BYTES = 256 * 2**20


@dataclass
class _Run:
    """What every scope of one fold run shares."""

    rules: tuple[FoldRule, ...]
    may_fold: Callable[[str], bool]
    base_dir: Path | None
    held: HeldTensors | None
    outcome: FoldOutcome


def fold_batchnorms(
    model: onnx.ModelProto,
    rules: tuple[FoldRule, ...] = RULES,
    may_fold: Callable[[str], bool] | None = None,
    base_dir: Path | None = None,
    held: HeldTensors | None = None,
) -> FoldOutcome:
    """Fold in place every BatchNormalization that a rule can fold, in ``model.graph``,
    in every If/Loop/Scan body nested in it, and in the model-local functions.

    Affine maps found by the other readers (decomposed BN forms) are folded too
    when a rule can, but only BatchNormalization nodes are reported as left. BNs
    inside subgraphs and functions are labelled with where they are, e.g.
    ``If 'cond' then_branch / bn3``. ``may_fold`` (given a BN's report label)
    restricts the run to some BNs, the others being neither folded nor reported:
    error attribution re-applies folds in groups this way. ``base_dir`` is the
    model file's folder, where weights kept in external data are read from. With
    ``held``, rewritten initializers keep their values there instead of in the
    protobuf, for :func:`bnfold.io.staged_save` to write out.
    """
    run = _Run(rules, may_fold or (lambda _label: True), base_dir, held, FoldOutcome())
    _fold_scope(run, model, model.graph, None, "")
    for function in model.functions:
        _fold_function(run, model, function)
    return run.outcome


def _fold_scope(
    run: _Run, model: onnx.ModelProto, graph: onnx.GraphProto, parent: GraphIndex | None, scope: str
) -> None:
    """Fold ``graph``, then the bodies nested in it (which see its folded constants),
    then drop the constants of ``graph`` that only those bodies read and no longer do."""
    _fold_graph(run, model, graph, parent, scope)
    index = GraphIndex(model, graph, parent=parent, base_dir=run.base_dir, held=run.held)
    read_by_bodies = {name for node in index.nodes for name in names_used_by_subgraphs(node)}
    for node in index.nodes:
        for where, body in subgraphs(node):
            _fold_scope(run, model, body, index, f"{scope}{describe(node)} {where} / ")
    still_read = {name for node in graph.node for name in names_used_by_subgraphs(node)}
    if read_by_bodies - still_read:
        index = GraphIndex(model, graph, parent=parent, base_dir=run.base_dir, held=run.held)
        run.outcome.removed_initializers += remove_unused_constants(index, read_by_bodies - still_read)


def _fold_function(run: _Run, model: onnx.ModelProto, function: onnx.FunctionProto) -> None:
    """Fold inside a model-local function through a graph view of its body.

    A function has no initializers, so the tensors a fold creates become Constant
    nodes. Its inputs are values of the caller: weights passed in are refused as
    graph inputs; only weights constant inside the function fold.
    """
    view = helper.make_model(
        helper.make_graph(
            function.node,
            function.name,
            [helper.make_value_info(name, onnx.TypeProto()) for name in function.input],
            [helper.make_value_info(name, onnx.TypeProto()) for name in function.output],
        ),
        opset_imports=function.opset_import,
        ir_version=model.ir_version,
    )
    before = len(run.outcome.folds)
    # The view's initializers become Constant nodes below: they must hold their values.
    _fold_scope(replace(run, held=None), view, view.graph, None, f"function '{function.name}' / ")
    if len(run.outcome.folds) == before:
        return
    constants = [
        helper.make_node("Constant", [], [tensor.name], name=f"{tensor.name}_constant", value=tensor)
        for tensor in view.graph.initializer
    ]
    del function.node[:]
    function.node.extend([*constants, *view.graph.node])


def _fold_graph(
    run: _Run, model: onnx.ModelProto, graph_proto: onnx.GraphProto, parent: GraphIndex | None, scope: str
) -> None:
    """Fold the BNs of one graph (not its bodies) to a fixed point.

    A pass stops planning once its new tensors reach ``PASS_BUDGET_BYTES``: plans
    hold their tensors until applied, so an unbounded pass over a multi-GB model
    would hold a second copy of every weight. The next pass picks up the rest.
    """
    while True:
        graph = GraphIndex(model, graph_proto, parent=parent, base_dir=run.base_dir, held=run.held)
        candidates: list[FoldPlan] = []
        left: list[LeftRecord] = []
        planned_bytes = 0
        for node in graph.nodes:
            if planned_bytes > PASS_BUDGET_BYTES:
                # Forward folds wait for a complete pass: the backward fold of their
                # layer, later in the graph, must claim the layer first.
                candidates = [c for c in candidates if c.direction == "backward"] or candidates
                break
            if not run.may_fold(scope + node_id(node)):
                continue
            bn = _read_affine(node, graph)
            if bn is None:
                continue
            result = bn if isinstance(bn, Refusal) else _plan_for(bn, graph, run.rules)
            if isinstance(result, Refusal):
                if is_batchnorm(node):
                    left.append(LeftRecord(scope + node_id(node), result.reason))
                continue
            candidates.append(result)
            planned_bytes += sum(update.values.nbytes for update in result.updates)
        plans: list[FoldPlan] = []
        busy: set[int] = set()
        # Backward folds claim their layer first: a forward fold into the same layer may
        # add a node after it, which would hide the layer from the BN that follows it.
        for plan in sorted(candidates, key=lambda candidate: candidate.direction != "backward"):
            touched = {graph.position_of(n) for n in plan.touched_nodes}
            if touched & busy:
                continue  # a node it touches changes in this pass; plan it again in the next
            busy |= touched
            plans.append(plan)
        if not plans:
            run.outcome.left += left
            return
        labels = [(scope + node_id(plan.bn.node), ", ".join(describe(t) for t in plan.targets)) for plan in plans]
        run.outcome.removed_initializers += apply_plans(model, graph, plans)
        for plan, (bn_label, target_label) in zip(plans, labels):
            run.outcome.folds.append(
                FoldRecord(
                    bn_label,
                    "+".join(node.op_type for node in plan.bn.nodes),
                    target_label,
                    plan.rule,
                    plan.direction,
                    tuple(plan.notes),
                    _largest([u.relative_change for u in plan.updates if u.role == "weight"]),
                    _largest([u.rounding_error for u in plan.updates]),
                )
            )
