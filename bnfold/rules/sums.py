"""Sums: Add and Sum nodes whose results feed only each other, read as one sum of terms.

Exporters write ``a + b + c`` as a chain of binary Adds (or one Sum). A sibling branch may sit
anywhere in that chain, so the branch-merge rule sees the whole tree: its nodes, and the terms
they add (every input that is not itself an inner Add or Sum of the tree). Dropping a term
(its value is now added elsewhere) removes it from its Add; an Add left with one input goes,
and the node computing that input takes over the Add's output (:class:`DroppedTerm`).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from bnfold.graph import GraphIndex, describe, is_standard
from bnfold.rules.plan import DroppedTerm, Refusal

SUM_OPS = frozenset({"Add", "Sum"})


def is_sum(node: onnx.NodeProto) -> bool:
    return node.op_type in SUM_OPS and is_standard(node)


@dataclass(frozen=True)
class Term:
    """A value a sum adds: input ``slot`` of the Add or Sum ``node``."""

    node: onnx.NodeProto
    slot: int
    value: str


@dataclass(frozen=True)
class SumTree:
    root: onnx.NodeProto
    nodes: tuple[onnx.NodeProto, ...]
    terms: tuple[Term, ...]


def _only_sum_reading(value: str, graph: GraphIndex) -> onnx.NodeProto | None:
    """The Add or Sum that reads ``value``, once, when nothing else does (a graph output neither)."""
    readers = graph.consumers_of(value)
    if graph.use_count(value) != 1 or len(readers) != 1:
        return None
    reader = readers[0]
    return reader if is_sum(reader) and list(reader.input).count(value) == 1 else None


def _parent(node: onnx.NodeProto, graph: GraphIndex) -> onnx.NodeProto | None:
    """The sum that alone reads ``node``'s result, when ``node`` is an inner node of a tree."""
    return _only_sum_reading(node.output[0], graph)


def is_root(node: onnx.NodeProto, graph: GraphIndex) -> bool:
    """Whether ``node`` is the last Add or Sum of a tree (its result is no inner term)."""
    return is_sum(node) and _parent(node, graph) is None


def sum_tree(root: onnx.NodeProto, graph: GraphIndex, terms_at: frozenset[str] = frozenset()) -> SumTree:
    """The tree of sums ending at ``root`` (:func:`is_root`) and the terms it adds up; a value
    in ``terms_at`` is a term even when an Add computes it (the Add of a decomposed affine)."""
    nodes, terms = [], []
    pending = [root]
    while pending:
        node = pending.pop()
        nodes.append(node)
        for slot, name in enumerate(node.input):
            inner = graph.producer_of(name)
            if (name not in terms_at and inner is not None and is_sum(inner) and inner.output[0] == name
                    and _parent(inner, graph) is node):
                pending.append(inner)
            elif name:
                terms.append(Term(node, slot, name))
    return SumTree(root, tuple(nodes), tuple(terms))


def tree_adding(value: str, graph: GraphIndex) -> tuple[SumTree, Term] | None:
    """The tree of sums that adds ``value`` as a term (read by one sum only, once), and that term."""
    root = _only_sum_reading(value, graph)
    if root is None:
        return None
    while (parent := _parent(root, graph)) is not None:
        root = parent
    tree = sum_tree(root, graph, terms_at=frozenset({value}))
    return tree, next(term for term in tree.terms if term.value == value)


def drop(term: Term, graph: GraphIndex) -> DroppedTerm | Refusal:
    """How the sum loses ``term``; refused when its Add would be left with nothing to pass on."""
    node = term.node
    remaining = [name for slot, name in enumerate(node.input) if slot != term.slot]
    if len(remaining) != 1:
        return DroppedTerm(node, term.slot) if remaining else Refusal(f"{describe(node)} would add nothing")
    heir = graph.producer_of(remaining[0])
    if heir is not None and graph.use_count(remaining[0]) == 1:
        return DroppedTerm(node, term.slot, heir)
    output = node.output[0]
    implicit = [reader for reader in graph.consumers_of(output) if output not in reader.input]
    if output in graph.graph_outputs or implicit:
        return Refusal(f"{describe(node)} would pass '{remaining[0]}' on, which other nodes read too")
    return DroppedTerm(node, term.slot)
