"""An index over one ONNX graph: who produces a value, who consumes it, what is constant.

Rules ask questions in these terms ("the Conv's output has other consumers",
"the weight is a constant") and never walk ``graph.node`` themselves. Nodes are
identified by their position in ``graph.node``: protobuf message wrappers are not
stable Python objects, positions are (the index is rebuilt after each rewrite).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import onnx
from onnx import helper

from bnfold.io.load import weightless_copy
from bnfold.io.store import TensorStore

Dim = int | str | None
"""A size: a number, a symbolic size by name (``dim_param``), or unknown."""

# Ops through which a shape tensor's entries pass unchanged (only the tensor's layout changes).
_ENTRY_PRESERVING = frozenset({"Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Flatten"})
_SHAPE_DEPTH = 16

# Ops whose value changes from run to run: never evaluated as constants.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


SliceArguments = tuple[list[int] | None, list[int] | None, list[int] | None, list[int] | None]
"""A Slice's starts, ends, axes and steps, each None where the node does not give it."""


def subgraphs(node: onnx.NodeProto) -> Iterator[tuple[str, onnx.GraphProto]]:
    """The graphs in a node's attributes (If branches, Loop/Scan bodies), each with
    the attribute's name (``then_branch``, or ``name[i]`` in a list of graphs)."""
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.name, attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from ((f"{attribute.name}[{i}]", graph) for i, graph in enumerate(attribute.graphs))


def names_used_by_subgraphs(node: onnx.NodeProto) -> Iterator[str]:
    """Every value name read inside the node's subgraph attributes (If/Loop/Scan bodies).

    An over-approximation (names defined inside the body are included too), which
    only ever makes a value look *more* used: safe for deciding whether a fold may
    remove or rename it.
    """
    for attribute in node.attribute:
        graphs: Iterable[onnx.GraphProto] = ()
        if attribute.type == onnx.AttributeProto.GRAPH:
            graphs = (attribute.g,)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            graphs = attribute.graphs
        for graph in graphs:
            for inner in graph.node:
                yield from (name for name in inner.input if name)
                yield from names_used_by_subgraphs(inner)
            yield from (output.name for output in graph.output)


def function_view(model: onnx.ModelProto, function: onnx.FunctionProto) -> onnx.ModelProto:
    """A model whose graph is ``function``'s body, its formal inputs as graph inputs (of unknown
    type): rules read a function through the same index as a graph. The view shares nothing with
    ``model``; nodes are copied."""
    return helper.make_model(
        helper.make_graph(
            function.node,
            function.name,
            [helper.make_value_info(name, onnx.TypeProto()) for name in function.input],
            [helper.make_value_info(name, onnx.TypeProto()) for name in function.output],
        ),
        opset_imports=function.opset_import,
        ir_version=model.ir_version,
    )


def is_standard(node: onnx.NodeProto) -> bool:
    """Whether the node is in the default ``ai.onnx`` domain, whose op types the rules know."""
    return node.domain in ("", "ai.onnx")


class AttributeReference(ValueError):
    """An attribute inside a function body that only names an attribute of the function
    (``ref_attr_name``): its value differs from call to call, so no rule can read it."""


def _value(node: onnx.NodeProto, found: onnx.AttributeProto) -> Any:
    if found.ref_attr_name:
        raise AttributeReference(
            f"{describe(node)} takes its {found.name} from the function attribute '{found.ref_attr_name}', "
            "which each call sets"
        )
    return helper.get_attribute_value(found)


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes by name, as Python values (bytes for strings).

    Raises:
        AttributeReference: for an attribute that refers to a function attribute.
    """
    return {found.name: _value(node, found) for found in node.attribute}


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """One attribute's value, or ``default`` when the node does not set it.

    Raises:
        AttributeReference: when it refers to a function attribute.
    """
    for found in node.attribute:
        if found.name == name:
            return _value(node, found)
    return default


def describe(node: onnx.NodeProto) -> str:
    """A short human label: ``Conv 'conv1'``, or ``Conv → 'y3'`` for an unnamed node."""
    return f"{node.op_type} '{node.name}'" if node.name else f"{node.op_type} {node_id(node)}"


def node_id(node: onnx.NodeProto) -> str:
    """A node's name, or ``→ 'output'`` for an unnamed one (where the op type is implied)."""
    if node.name:
        return node.name
    return f"→ '{next((name for name in node.output if name), '?')}'"


