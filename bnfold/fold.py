"""Folding every BatchNormalization that can be folded, to a fixed point.

Each pass indexes the graph, reads every BN, asks the rules in order for a plan,
asks the merge rules about every Add and Sum (sibling branches one layer can
compute), and applies the plans that do not touch the same nodes. Passes repeat
until nothing changes, so chains (a BN whose producer was itself just folded, a
branch whose BN folded before it merges, or a plan held back because its target
was busy) are handled without special cases. Every BN still present at the end
carries the reason it was left.

Subgraphs (If/Loop/Scan bodies) are folded after their enclosing graph, with an
index that sees the enclosing graph's constants; model-local functions are
folded through a graph view of their body.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import onnx

from bnfold.errors import first_line
from bnfold.fold_math import ScaledWeight
from bnfold.graph import (
    AttributeReference,
    GraphIndex,
    describe,
    function_view,
    names_used_by_subgraphs,
    node_id,
    subgraphs,
)
from bnfold.inline import inline_for_folding
from bnfold.io.store import TensorStore
from bnfold.rewrite import apply_plans, initializers_to_constants, remove_unused_constants
from bnfold.rules import AFFINE_READERS, RULES, Affine, FoldPlan, Refusal, RuleSet
from bnfold.rules.plan import MergePlan, TensorUpdate
from bnfold.rules.batchnorm import is_batchnorm
from bnfold.selection import Selection, matched_names


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
    """Largest ``|W' - W| / |W|`` over the weights the fold scaled (None: it scaled none)."""
    max_rounding_error: float | None = None
    """Largest ``|cast - float64|`` when the new tensors were cast back to the model's dtype."""
    partial: bool = False
    """Part of the BN stays in the graph under its name (e.g. the channels of the one Concat
    input no layer could absorb; the notes say which): it is then also listed as left."""


@dataclass(frozen=True)
class MergeRecord:
    """A sibling branch merged into another branch of the same sum (no BN involved)."""

    merged: str
    """The branch (a Conv) that is gone, labelled like a folded BN."""
    target: str
    rule: str
    notes: tuple[str, ...]
    max_rounding_error: float | None = None


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
    overridable_inputs_removed: list[str] = field(default_factory=list)
    """Initializers that were also graph inputs (IR 4+) and that folds replaced or removed, so
    that they are no longer graph inputs: feeding them would not do what it did."""
    inlined_functions: list[str] = field(default_factory=list)
    """Model-local functions inlined before folding, because a BN in them (or next to their
    calls) could only fold with what their callers pass (:mod:`bnfold.inline`)."""
    selectable: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Every BN (and decomposed affine) seen, by report label, with the names a ``--skip`` or
    ``--only`` pattern is matched against: a pattern matching none of them is refused."""
    merges: list[MergeRecord] = field(default_factory=list)
    awaiting: list[_Awaiting[Any]] = field(default_factory=list)
    """Records whose rounding error is measured when their products are computed
    (:class:`~bnfold.fold_math.ScaledWeight`): filled in by :meth:`complete_measurements`."""

    def with_rounding(self, record: _Record, errors: list[float | None], values: list[object]) -> _Record:
        """``record`` with its rounding error: the largest of ``errors`` (measured when the fold
        was planned) and of the products among ``values``. While a product is not measured yet
        (it is computed when the model is written) the record keeps None and waits for
        :meth:`complete_measurements`."""
        products = [value for value in values if isinstance(value, ScaledWeight)]
        measured = _measured(record, errors, products)
        if measured is None:
            self.awaiting.append(_Awaiting(record, errors, products))
            return record
        return measured

    def complete_measurements(self) -> None:
        """Give each awaiting record its rounding error, now that the model was written (which
        computed every product it holds). A product that was never computed (its tensor was
        dropped by a later rewrite) leaves its record's error unmeasured (None)."""
        for awaiting in self.awaiting:
            measured = _measured(awaiting.record, awaiting.errors, awaiting.products)
            if measured is None:
                continue
            records: list[Any] = self.folds if isinstance(awaiting.record, FoldRecord) else self.merges
            records[:] = [measured if record is awaiting.record else record for record in records]
        self.awaiting.clear()


