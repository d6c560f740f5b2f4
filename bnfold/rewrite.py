"""Applying fold plans to a graph: new tensors, rewired names, removed nodes.

The rewrite never overwrites a tensor that anything else reads. A weight used
only by the folded node is replaced under its own name (the diff stays readable);
a shared one is left intact for its other users and the folded node gets a new
tensor, which is noted in the report. Initializers and constant-producing nodes
that the folds left unused are removed; nothing else is. A sparse initializer a fold replaces
is written dense under its name (its folded values are no longer sparse). An initializer that
was also a graph input (IR 4+, an overridable default) leaves the inputs once a fold replaces
or removes it.

Besides new tensors, a plan may insert nodes (the bias Add of a layer without a bias
input, the piece of an affine kept in front of a Concat) and drop terms from a sum (a
sibling branch merged into another); an Add left with one term goes, and the node that
computes that term takes over its output name.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper

from bnfold.fold_math import ScaledWeight
from bnfold.graph import GraphIndex, describe, names_used_by_subgraphs, subgraphs
from bnfold.io.store import TensorStore
from bnfold.rules.plan import AddedBias, AttributeUpdate, DroppedTerm, FoldPlan, InsertedAffine, MergePlan, TensorUpdate


class _NameAllocator:
    """Fresh names that collide with nothing in the model.

    Value names must be unique across a graph and every nested body (a body may read outer
    values by name), and a name that only appears in value_info or a graph output still
    declares a value; node names are kept apart from them too, so the whole model is searched:
    every graph and body, and the model-local functions.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self._taken: set[str] = set()
        pending = [model.graph]
        for function in model.functions:
            self._taken.update((*function.input, *function.output))
            self._add_nodes(function.node, pending)
        while pending:
            current = pending.pop()
            self._taken.update(tensor.name for tensor in current.initializer)
            self._taken.update(tensor.values.name for tensor in current.sparse_initializer)
            self._taken.update(value.name for value in (*current.input, *current.output, *current.value_info))
            self._add_nodes(current.node, pending)

    def _add_nodes(self, nodes: Iterable[onnx.NodeProto], pending: list[onnx.GraphProto]) -> None:
        for node in nodes:
            self._taken.update((*node.input, *node.output, node.name))
            pending.extend(body for _, body in subgraphs(node))

    def fresh(self, base: str) -> str:
        candidate, counter = f"{base}_bnfold", 1
        while candidate in self._taken:
            counter += 1
            candidate = f"{base}_bnfold{counter}"
        self._taken.add(candidate)
        return candidate


def initializers_to_constants(model: onnx.ModelProto, graph: onnx.GraphProto, store: TensorStore) -> None:
    """Turn the initializers of ``graph`` into Constant nodes at its start.

    For the graphs that cannot hold initializers: a model-local function's body, and an
    If/Loop/Scan body of an IR < 4 model (there every initializer must also be an input of its
    graph, which a body's fixed signature cannot have). Folds there create initializers like
    anywhere else; they are turned into nodes once the body is folded. A body that declared its
    own initializers as inputs, as IR 3 has it do, no longer declares them: the If, Loop or Scan
    never fed them, and a name both an input and a Constant's output is not single assignment.
    """
    if not graph.initializer:
        return
    names = _NameAllocator(model)
    constants = [
        helper.make_node("Constant", [], [tensor.name], name=names.fresh(f"{tensor.name}_constant"),
                         value=store.materialize(tensor))
        for tensor in graph.initializer
    ]
    converted = {tensor.name for tensor in graph.initializer}
    inputs = [value for value in graph.input if value.name not in converted]
    nodes = [*constants, *graph.node]
    del graph.initializer[:]
    del graph.node[:]
    del graph.input[:]
    graph.node.extend(nodes)
    graph.input.extend(inputs)


def _set_attribute(update: AttributeUpdate) -> None:
    node = update.node
    for position, attribute in enumerate(node.attribute):
        if attribute.name == update.name:
            del node.attribute[position]
            break
    node.attribute.append(helper.make_attribute(update.name, update.value))