def _evaluate(node: onnx.NodeProto, feeds: dict[str, np.ndarray], opset: int) -> list[Any] | None:
    """Run one standard-domain node on constant inputs with onnx's reference evaluator, as the
    version of the op that ``opset`` imports; None when it cannot be evaluated.

    The node is wrapped in a one-node graph: for a bare NodeProto the evaluator ignores
    ``opsets`` and runs the newest version of the op, which rejects the forms of older opsets
    (Unsqueeze's ``axes`` attribute before 13, Clip's ``min``/``max`` before 11, Pad's ``pads``
    before 11...). An op the evaluator implements only from a later version on (DequantizeLinear
    before 19) falls back to the newest version: it accepts the old form where that is still
    valid, with the same meaning, and rejects it otherwise.
    """
    # Imported on first use: most models never need it, and loading it costs 15 ms.
    from onnx.reference import ReferenceEvaluator

    untyped = onnx.TypeProto()
    single = helper.make_graph(
        [node], "constant", [helper.make_value_info(name, untyped) for name in feeds],
        [helper.make_value_info(name, untyped) for name in node.output if name],
    )
    for version in dict.fromkeys((opset, onnx.defs.onnx_opset_version())):
        try:
            evaluator = ReferenceEvaluator(single, opsets={"": version})
        except Exception:  # noqa: BLE001 - no implementation of the op at this version
            continue
        try:
            return list(evaluator.run(None, feeds))
        except Exception:  # noqa: BLE001 - any evaluator failure just means "not foldable"
            return None
    return None


