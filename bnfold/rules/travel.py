"""An affine travels across ops that commute with it until a layer absorbs it.

A per-channel affine ``y = s * x + t`` commutes with many ops, possibly with its constants laid
out differently on the other side: ``affine(M(x)) = M(affine'(x))``. The registry's
:class:`~bnfold.rules.plan.Mover` objects say, for each such op ``M``, what ``affine'`` is.
These two rules move an affine across a chain of them and hand the moved affine to the layer
rules of the same direction (:func:`~bnfold.rules.base.delegate`):

* backward: ``affine(M2(M1(layer(x))))`` becomes ``M2(M1(layer'(x)))``; the layer absorbs the
  affine moved before ``M1``, and ``M2`` writes the affine's output name;
* forward: ``layer(M2(M1(affine(x))))`` becomes ``layer'(M2(M1(x)))``; the layer absorbs the
  affine moved after ``M2``, and ``M1`` reads the affine's input.

Every op crossed must be read only by the next one (the affine's value changes along the way),
and the report names the ops crossed: ``conv-bn through Squeeze, Transpose`` (in the order the
data flows).
"""

from __future__ import annotations

import dataclasses
from abc import abstractmethod

import onnx

from bnfold.graph import GraphIndex, describe, is_standard
from bnfold.rules.base import delegate, reads_only_shape, value_uses
from bnfold.rules.plan import Affine, FoldPlan, FoldRule, Mover, Refusal, RuleSet

MAX_CROSSED = 8
"""Ops one fold may cross: enough for any exporter's chain, and a bound on the search."""


def _mover_for(node: onnx.NodeProto | None, rules: RuleSet) -> Mover | None:
    if node is None or not is_standard(node):
        return None
    return next((mover for mover in rules.movers if node.op_type in mover.ops), None)


def _through(node: onnx.NodeProto, reason: str) -> Refusal:
    return Refusal(f"through {describe(node)}: {reason}")


def _renamed(rule: str, crossed: str, *, first: bool) -> str:
    """``conv-bn`` → ``conv-bn through Transpose``, adding ``crossed`` first or last."""
    layer_rule, _, before = rule.partition(" through ")
    ops = (crossed, before) if first else (before, crossed)
    return f"{layer_rule} through {', '.join(op for op in ops if op)}"


def _combined(results: list[FoldPlan | Refusal | None], node: onnx.NodeProto) -> FoldPlan | Refusal | None:
    """The first plan among ``results``; else their refusals, said to be met through ``node``."""
    plan = next((result for result in results if isinstance(result, FoldPlan)), None)
    if plan is not None:
        return plan
    reasons = [result.reason for result in results if isinstance(result, Refusal)]
    return _through(node, "; ".join(reasons)) if reasons else None


def _unused_outputs_refusal(
    node: onnx.NodeProto, carried: set[int], graph: GraphIndex
) -> Refusal | None:
    """Refuse when an output of ``node`` other than ``carried`` is used: the affine changes
    ``node``'s data, and nothing says how it would change that output (MaxPool's indices)."""
    for position, name in enumerate(node.output):
        if position in carried or not name or not graph.use_count(name):
            continue
        readers = [describe(reader) for reader in graph.consumers_of(name)]
        readers += ["a graph output"] if name in graph.graph_outputs else []
        return Refusal(f"{describe(node)} also writes '{name}', read by {', '.join(readers)}")
    return None


def _merged(plans: list[FoldPlan]) -> FoldPlan:
    """Plans of one affine moved onto several outputs (a Split), as one plan: every output's
    layers absorb it together, or none does."""
    first = plans[0]
    if len(plans) == 1:
        return first
    rules = list(dict.fromkeys(plan.rule for plan in plans))
    return dataclasses.replace(
        first,
        rule=" and ".join(rules),
        updates=[update for plan in plans for update in plan.updates],
        attributes=[update for plan in plans for update in plan.attributes],
        notes=[note for plan in plans for note in plan.notes],
        also_targets=[*first.also_targets, *(node for plan in plans[1:] for node in plan.targets)],
        added_biases=[added for plan in plans for added in plan.added_biases],
        retyped=[retyped for plan in plans for retyped in plan.retyped],
        replaced=[replaced for plan in plans for replaced in plan.replaced],
    )


class _Travel(FoldRule):
    """Cross one movable op, then hand the moved affine to the layer rules or cross the next."""

    def plan(self, affine: Affine, graph: GraphIndex, rules: RuleSet) -> FoldPlan | Refusal | None:
        return self._cross(affine, graph, rules, MAX_CROSSED)

    def _cross(self, affine: Affine, graph: GraphIndex, rules: RuleSet, budget: int) -> FoldPlan | Refusal | None:
        if budget == 0:
            return None
        crossed = self.cross_next(affine, graph, rules)
        if not isinstance(crossed, tuple):
            return crossed
        middle, moved_affines, shape_readers = crossed
        plans = []
        for moved in moved_affines:
            inner = _combined([delegate(moved, self.layer_rules(rules), graph, rules),
                               self._cross(moved, graph, rules, budget - 1)], middle)
            if inner is None and len(moved_affines) > 1:
                uses = [describe(node) for node in graph.consumers_of(moved.output_name)]
                uses += ["a graph output"] * (moved.output_name in graph.graph_outputs)
                inner = _through(middle, f"its output '{moved.output_name}' feeds {', '.join(uses) or 'nothing'}, "
                                 "which cannot absorb it")
            if not isinstance(inner, FoldPlan):
                return inner
            plans.append(inner)
        return self.wrap(_merged(plans), affine, middle, shape_readers) if plans else None

    @abstractmethod
    def cross_next(
        self, affine: Affine, graph: GraphIndex, rules: RuleSet
    ) -> tuple[onnx.NodeProto, list[Affine], list[onnx.NodeProto]] | Refusal | None:
        """The op next to ``affine`` in this direction, the affine moved across it (onto each
        output that carries it), and the nodes that read only the shape of the value the
        fold renames."""

    @abstractmethod
    def layer_rules(self, rules: RuleSet) -> tuple[FoldRule, ...]:
        """The rules that may absorb the moved affine."""

    @abstractmethod
    def wrap(
        self, inner: FoldPlan, affine: Affine, middle: onnx.NodeProto, shape_readers: list[onnx.NodeProto]
    ) -> FoldPlan:
        """``inner`` (the plan for the moved affine) as the plan that removes ``affine``."""