def _add_initializer(index: GraphIndex, name: str, values: np.ndarray | ScaledWeight) -> onnx.TensorProto:
    """A new initializer of ``index.graph``; in an IR < 4 model, whose checker requires every
    top-level initializer to be a graph input, declared as one too (a body's inputs are its
    signature, so there it is not)."""
    tensor = index.store.create(name, values)
    index.graph.initializer.append(tensor)
    if index.model.ir_version < 4 and index.parent is None:
        index.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(values.shape)))
    return index.graph.initializer[-1]


def _apply_update(
    graph: onnx.GraphProto, index: GraphIndex, update: TensorUpdate, names: _NameAllocator
) -> tuple[str | None, str | None]:
    """Write one new tensor; return (replaced input name, note) for bookkeeping."""
    node = update.node
    old_name = node.input[update.slot] if update.slot < len(node.input) else ""
    existing = index.initializers.get(old_name)
    sparse = index.sparse_initializers.get(old_name)
    stored = existing if existing is not None else sparse
    sole_reader = (
        stored is not None
        and index.use_count(old_name) == 1
        and list(node.input).count(old_name) == 1
        and not index.is_runtime_input(old_name)
        and list(stored.dims) == list(update.values.shape)
    )
    if sole_reader:
        if existing is not None:
            index.store.replace(existing, update.values)
        else:  # the folded values are written dense, under the same name
            _delete_where(graph.sparse_initializer, lambda tensor: tensor.values.name == old_name)
            _add_initializer(index, old_name, update.values)
        if index.is_overridable(old_name):
            # Fed at run time, the input would now replace the folded values: it is no longer one.
            _delete_where(graph.input, lambda value: value.name == old_name)
        return None, None
    base = old_name or f"{node.name or node.output[0]}_{update.role}"
    tensor = _add_initializer(index, names.fresh(base), update.values)
    while len(node.input) <= update.slot:
        node.input.append("")
    node.input[update.slot] = tensor.name
    note = None
    if old_name and index.use_count(old_name) > 1:
        note = f"{update.role} '{old_name}' is shared; {describe(node)} got its own copy '{tensor.name}'"
    return (old_name or None), note


def _bias_node(index: GraphIndex, added: AddedBias, names: _NameAllocator) -> onnx.NodeProto:
    """Store the bias and return an Add that takes over ``added.node``'s output name.

    The node writes a fresh name instead; the Add is placed into ``graph.node`` later
    (:func:`_insert_after_producers`), once the folded nodes are deleted by position.
    """
    node = added.node
    output = node.output[0]
    label = node.name or output
    tensor = _add_initializer(index, names.fresh(f"{label}_{added.role}"), added.values)
    node.output[0] = names.fresh(output)
    return helper.make_node("Add", [node.output[0], tensor.name], [output], name=names.fresh(f"{label}_add"))


def _affine_nodes(index: GraphIndex, inserted: InsertedAffine, names: _NameAllocator) -> list[onnx.NodeProto]:
    """The node(s) computing ``inserted`` on its edge; the reader now reads their output.

    Like :func:`_bias_node`, they are placed into ``graph.node`` later (:func:`_insert_after_producers`).
    """
    reader = inserted.reader
    value = reader.input[inserted.slot]
    if inserted.batchnorm:
        statistics = [inserted.scale, inserted.shift, np.zeros_like(inserted.scale), np.ones_like(inserted.scale)]
        tensors = [_add_initializer(index, names.fresh(f"{value}_{role}"), values).name
                   for role, values in zip(("scale", "shift", "mean", "var"), statistics)]
        nodes = [helper.make_node("BatchNormalization", [value, *tensors], [names.fresh(value)],
                                  name=inserted.name, epsilon=0.0)]
    else:
        nodes = []
        for op_type, role, values, neutral in (("Mul", "scale", inserted.scale, 1), ("Add", "shift", inserted.shift, 0)):
            if np.all(values == neutral):
                continue
            data = nodes[-1].output[0] if nodes else value
            tensor = _add_initializer(index, names.fresh(f"{value}_{role}"), values)
            nodes.append(helper.make_node(op_type, [data, tensor.name], [names.fresh(value)],
                                          name=names.fresh(f"{value}_{op_type.lower()}")))
    if nodes:
        reader.input[inserted.slot] = nodes[-1].output[0]
    return nodes