_Record = TypeVar("_Record", FoldRecord, MergeRecord)


@dataclass(frozen=True)
class _Awaiting(Generic[_Record]):
    record: _Record
    errors: list[float | None]
    """The rounding errors measured when the fold was planned."""
    products: list[ScaledWeight]
    """The products whose rounding errors count too, measured once they are computed."""


def _measured(record: _Record, errors: list[float | None], products: list[ScaledWeight]) -> _Record | None:
    """``record`` with the largest of ``errors`` and the products' rounding errors, or None
    while a product is not measured yet. (A product computed before the record is made, as a
    small tensor put into the protobuf when the fold is applied, is measured already.)"""
    if any(product.rounding_error is None for product in products):
        return None
    largest = _largest([*errors, *(product.rounding_error for product in products)])
    return dataclasses.replace(record, max_rounding_error=largest)


def _unmatched_reason(affine: Affine, graph: GraphIndex) -> str:
    """Why no rule applied at all: name the neighbours that cannot absorb the BN."""
    producer = graph.producer_of(affine.input_name)
    source = describe(producer) if producer is not None else f"graph input '{affine.input_name}'"
    consumers = [describe(node) for node in graph.consumers_of(affine.output_name)]
    if affine.output_name in graph.graph_outputs:
        consumers.append("a graph output")
    readers = ", ".join(consumers) or "nothing"
    return f"no foldable neighbour: input from {source}, output to {readers}"


def _failure(what: str, error: Exception) -> Refusal:
    """A reader or rule that trips over an unforeseen model leaves this affine in place, with
    the reason, instead of ending the whole run (they only read: the graph is untouched)."""
    if isinstance(error, AttributeReference):
        return Refusal(str(error))
    return Refusal(f"{what} failed ({type(error).__name__}: {first_line(error)})")


def _read_affine(node: onnx.NodeProto, graph: GraphIndex) -> Affine | Refusal | None:
    for reader in AFFINE_READERS:
        try:
            found = reader(node, graph)
        except Exception as error:  # noqa: BLE001 - see _failure
            return _failure(f"reading {describe(node)}", error)
        if found is not None:
            return found
    return None


def _merely_moves_a_bias(plan: FoldPlan) -> bool:
    """A lone bias Add after a MatMul is how exporters write a Linear's bias: it already is the
    folded form. Folded backward it would come back as a new Add after the layer (nothing
    gained, and the driver would repeat it forever), or turn a MatMul that had no bias into a
    Gemm, which is no BatchNormalization fold; both are left alone. Merging it into a bias the
    layer has (removing another Add) is a fold."""
    affine = plan.affine
    return (
        plan.direction == "backward" and len(affine.nodes) == 1 and affine.node.op_type in ("Add", "Sub")
        and (bool(plan.added_biases) or (bool(plan.retyped) and not plan.replaced))
    )


def _plan_for(affine: Affine, graph: GraphIndex, rules: RuleSet) -> FoldPlan | Refusal:
    """The first plan that removes the whole affine; else the first that removes part of it
    (a later rule may still remove all of it); else every rule's refusal."""
    refusals: list[str] = []
    partial = None
    for rule in rules.order:
        try:
            outcome = rule.plan(affine, graph, rules)
        except Exception as error:  # noqa: BLE001 - see _failure
            outcome = _failure(f"rule {rule.name}", error)
        if isinstance(outcome, FoldPlan) and _merely_moves_a_bias(outcome):
            continue
        if isinstance(outcome, FoldPlan) and not outcome.partial:
            return outcome
        if isinstance(outcome, FoldPlan):
            partial = partial or outcome
        elif isinstance(outcome, Refusal):
            refusals.append(outcome.reason)
    if partial is not None:
        return partial
    return Refusal("; ".join(refusals) if refusals else _unmatched_reason(affine, graph))