class ThroughIntoProducer(_Travel):
    """``affine(M(layer(x)))`` → ``M(layer'(x))`` for any chain of movable ops ``M``.

    The affine may read any output of ``M`` that carries it, as long as ``M``'s other
    outputs are unused (a Split whose other parts are read elsewhere would change them).
    """

    name = "through-into-producer"

    def cross_next(
        self, affine: Affine, graph: GraphIndex, rules: RuleSet
    ) -> tuple[onnx.NodeProto, list[Affine], list[onnx.NodeProto]] | Refusal | None:
        middle = graph.producer_of(affine.input_name)
        mover = _mover_for(middle, rules)
        if middle is None or mover is None:
            return None
        position = list(middle.output).index(affine.input_name)
        if position not in mover.affine_outputs(middle):
            return None
        moved = mover.backward(middle, affine, graph)
        if not isinstance(moved, Affine):
            return moved
        refusal = _unused_outputs_refusal(middle, {position}, graph)
        if refusal:
            return refusal
        other_uses, shape_readers = value_uses(graph, affine.input_name, besides=affine.nodes[0])
        if other_uses:
            return Refusal(f"{describe(middle)} output also feeds {', '.join(other_uses)}")
        return middle, [dataclasses.replace(
            moved, nodes=(middle,), input_name=middle.input[0], output_name=affine.input_name
        )], shape_readers

    def layer_rules(self, rules: RuleSet) -> tuple[FoldRule, ...]:
        return rules.backward

    def wrap(
        self, inner: FoldPlan, affine: Affine, middle: onnx.NodeProto, shape_readers: list[onnx.NodeProto]
    ) -> FoldPlan:
        # M now writes the affine's output; the ops and the layer behind it keep their names,
        # and a Shape node reading what M wrote reads the new name.
        return dataclasses.replace(
            inner,
            rule=_renamed(inner.rule, middle.op_type, first=False),
            affine=affine,
            target=middle,
            also_targets=[inner.target, *inner.also_targets, *shape_readers],
            notes=[*inner.notes, f"through {describe(middle)}"],
        )


class ThroughIntoConsumer(_Travel):
    """``layer(M(affine(x)))`` → ``layer'(M(x))`` for any chain of movable ops ``M``.

    On an op with several outputs that carry the affine (a Split), the layers after every
    used output must absorb it.
    """

    name = "through-into-consumer"

    def cross_next(
        self, affine: Affine, graph: GraphIndex, rules: RuleSet
    ) -> tuple[onnx.NodeProto, list[Affine], list[onnx.NodeProto]] | Refusal | None:
        readers: list[onnx.NodeProto] = []
        shape_readers: list[onnx.NodeProto] = []
        for node in graph.consumers_of(affine.output_name):
            (shape_readers if reads_only_shape(node, affine.output_name) else readers).append(node)
        middle = readers[0] if len(readers) == 1 and affine.output_name not in graph.graph_outputs else None
        mover = _mover_for(middle, rules)
        if middle is None or mover is None or middle.input[0] != affine.output_name:
            return None
        moved = mover.forward(middle, affine, graph)
        if not isinstance(moved, Affine):
            return None if moved is None else _through(middle, moved.reason)
        carried = mover.affine_outputs(middle)
        refusal = _unused_outputs_refusal(middle, set(carried), graph)
        if refusal:
            return _through(middle, refusal.reason)
        # The layer rules see the affine on M's outputs; their readers already read those values.
        outputs = [middle.output[k] for k in carried if k < len(middle.output) and middle.output[k]]
        return middle, [
            dataclasses.replace(moved, input_name=name, output_name=name) for name in outputs if graph.use_count(name)
        ], shape_readers

    def layer_rules(self, rules: RuleSet) -> tuple[FoldRule, ...]:
        return rules.forward

    def wrap(
        self, inner: FoldPlan, affine: Affine, middle: onnx.NodeProto, shape_readers: list[onnx.NodeProto]
    ) -> FoldPlan:
        # M now reads the affine's input (the rewrite rewires every forward target reading its
        # output), and so does a Shape node that read the affine's output.
        return dataclasses.replace(
            inner,
            rule=_renamed(inner.rule, middle.op_type, first=True),
            affine=affine,
            also_targets=[*inner.also_targets, middle, *shape_readers],
            notes=[f"through {describe(middle)}", *inner.notes],
        )