def _drop_term(index: GraphIndex, term: DroppedTerm, removed_positions: set[int], stale_value_info: set[str]) -> None:
    """Remove a term from its Add or Sum; a node left with one input goes, its heir (or its
    readers) taking over (see :class:`~bnfold.rules.plan.DroppedTerm`)."""
    node = term.node
    remaining = [name for slot, name in enumerate(node.input) if slot != term.slot]
    if len(remaining) > 1:
        del node.input[term.slot]
        return
    removed_positions.add(index.position_of(node))
    output = node.output[0]
    if term.heir is not None:
        term.heir.output[list(term.heir.output).index(remaining[0])] = output
        stale_value_info.add(remaining[0])
        return
    for reader in index.consumers_of(output):
        for position, name in enumerate(reader.input):
            if name == output:
                reader.input[position] = remaining[0]
    stale_value_info.add(output)


def _insert_after_producers(graph: onnx.GraphProto, added_nodes: list[onnx.NodeProto]) -> None:
    """Place each new node right after the node whose output it reads (a new node reading
    another new one after that one; one reading a graph input or a constant first), keeping
    the graph topologically sorted (protobuf repeated fields cannot insert in place)."""
    produced = {name for node in (*graph.node, *added_nodes) for name in node.output}
    after: dict[str, list[onnx.NodeProto]] = {}
    first: list[onnx.NodeProto] = []
    for added in added_nodes:
        (after.setdefault(added.input[0], []) if added.input[0] in produced else first).append(added)
    ordered: list[onnx.NodeProto] = []

    def place(node: onnx.NodeProto) -> None:
        ordered.append(node)
        for name in node.output:
            for follower in after.pop(name, ()):
                place(follower)

    for node in first:
        place(node)
    for node in graph.node:
        kept = onnx.NodeProto()
        kept.CopyFrom(node)
        place(kept)
    del graph.node[:]
    graph.node.extend(ordered)


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


def apply_plans(
    model: onnx.ModelProto, index: GraphIndex, plans: list[FoldPlan], merges: list[MergePlan] | None = None
) -> list[str]:
    """Apply non-overlapping fold and merge plans (built against ``index``) to ``index.graph`` in place.

    ``index.graph`` is ``model.graph`` or one of its subgraphs. Returns the names
    of initializers that became unused and were removed.
    """
    graph = index.graph
    names = _NameAllocator(model)
    released: list[str] = []  # values that lost a reader; unused ones are removed below
    removed_positions: set[int] = set()
    stale_value_info: set[str] = set()
    added_nodes: list[onnx.NodeProto] = []
    copies: list[tuple[FoldPlan | MergePlan, TensorUpdate, str, str]] = []
    changes: list[FoldPlan | MergePlan] = [*plans, *(merges or [])]
    for plan in changes:
        for update in plan.updates:
            old_name, note = _apply_update(graph, index, update, names)
            if old_name:
                released.append(old_name)
            if note:
                plan.notes.append(note)
            if note and old_name:
                copies.append((plan, update, old_name, note))
        if isinstance(plan, MergePlan):
            removed_positions.add(index.position_of(plan.merged))
            stale_value_info.add(plan.merged.output[0])
            released.extend(name for name in plan.merged.input[1:] if name)
        else:
            added_nodes += _apply_fold(index, plan, names, removed_positions, stale_value_info, released)
        for term in plan.dropped_terms:
            _drop_term(index, term, removed_positions, stale_value_info)
    removed = _remove_dead_constants(index, released, removed_positions, stale_value_info)
    reclaimed = _reclaim_original_names(graph, copies, removed)
    if added_nodes:  # last: it rebuilds graph.node, so the plans' node handles go stale
        _insert_after_producers(graph, added_nodes)
    return [name for name in removed if name not in reclaimed]