def _merge_for(node: onnx.NodeProto, graph: GraphIndex, rules: RuleSet) -> MergePlan | None:
    """The first merge of branches summed by ``node``. A merge is an optional rewrite with
    no BN to leave in place, so a rule that trips over an unforeseen model just merges nothing."""
    for rule in rules.merges:
        try:
            planned = rule.plan(node, graph, rules)
        except Exception:  # noqa: BLE001 - see the docstring
            planned = None
        if planned is not None:
            return planned
    return None


def _largest(values: list[float | None]) -> float | None:
    measured = [value for value in values if value is not None]
    return max(measured) if measured else None


# New tensor bytes one pass may plan before applying them (see _fold_graph).
PASS_BUDGET_BYTES = 256 * 2**20


def _held_bytes(updates: list[TensorUpdate]) -> int:
    """The memory a plan's new tensors hold: a product still to be computed holds none."""
    return sum(update.values.nbytes for update in updates if isinstance(update.values, np.ndarray))


@dataclass
class _Run:
    """What every scope of one fold run shares."""

    rules: RuleSet
    may_fold: Callable[[str], bool]
    selection: Selection
    store: TensorStore
    outcome: FoldOutcome
    origins: dict[str, str] = field(default_factory=dict)
    """Names that inlined nodes had in their functions (:attr:`bnfold.inline.Inlined.origins`)."""


def body_scope(enclosing: str, node: onnx.NodeProto, where: str) -> str:
    """The label prefix of everything in body ``where`` of ``node`` (``If 'branch' then_branch / ``),
    inside the graph whose prefix is ``enclosing`` ("" for the main graph). Reports name BNs
    with it, and body verification finds the body a fold sits in by it."""
    return f"{enclosing}{describe(node)} {where} / "


def function_scope(function: onnx.FunctionProto) -> str:
    """The label prefix of everything in a model-local function (``function 'Block' / ``)."""
    return f"function '{function.name}' / "


def fold_batchnorms(
    model: onnx.ModelProto,
    rules: RuleSet = RULES,
    may_fold: Callable[[str], bool] | None = None,
    store: TensorStore | None = None,
    selection: Selection = Selection(),
) -> FoldOutcome:
    """Fold in place every BatchNormalization that a rule can fold, in ``model.graph``,
    in every If/Loop/Scan body nested in it, and in the model-local functions.

    Affine maps found by the other readers (decomposed BN forms) are folded too
    when a rule can, but only BatchNormalization nodes are reported as left. BNs
    inside subgraphs and functions are labelled with where they are, e.g.
    ``If 'cond' then_branch / bn3``. ``may_fold`` (given a BN's report label)
    restricts the run to some BNs, the others being neither folded nor reported:
    error attribution re-applies folds in groups this way. ``store`` is where the
    model's tensor values are read and rewritten (a loaded model's own): rewritten
    weights stay there as arrays until the model is written. Without one, the folded
    model holds its new values itself. ``selection`` (``--skip``/``--only``) keeps BNs
    out of the fold; they are reported as left with the pattern that kept them.
    Model-local functions whose BNs can only fold with what their callers pass are
    inlined first (:mod:`bnfold.inline`).
    """
    # Floating-point trouble is found by the rules' own checks (an overflow is a refusal with
    # its reason); numpy's warnings would only add lines of its own to the user's stderr.
    with np.errstate(all="ignore"):
        return _fold_model(model, rules, may_fold, store, selection)


