"""Applying fold plans to a graph: new tensors, rewired names, removed nodes.

The rewrite never overwrites a tensor that anything else reads. A weight used
only by the folded node is replaced under its own name (the diff stays readable);
a shared one is left intact for its other users and the folded node gets a new
tensor, which is noted in the report. Initializers and constant-producing nodes
that the folds left unused are removed; nothing else is.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import numpy as np

import onnx
from onnx import helper, numpy_helper

from bnfold.graph import GraphIndex, describe, names_used_by_subgraphs
from bnfold.rules import FoldPlan, TensorUpdate
from bnfold.rules.base import AppendedNode


class _NameAllocator:
    """Fresh value names that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._taken = {tensor.name for tensor in graph.initializer}
        self._taken.update(value.name for value in graph.input)
        for node in graph.node:
            self._taken.update(node.input)
            self._taken.update(node.output)

    def fresh(self, base: str) -> str:
        candidate, counter = f"{base}_bnfold", 1
        while candidate in self._taken:
            counter += 1
            candidate = f"{base}_bnfold{counter}"
        self._taken.add(candidate)
        return candidate


def _set_attribute(node: onnx.NodeProto, name: str, value: float | int) -> None:
    for position, attribute in enumerate(node.attribute):
        if attribute.name == name:
            del node.attribute[position]
            break
    node.attribute.append(helper.make_attribute(name, value))


def _overwrite_data(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    """Give an initializer new values of the same shape, keeping its name.

    Assigning ``raw_data`` directly avoids building a second TensorProto and
    copying it over, which matters for large weights; other layouts (typed fields,
    another dtype, big-endian hosts) go through numpy_helper.
    """
    same_layout = (
        tensor.HasField("raw_data")
        and tensor.data_type == helper.np_dtype_to_tensor_dtype(values.dtype)
        and sys.byteorder == "little"
    )
    if same_layout:
        tensor.raw_data = np.ascontiguousarray(values).tobytes()
    else:
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def _apply_update(
    graph: onnx.GraphProto, index: GraphIndex, update: TensorUpdate, names: _NameAllocator
) -> tuple[str | None, str | None]:
    """Write one new tensor; return (replaced input name, note) for bookkeeping."""
    node = update.node
    old_name = node.input[update.slot] if update.slot < len(node.input) else ""
    existing = index.initializers.get(old_name)
    sole_reader = (
        existing is not None
        and index.use_count(old_name) == 1
        and list(node.input).count(old_name) == 1
        and not index.is_runtime_input(old_name)
        and list(existing.dims) == list(update.values.shape)
    )
    if sole_reader:
        _overwrite_data(existing, update.values)
        return None, None
    base = old_name or f"{node.name or node.output[0]}_{update.role}"
    tensor = numpy_helper.from_array(update.values, names.fresh(base))
    graph.initializer.append(tensor)
    while len(node.input) <= update.slot:
        node.input.append("")
    node.input[update.slot] = tensor.name
    note = None
    if old_name and index.use_count(old_name) > 1:
        note = f"{update.role} '{old_name}' is shared; {describe(node)} got its own copy '{tensor.name}'"
    return (old_name or None), note


def _appended_node(
    graph: onnx.GraphProto, plan: FoldPlan, spec: AppendedNode, names: _NameAllocator
) -> onnx.NodeProto:
    """Build the node a plan appends after its target, with its constants as new initializers."""
    base = plan.target.name or plan.target.output[0]
    inputs = [plan.target.output[0]]
    for role, values in spec.constants:
        tensor = numpy_helper.from_array(values, names.fresh(f"{base}_{role}"))
        graph.initializer.append(tensor)
        inputs.append(tensor.name)
    return helper.make_node(
        spec.op_type, inputs, [plan.bn.output_name], name=names.fresh(f"{base}_{spec.op_type.lower()}")
    )


def _delete_where(repeated, doomed) -> None:  # noqa: ANN001 - any protobuf repeated field
    """Delete the elements for which ``doomed(element)`` holds, in place.

    Deleting by position (from the end) keeps the surviving messages where they are,
    instead of copying every one of them into a rebuilt list.
    """
    for position in reversed([p for p, element in enumerate(repeated) if doomed(element)]):
        del repeated[position]


def _names_read(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    used: set[str] = set()
    for node in nodes:
        used.update(name for name in node.input if name)
        used.update(names_used_by_subgraphs(node))
    return used


def _constant_ancestors(index: GraphIndex, names: Iterable[str]) -> set[int]:
    """Positions of the nodes that computed the replaced constants, transitively."""
    found: set[int] = set()
    stack = [name for name in names]
    while stack:
        producer = index.producer_of(stack.pop())
        if producer is None:
            continue
        position = index.position_of(producer)
        if position not in found:
            found.add(position)
            stack.extend(name for name in producer.input if name)
    return found


def apply_plans(model: onnx.ModelProto, index: GraphIndex, plans: list[FoldPlan]) -> list[str]:
    """Apply non-overlapping plans (built against ``index``) to ``model.graph`` in place.

    Returns the names of initializers that became unused and were removed.
    """
    graph = model.graph
    names = _NameAllocator(graph)
    released: list[str] = []  # values that lost a reader; unused ones are removed below
    removed_positions: set[int] = set()
    stale_value_info: set[str] = set()
    appended: list[onnx.NodeProto] = []  # each goes right after the node whose output it reads
    for plan in plans:
        for update in plan.updates:
            old_name, note = _apply_update(graph, index, update, names)
            if old_name:
                released.append(old_name)
            if note:
                plan.notes.append(note)
        for attribute, value in plan.attributes.items():
            _set_attribute(plan.target, attribute, value)
        bn = plan.bn
        if plan.direction == "backward" and plan.appended is not None:
            appended.append(_appended_node(graph, plan, plan.appended, names))
        elif plan.direction == "backward":
            stale_value_info.add(plan.target.output[0])
            plan.target.output[0] = bn.output_name
        else:
            for position, name in enumerate(plan.target.input):
                if name == bn.output_name:
                    plan.target.input[position] = bn.input_name
        removed_positions.update(index.position_of(node) for node in bn.nodes)
        stale_value_info.update(node.output[0] for node in bn.nodes[:-1])
        released.extend(bn.parameter_names)

    # Nodes that only computed replaced constants (Constant, Identity, Cast...) may now be dead.
    candidates = _constant_ancestors(index, released) - removed_positions
    graph_outputs = {value.name for value in graph.output}
    while candidates:
        alive = [n for p, n in enumerate(index.nodes) if p not in removed_positions]
        used = _names_read(alive) | graph_outputs
        dead = {p for p in candidates if not any(o in used for o in index.nodes[p].output if o)}
        if not dead:
            break
        removed_positions |= dead
        candidates -= dead
    for position in sorted(removed_positions, reverse=True):
        del graph.node[position]
    for node in appended:
        position = next(p for p, existing in enumerate(graph.node) if node.input[0] in existing.output)
        graph.node.insert(position + 1, node)

    used = _names_read(graph.node) | graph_outputs
    removed_initializers = [
        name for name in dict.fromkeys(released) if name in index.initializers and name not in used
    ]
    stale_value_info.update(removed_initializers)
    dropped = set(removed_initializers)
    _delete_where(graph.initializer, lambda tensor: tensor.name in dropped)
    _delete_where(graph.input, lambda value: value.name in dropped)
    _delete_where(graph.value_info, lambda value: value.name in stale_value_info)
    return removed_initializers