class GraphIndex:
    """Producers, consumers, initializers and constant values of one graph.

    For a subgraph (an If/Loop/Scan body), ``parent`` indexes the enclosing graph:
    a body may read the parent's values by name, and whether those are constant
    is the parent's answer. Initializer values are read on demand from the model's
    ``store`` and not kept, so an index over a multi-GB model holds no weights.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        graph: onnx.GraphProto | None = None,
        *,
        parent: GraphIndex | None = None,
        store: TensorStore | None = None,
        keep_overridable: bool = False,
    ) -> None:
        self.model = model
        self.graph = graph if graph is not None else model.graph
        self.parent = parent
        self.store: TensorStore = parent.store if parent is not None else (store or TensorStore())
        """Where the model's tensor values are read from and rewritten to."""
        self.keep_overridable: bool = parent.keep_overridable if parent is not None else keep_overridable
        """Whether initializers that are also graph inputs count as fed at run time
        (:meth:`is_runtime_input`); the user's ``--keep-overridable``."""
        self.nodes: list[onnx.NodeProto] = list(self.graph.node)
        self.opsets = {opset.domain or "": opset.version for opset in model.opset_import}
        self._producer: dict[str, int] = {}
        self._consumers: dict[str, list[int]] = defaultdict(list)
        for position, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self._producer[name] = position
            used = {name for name in node.input if name}
            used.update(names_used_by_subgraphs(node))
            for name in used:
                self._consumers[name].append(position)
        self.initializers: dict[str, onnx.TensorProto] = {
            tensor.name: tensor for tensor in self.graph.initializer
        }
        self.sparse_initializers: dict[str, onnx.SparseTensorProto] = {
            sparse.values.name: sparse for sparse in self.graph.sparse_initializer
        }
        """Initializers stored sparse (named by their values tensor): constants like the others,
        read dense (:meth:`~bnfold.io.store.TensorStore.read_sparse`)."""
        self.graph_inputs = {value.name for value in self.graph.input}
        self.graph_outputs = {value.name for value in self.graph.output}
        self._constants: dict[str, np.ndarray | None] = {}
        self._shapes: dict[str, tuple[int | str | None, ...]] | None = None

    # -- structure ---------------------------------------------------------------------------

    def position_of(self, node: onnx.NodeProto) -> int:
        """Position of a node of this graph, found through its first output."""
        return self._producer[next(name for name in node.output if name)]

    def producer_of(self, name: str) -> onnx.NodeProto | None:
        position = self._producer.get(name)
        return None if position is None else self.nodes[position]

    def consumers_of(self, name: str) -> list[onnx.NodeProto]:
        return [self.nodes[position] for position in self._consumers.get(name, ())]

    def use_count(self, name: str) -> int:
        """How many nodes read ``name``, plus one if it is a graph output."""
        return len(self._consumers.get(name, ())) + (name in self.graph_outputs)

    def other_uses(self, name: str, besides: onnx.NodeProto) -> list[str]:
        """Labels of every use of ``name`` other than ``besides`` (graph outputs included)."""
        keep = self.position_of(besides)
        uses = [describe(self.nodes[p]) for p in self._consumers.get(name, ()) if p != keep]
        if name in self.graph_outputs:
            uses.append("a graph output")
        return uses

    def default_opset(self) -> int:
        """The model's version of the standard ``ai.onnx`` operator set."""
        return self.opsets.get("", self.opsets.get("ai.onnx", 0))

    # -- constants ---------------------------------------------------------------------------

    def is_runtime_input(self, name: str) -> bool:
        """True for a graph input the caller feeds at run time, which is therefore no constant.

        An initializer that is also listed as a graph input is, from IR version 4 on, only a
        default the caller may override (:meth:`is_overridable`). Older exporters (PyTorch 1.x)
        list every weight that way without meaning it, so it counts as the constant it is in
        practice; the rewrite then drops each one it replaces from the inputs. With
        ``keep_overridable`` it counts as fed at run time. Before IR 4 every initializer had
        to be listed as an input and they were all constants. A body's inputs are fed by the op
        that runs it, whatever initializer shares their name.
        """
        if self.parent is not None and self.is_outer(name):
            return self.parent.is_runtime_input(name)
        if name not in self.graph_inputs:
            return False
        if not self.has_initializer(name):
            return True
        if self.model.ir_version < 4:
            return False
        return self.parent is not None or self.keep_overridable

    def is_overridable(self, name: str) -> bool:
        """True for an initializer of the main graph that is also a graph input from IR 4 on:
        a default value that a caller may replace by feeding the input."""
        if self.parent is not None and self.is_outer(name):
            return self.parent.is_overridable(name)
        return (
            self.parent is None and self.model.ir_version >= 4
            and self.has_initializer(name) and name in self.graph_inputs
        )

    def has_initializer(self, name: str) -> bool:
        """Whether this graph stores a value for ``name``, dense or sparse."""
        return name in self.initializers or name in self.sparse_initializers

    def names_shadowing_outer_scopes(self) -> list[str]:
        """Names this graph defines (its inputs, initializers, node outputs) that an enclosing
        graph defines too. The checker accepts such a body, but runtimes resolve the name to
        the outer value (onnxruntime and onnx's reference evaluator read the main graph's
        weight, not the branch's own): what a body-local rewrite changes may not be what runs."""
        defined = {*self._producer, *self.initializers, *self.sparse_initializers, *self.graph_inputs}
        shadowing: set[str] = set()
        scope = self.parent
        while scope is not None:
            shadowing |= {name for name in defined if not scope.is_outer(name)}
            scope = scope.parent
        return sorted(shadowing)

    def is_outer(self, name: str) -> bool:
        """True for a name this graph reads but does not define (an outer-scope value)."""
        return name not in self._producer and not self.has_initializer(name) and name not in self.graph_inputs

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is fixed at export time, else ``None``.

        Constant means: an initializer (see :meth:`is_runtime_input`), a Constant node, or a
        deterministic standard-domain node whose inputs are all constant (Identity,
        Cast, Reshape, Unsqueeze... as exporters emit around weights), evaluated
        with onnx's reference evaluator.
        """
        if name in self._constants:
            return self._constants[name]
        value = self._compute_constant(name)
        if not self.has_initializer(name):  # weights are re-read rather than held
            self._constants[name] = value
        return value

    def _compute_constant(self, name: str) -> np.ndarray | None:
        if not name or self.is_runtime_input(name):
            return None
        if self.parent is not None and self.is_outer(name):
            return self.parent.constant_value(name)
        if name in self.initializers:
            return self.store.read(self.initializers[name])
        if name in self.sparse_initializers:
            return self.store.read_sparse(self.sparse_initializers[name])
        node = self.producer_of(name)
        if node is None or not is_standard(node) or node.op_type in NONDETERMINISTIC_OPS:
            return None
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        feeds = {}
        for slot, input_name in enumerate(node.input):
            if not input_name:
                continue
            value = self.constant_value(input_name)
            if value is None and node.op_type == "CastLike" and slot == 1:
                value = self._type_example(input_name)
            if value is None:
                return None
            feeds[input_name] = value
        outputs = _evaluate(node, feeds, self.default_opset())
        if outputs is None:
            return None
        for output_name, output_value in zip(node.output, outputs):
            if output_name:
                self._constants[output_name] = np.asarray(output_value)
        return self._constants.get(name)

    def _type_example(self, name: str) -> np.ndarray | None:
        """An empty array of the declared element type of ``name``, or None if undeclared.

        CastLike reads only the *type* of its second input: the dynamo exporter writes a
        missing Conv bias as ``Expand(CastLike(0, x), ...)`` with ``x`` a runtime value,
        and that bias is still a constant.
        """
        if self.parent is not None and self.is_outer(name):
            return self.parent._type_example(name)
        for value in (*self.graph.input, *self.graph.value_info, *self.graph.output):
            if value.name == name and value.type.tensor_type.elem_type:
                return np.empty(0, onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
        return None

    # -- shapes ------------------------------------------------------------------------------

    def static_shape(self, name: str) -> tuple[int | None, ...] | None:
        """The shape of value ``name`` (None for a symbolic dimension), or None if even
        the rank is unknown.

        Declared shapes come from the inputs, outputs, value_info and initializers of this
        graph and of the graphs enclosing it (a body reads their values by name); shape
        inference runs once per index, and only when a rule asks (most folds never need a
        shape), on a weight-less copy of the whole model so its cost does not grow with the
        weights. Inference annotates the values created inside If/Loop/Scan bodies too, which
        are found by the body's place in the model. A model that cannot be inferred simply
        has its declared shapes.
        """
        shape = self.symbolic_shape(name)
        return None if shape is None else tuple(d if isinstance(d, int) else None for d in shape)

    def symbolic_shape(self, name: str) -> tuple[int | str | None, ...] | None:
        """As :meth:`static_shape`, with a symbolic dimension given by its name (``dim_param``):
        the model's own (``'batch'``) or one shape inference made up for a size it could not
        compute. Two dimensions of one name have one size, which lets a rule compare sizes it
        cannot know (``x.view(x.size(0), -1)`` keeps the batch of ``x``). None: not even a name."""
        if self._shapes is None:
            self._shapes = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(weightless_copy(self.model, dense_sparse=True))
            except Exception:  # noqa: BLE001 - inference failing just means "shape unknown"
                inferred = self.model
            for graph in self._enclosing_graphs(inferred):
                for value in (*graph.input, *graph.output, *graph.value_info):
                    if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
                        self._shapes[value.name] = tuple(
                            dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
                            for dim in value.type.tensor_type.shape.dim
                        )
                self._shapes.update((tensor.name, tuple(tensor.dims)) for tensor in graph.initializer)
            self._shapes.update((name, tuple(sparse.dims)) for name, sparse in self.sparse_initializers.items())
        return self._shapes.get(name)

    def _location(self) -> tuple[tuple[int, str], ...] | None:
        """Where this graph sits in the model: per level, the position of the node that holds
        it and the attribute key (``then_branch``, ``body``...); ``()`` for the main graph, None
        if it is not found among the parent's bodies.

        Found by identity: the driver hands each body over as the very message object that
        its node's attribute holds, and protobuf returns that same object while it is alive.
        """
        if self.parent is None:
            return ()
        outer = self.parent._location()
        if outer is None:
            return None
        for position, node in enumerate(self.parent.nodes):
            for key, body in subgraphs(node):
                if body is self.graph:
                    return (*outer, (position, key))
        return None

    def _enclosing_graphs(self, model: onnx.ModelProto) -> list[onnx.GraphProto]:
        """The graphs of ``model`` (this index's model or a copy of it with the same nodes)
        from the main graph down to this one; only this graph when its place is unknown."""
        location = self._location()
        if location is None:
            return [self.graph]
        chain = [model.graph]
        for position, key in location:
            chain.append(dict(subgraphs(chain[-1].node[position]))[key])
        return chain

    def shape_entries(self, name: str, depth: int = 0) -> list[Dim] | None:
        """The entries of a 1-D integer tensor that computes a shape (a Reshape's or Resize's):
        constants, and sizes read by Shape nodes (:meth:`symbolic_shape`) through Gather,
        Slice, Concat, Unsqueeze and casts, as exporters write ``x.view(x.size(0), -1)``.
        None when some step is none of these."""
        value = self.constant_value(name)
        if value is not None:
            return [int(v) for v in np.asarray(value).reshape(-1)]
        node = self.producer_of(name)
        if node is None or not is_standard(node) or depth > _SHAPE_DEPTH:
            return None
        if node.op_type == "Shape":
            dims = self.symbolic_shape(node.input[0])
            end = attribute(node, "end")
            if dims is None:
                return None
            return list(dims[int(attribute(node, "start", 0)):None if end is None else int(end)])
        if node.op_type == "Concat":
            parts = [self.shape_entries(part, depth + 1) for part in node.input]
            return None if any(part is None for part in parts) else [entry for part in parts for entry in part or []]
        data = self.shape_entries(node.input[0], depth + 1) if node.input else None
        if data is None:
            return None
        if node.op_type in _ENTRY_PRESERVING:
            return data
        if node.op_type == "Gather" and int(attribute(node, "axis", 0)) == 0:
            indices = self.constant_value(node.input[1])
            picked = [] if indices is None else [int(i) for i in np.asarray(indices).reshape(-1)]
            if indices is None or any(not -len(data) <= i < len(data) for i in picked):
                return None
            return [data[i] for i in picked]
        if node.op_type == "Slice":
            bounds = self._slice_bounds(node)
            return None if bounds is None else data[slice(*bounds)]
        return None

    def slice_arguments(self, node: onnx.NodeProto) -> SliceArguments | str:
        """A Slice's starts, ends, axes and steps (None where not given): attributes before
        opset 10, constant inputs from it on; or the name of an input that is not constant."""
        if self.default_opset() < 10:
            values = [attribute(node, key) for key in ("starts", "ends", "axes")] + [None]
        else:
            values = []
            for slot in range(1, 5):
                name = node.input[slot] if slot < len(node.input) else ""
                value = self.constant_value(name) if name else None
                if name and value is None:
                    return name
                values.append(value)
        starts, ends, axes, steps = (None if v is None else [int(x) for x in np.asarray(v).reshape(-1)] for v in values)
        return starts, ends, axes, steps

    def _slice_bounds(self, node: onnx.NodeProto) -> tuple[int, int, int] | None:
        """start, end, step of a Slice of a 1-D tensor (ONNX clamps them as Python does)."""
        found = self.slice_arguments(node)
        if isinstance(found, str):
            return None
        starts, ends, axes, steps = found
        if not starts or not ends or len(starts) != 1 or (axes and axes[0] not in (0, -1)):
            return None
        return starts[0], ends[0], steps[0] if steps else 1

    def rank_of(self, name: str) -> int | None:
        """How many axes value ``name`` has, or None when even that is unknown.

        Rules need the rank to tell which axis a per-channel constant scales: axis 1
        and the last axis coincide only for rank 2.
        """
        shape = self.static_shape(name)
        return None if shape is None else len(shape)