def _fold_model(model: onnx.ModelProto, rules: RuleSet, may_fold: Callable[[str], bool] | None,
                store: TensorStore | None, selection: Selection) -> FoldOutcome:
    run = _Run(rules, may_fold or (lambda _label: True), selection, store or TensorStore(), FoldOutcome())
    inlined = inline_for_folding(model, run.store)
    run.outcome.inlined_functions, run.origins = inlined.functions, inlined.origins
    top = _index(run, model, model.graph)
    overridable = [name for name in _input_names(model) if top.is_overridable(name)]
    _fold_scope(run, model, model.graph, None, "")
    for function in model.functions:
        _fold_function(run, model, function)
    still_inputs = set(_input_names(model))
    run.outcome.overridable_inputs_removed = [name for name in overridable if name not in still_inputs]
    if store is None:
        run.store.embed(model)
        run.outcome.complete_measurements()
    return run.outcome


def _input_names(model: onnx.ModelProto) -> list[str]:
    return [value.name for value in model.graph.input]


def _index(run: _Run, model: onnx.ModelProto, graph: onnx.GraphProto, parent: GraphIndex | None = None) -> GraphIndex:
    """An index of ``graph`` as this run sees it (its store, and its view of overridable inputs)."""
    return GraphIndex(model, graph, parent=parent, store=run.store,
                      keep_overridable=run.rules.options.keep_overridable)


def _fold_scope(
    run: _Run, model: onnx.ModelProto, graph: onnx.GraphProto, parent: GraphIndex | None, scope: str
) -> None:
    """Fold ``graph``, then the bodies nested in it (which see its folded constants),
    then drop the constants of ``graph`` that only those bodies read and no longer do.
    A body that redefines a name of an enclosing graph is left as it is."""
    if parent is not None:
        shadowing = _index(run, model, graph, parent).names_shadowing_outer_scopes()
        if shadowing:
            names = ", ".join(f"'{name}'" for name in shadowing[:3]) + ("…" if len(shadowing) > 3 else "")
            _leave_every_batchnorm(run, graph, scope, f"its body redefines {names}, defined outside it too: "
                                   "runtimes read the outer value, so a fold in the body may not be what runs")
            return
    _fold_graph(run, model, graph, parent, scope)
    if parent is not None and model.ir_version < 4:
        initializers_to_constants(model, graph, run.store)
    index = _index(run, model, graph, parent)
    read_by_bodies = {name for node in index.nodes for name in names_used_by_subgraphs(node)}
    for node in index.nodes:
        for where, body in subgraphs(node):
            _fold_scope(run, model, body, index, body_scope(scope, node, where))
    still_read = {name for node in graph.node for name in names_used_by_subgraphs(node)}
    if read_by_bodies - still_read:
        index = _index(run, model, graph, parent)
        run.outcome.removed_initializers += remove_unused_constants(index, read_by_bodies - still_read)


def _leave_every_batchnorm(run: _Run, graph: onnx.GraphProto, scope: str, reason: str) -> None:
    """Report every BN of ``graph`` and of the bodies nested in it as left, with ``reason``."""
    for node in graph.node:
        label = scope + node_id(node)
        if is_batchnorm(node) and run.may_fold(label):
            run.outcome.selectable[label] = matched_names(node)
            run.outcome.left.append(LeftRecord(label, reason))
        for where, body in subgraphs(node):
            _leave_every_batchnorm(run, body, body_scope(scope, node, where), reason)


def _fold_function(run: _Run, model: onnx.ModelProto, function: onnx.FunctionProto) -> None:
    """Fold inside a model-local function through a graph view of its body.

    A function has no initializers, so the tensors a fold creates become Constant
    nodes. Its inputs are values of the caller: weights passed in are refused as
    graph inputs; only weights constant inside the function fold.
    """
    view = function_view(model, function)
    before = len(run.outcome.folds), len(run.outcome.merges)
    _fold_scope(run, view, view.graph, None, function_scope(function))
    if (len(run.outcome.folds), len(run.outcome.merges)) == before:
        return
    initializers_to_constants(view, view.graph, run.store)
    del function.node[:]
    function.node.extend(view.graph.node)