def _apply_fold(
    index: GraphIndex,
    plan: FoldPlan,
    names: _NameAllocator,
    removed_positions: set[int],
    stale_value_info: set[str],
    released: list[str],
) -> list[onnx.NodeProto]:
    """Rewire around one folded affine and remove it; return the nodes it adds."""
    for attribute in plan.attributes:
        _set_attribute(attribute)
    for retyped in plan.retyped:
        retyped.node.op_type, retyped.node.domain = retyped.op_type, ""
    for replaced in plan.replaced:
        written = replaced.by.output[0]
        removed_positions.add(index.position_of(replaced.node))
        released.extend(name for name in replaced.node.input if name and name != written)  # its constants
        stale_value_info.add(written)
        replaced.by.output[0] = replaced.node.output[0]
    affine = plan.affine
    if plan.direction == "backward":
        _take_output_name(plan)
        stale_value_info.add(affine.input_name)
    elif plan.direction == "forward":
        stale_value_info.add(affine.output_name)
        for target in plan.targets:
            for position, name in enumerate(target.input):
                if name == affine.output_name:
                    target.input[position] = affine.input_name
    else:  # sibling: the affine's term leaves the sum (its dropped term), nothing reads its output
        stale_value_info.add(affine.output_name)
    added = [_bias_node(index, bias, names) for bias in plan.added_biases]
    added += [node for inserted in plan.inserted_affines for node in _affine_nodes(index, inserted, names)]
    removed_positions.update(index.position_of(node) for node in affine.nodes)
    stale_value_info.update(node.output[0] for node in affine.nodes[:-1])
    released.extend(affine.parameter_names)
    return added


def _take_output_name(plan: FoldPlan) -> None:
    """Backward: the target writes the affine's output in place of the value the affine read;
    the plan's other nodes that read that value (only for its shape) read the new name."""
    affine = plan.affine
    target = plan.target
    target.output[list(target.output).index(affine.input_name)] = affine.output_name
    for node in plan.also_targets:
        for position, name in enumerate(node.input):
            if name == affine.input_name:
                node.input[position] = affine.output_name


def _reclaim_original_names(
    graph: onnx.GraphProto, copies: list[tuple[FoldPlan | MergePlan, TensorUpdate, str, str]], removed: list[str]
) -> set[str]:
    """Give a copied weight its original name back when the original is gone.

    A weight read by other nodes gets a copy, but when those readers only computed
    the folded node's other constants (an exporter's zero bias
    ``Expand(CastLike(0, W), Shape(W))``), they were removed with the original:
    the copy then takes the original's name and the "shared" note is withdrawn.
    Returns the reclaimed names.
    """
    free = set(removed)
    tensors = {tensor.name: tensor for tensor in graph.initializer}
    declared = {value.name: value for value in graph.input}
    reclaimed: set[str] = set()
    for plan, update, old_name, note in copies:
        if old_name not in free:
            continue
        free.discard(old_name)
        copy_name = update.node.input[update.slot]
        tensors[copy_name].name = old_name
        if copy_name in declared:
            declared[copy_name].name = old_name
        update.node.input[update.slot] = old_name
        plan.notes.remove(note)
        reclaimed.add(old_name)
    return reclaimed


def remove_unused_constants(index: GraphIndex, released: Iterable[str]) -> list[str]:
    """Remove the initializers and constant nodes of ``index.graph`` that computed
    ``released`` values and are now read by nothing (e.g. outer-scope weights that
    folds inside subgraphs replaced). Returns the removed initializers' names."""
    return _remove_dead_constants(index, list(released), set(), set())


def _remove_dead_constants(
    index: GraphIndex, released: list[str], removed_positions: set[int], stale_value_info: set[str]
) -> list[str]:
    """Delete ``removed_positions`` and whatever only computed ``released`` values."""
    graph = index.graph
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
        released.extend(name for p in dead for name in index.nodes[p].input if name)  # their inputs too
    for position in sorted(removed_positions, reverse=True):
        del graph.node[position]

    used = _names_read(graph.node) | graph_outputs
    removed_initializers = [
        name for name in dict.fromkeys(released) if index.has_initializer(name) and name not in used
    ]
    stale_value_info.update(removed_initializers)
    dropped = set(removed_initializers)
    _delete_where(graph.initializer, lambda tensor: tensor.name in dropped)
    _delete_where(graph.sparse_initializer, lambda tensor: tensor.values.name in dropped)
    _delete_where(graph.input, lambda value: value.name in dropped)
    _delete_where(graph.value_info, lambda value: value.name in stale_value_info)
    return removed_initializers
