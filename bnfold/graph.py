"""An index over one ONNX graph: who produces a value, who consumes it, what is constant.

Rules ask questions in these terms ("the Conv's output has other consumers",
"the weight is a constant") and never walk ``graph.node`` themselves. Nodes are
identified by their position in ``graph.node``: protobuf message wrappers are not
stable Python objects, positions are (the index is rebuilt after each rewrite).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

# Ops whose value changes from run to run: never evaluated as constants.
NONDETERMINISTIC_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)


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


def describe(node: onnx.NodeProto) -> str:
    """A short human label: ``Conv 'conv1'``, or ``Conv → 'y3'`` for an unnamed node."""
    return f"{node.op_type} '{node.name}'" if node.name else f"{node.op_type} {node_id(node)}"


def node_id(node: onnx.NodeProto) -> str:
    """A node's name, or ``→ 'output'`` for an unnamed one (where the op type is implied)."""
    if node.name:
        return node.name
    return f"→ '{next((name for name in node.output if name), '?')}'"


def _declared_ranks(graph: onnx.GraphProto) -> dict[str, int]:
    """Ranks of the values whose declared type has a shape (an absent shape says nothing)."""
    ranks = {}
    for value in (*graph.input, *graph.output, *graph.value_info):
        tensor_type = value.type.tensor_type
        if value.type.HasField("tensor_type") and tensor_type.HasField("shape"):
            ranks[value.name] = len(tensor_type.shape.dim)
    return ranks


def _inferred_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Ranks onnx shape inference finds; empty when inference fails on this model."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference failing only means the ranks stay unknown
        return {}
    return _declared_ranks(inferred.graph)


class GraphIndex:
    """Producers, consumers, initializers and constant values of one graph."""

    def __init__(self, model: onnx.ModelProto, graph: onnx.GraphProto | None = None) -> None:
        self.model = model
        self.graph = graph if graph is not None else model.graph
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
        self.graph_inputs = {value.name for value in self.graph.input}
        self.graph_outputs = {value.name for value in self.graph.output}
        self._constants: dict[str, np.ndarray | None] = {}
        self._ranks: dict[str, int] | None = None
        self._shapes_inferred = False

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

    def rank_of(self, name: str) -> int | None:
        """How many axes value ``name`` has, or None when nothing says.

        Rules need it to tell which axis a per-channel constant scales (axis 1 and
        the last axis coincide only for rank 2). Declared types (graph inputs,
        outputs, value_info) are used first, then the value of a constant, and
        only then onnx shape inference, run once per index and only when needed.
        """
        if self._ranks is None:
            self._ranks = _declared_ranks(self.graph)
        if name in self._ranks:
            return self._ranks[name]
        value = self.constant_value(name)
        if value is not None:
            return value.ndim
        if not self._shapes_inferred and self.graph is self.model.graph:
            self._shapes_inferred = True
            for known, rank in _inferred_ranks(self.model).items():
                self._ranks.setdefault(known, rank)
        return self._ranks.get(name)

    # -- constants ---------------------------------------------------------------------------

    def is_runtime_input(self, name: str) -> bool:
        """True for a graph input the caller may feed at run time.

        From IR version 4 on, an initializer that is also listed as a graph input is
        only a default and may be overridden, so it is not a constant. Before IR 4
        every initializer had to be listed as an input and they were all constants.
        """
        if name not in self.graph_inputs:
            return False
        return not (name in self.initializers and self.model.ir_version < 4)

    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is fixed at export time, else ``None``.

        Constant means: a (non-overridable) initializer, a Constant node, or a
        deterministic standard-domain node whose inputs are all constant (Identity,
        Cast, Reshape, Unsqueeze... as exporters emit around weights), evaluated
        with onnx's reference evaluator.
        """
        if name in self._constants:
            return self._constants[name]
        value = self._compute_constant(name)
        self._constants[name] = value
        return value

    def _compute_constant(self, name: str) -> np.ndarray | None:
        if not name or self.is_runtime_input(name):
            return None
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer_of(name)
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type in NONDETERMINISTIC_OPS:
            return None
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        feeds = {}
        for input_name in node.input:
            if not input_name:
                continue
            value = self.constant_value(input_name)
            if value is None:
                return None
            feeds[input_name] = value
        try:
            evaluator = ReferenceEvaluator(node, opsets={"": self.default_opset()})
            outputs = evaluator.run(None, feeds)
        except Exception:  # noqa: BLE001 - any evaluator failure just means "not foldable"
            return None
        for output_name, output_value in zip(node.output, outputs):
            if output_name:
                self._constants[output_name] = np.asarray(output_value)
        return self._constants.get(name)

    def constant_origin(self, name: str) -> str:
        """Where a constant comes from, for notes: 'initializer', 'Constant node', or the op."""
        if name in self.initializers:
            return "initializer"
        node = self.producer_of(name)
        return "graph input" if node is None else f"{node.op_type} node"