def _fold_graph(
    run: _Run, model: onnx.ModelProto, graph_proto: onnx.GraphProto, parent: GraphIndex | None, scope: str
) -> None:
    """Fold the BNs of one graph (not its bodies) to a fixed point.

    A pass stops planning once its new tensors reach ``PASS_BUDGET_BYTES``: plans
    hold their tensors until applied, so an unbounded pass over a multi-GB model
    would hold a second copy of every weight. The next pass picks up the rest.
    """
    while True:
        graph = _index(run, model, graph_proto, parent)
        candidates: list[FoldPlan] = []
        merges: list[MergePlan] = []
        left: list[LeftRecord] = []
        planned_bytes = 0
        for node in graph.nodes:
            if planned_bytes > PASS_BUDGET_BYTES:
                # Forward folds wait for a complete pass: the backward fold of their
                # layer, later in the graph, must claim the layer first.
                candidates = [c for c in candidates if c.direction == "backward"] or candidates
                break
            merge = _merge_for(node, graph, run.rules)
            if merge is not None and run.may_fold(scope + node_id(merge.merged)):
                merges.append(merge)
                planned_bytes += _held_bytes(merge.updates)
            label = scope + node_id(node)
            if not run.may_fold(label):
                continue
            affine = _read_affine(node, graph)
            if affine is None:
                continue
            names = matched_names(node) + ((run.origins[node.name],) if node.name in run.origins else ())
            run.outcome.selectable[label] = names
            unselected = run.selection.refusal(names)
            if unselected is not None:
                result: FoldPlan | Refusal = Refusal(unselected)
            elif isinstance(affine, Refusal):
                result = affine
            else:
                result = _plan_for(affine, graph, run.rules)
            if isinstance(result, Refusal):
                if is_batchnorm(node):
                    left.append(LeftRecord(label, result.reason))
                continue
            candidates.append(result)
            planned_bytes += _held_bytes(result.updates)
        plans: list[FoldPlan] = []
        chosen_merges: list[MergePlan] = []
        busy: set[int] = set()
        # Backward folds claim their layer first: a forward fold into the same layer may
        # add a node after it, which would hide the layer from the BN that follows it.
        # Merges come last: a branch's own BN folds before the branch merges.
        ordered = sorted(candidates, key=lambda candidate: candidate.direction != "backward")
        changes: list[FoldPlan | MergePlan] = [*ordered, *merges]
        for plan in changes:
            touched = {graph.position_of(n) for n in plan.touched_nodes}
            if touched & busy:
                continue  # a node it touches changes in this pass; plan it again in the next
            busy |= touched
            if isinstance(plan, MergePlan):
                chosen_merges.append(plan)
            else:
                plans.append(plan)
        if not plans and not chosen_merges:
            run.outcome.left += left
            return
        labels = [(scope + node_id(plan.affine.node), ", ".join(describe(t) for t in plan.targets)) for plan in plans]
        merge_labels = [(scope + node_id(merge.merged), describe(merge.target)) for merge in chosen_merges]
        run.outcome.removed_initializers += apply_plans(model, graph, plans, chosen_merges)
        for plan, (bn_label, target_label) in zip(plans, labels):
            record = FoldRecord(
                bn_label,
                plan.affine.kind,
                target_label,
                plan.rule,
                plan.direction,
                tuple(note for note in (plan.affine.note, *plan.notes) if note),
                _largest([update.relative_change for update in plan.updates]),
                partial=plan.partial,
            )
            errors = [update.rounding_error for update in plan.updates] + [
                added.rounding_error for added in plan.added_biases]
            run.outcome.folds.append(
                run.outcome.with_rounding(record, errors, [update.values for update in plan.updates]))
        for merge, (merged_label, target_label) in zip(chosen_merges, merge_labels):
            merged = MergeRecord(merged_label, target_label, merge.rule, tuple(merge.notes))
            run.outcome.merges.append(run.outcome.with_rounding(
                merged, [update.rounding_error for update in merge.updates], [update.values for update in merge.updates]))
