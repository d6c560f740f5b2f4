"""What every fold rule shares: the BatchNormalization it folds, its plan, its refusal.

A rule looks at one inference-mode BatchNormalization (already read and checked
by :func:`read_batchnorm`) and answers with one of

* ``None``: the pattern does not match here (another rule may),
* :class:`Refusal`: it matches, but a precondition fails; the reason is shown to the user,
* :class:`FoldPlan`: the new tensors and rewiring; :mod:`bnfold.rewrite` applies it.

Rules never modify the graph themselves, so a plan can be reported (``--dry-run``)
or discarded, and rules cannot interfere with one another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper

from bnfold import fold_math
from bnfold.graph import GraphIndex, describe


@dataclass(frozen=True)
class Refusal:
    """Why a BatchNormalization is left in the graph, in words a user reads."""

    reason: str


@dataclass(frozen=True)
class BatchNorm:
    """A per-channel affine map ``y = s * x + t`` that a fold can remove.

    Usually one inference-mode BatchNormalization node; readers of decomposed
    forms (a Mul/Add chain by per-channel constants) produce the same object with
    several ``nodes``. Folding removes every node in ``nodes``: the chain reads
    ``input_name`` and its last node writes ``output_name``.
    """

    nodes: tuple[onnx.NodeProto, ...]
    input_name: str
    output_name: str
    s: np.ndarray
    t: np.ndarray
    channel_axis: int = 1
    """Axis of the tensor that ``s`` and ``t`` index: 1 for BatchNormalization
    (``[N, C, ...]``), -1 for a constant broadcast along the last axis."""

    @property
    def node(self) -> onnx.NodeProto:
        """The node that names the affine in reports (the BatchNormalization itself)."""
        return self.nodes[0]

    @property
    def channels(self) -> int:
        return int(self.s.shape[0])

    @property
    def parameter_names(self) -> list[str]:
        """Constant inputs of the affine's nodes (released when it is folded)."""
        return [name for node in self.nodes for name in node.input if name and name != self.input_name
                and name not in (n.output[0] for n in self.nodes)]


@dataclass(frozen=True)
class TensorUpdate:
    """Give input ``slot`` of ``node`` a new constant value (appending the slot if absent)."""

    node: onnx.NodeProto
    slot: int
    values: np.ndarray
    role: str
    """What the tensor is, for notes: 'weight', 'bias'."""
    relative_change: float | None = None
    """Largest ``|new - old| / |old|`` over the replaced values (None: not measured)."""
    rounding_error: float | None = None
    """Largest ``|values - exact|`` against the float64 result before the cast back."""


@dataclass(frozen=True)
class AddedBias:
    """Add the constant ``values`` to ``node``'s output through a new Add node.

    For a bias the node cannot hold itself (MatMul has no bias input; a per-position
    correction does not fit a Conv's per-channel bias). The Add takes over the
    node's output name, so every reader of that output sees the corrected value.
    """

    node: onnx.NodeProto
    values: np.ndarray
    role: str


@dataclass
class FoldPlan:
    """Everything needed to remove one BatchNormalization by changing ``target``."""

    rule: str
    bn: BatchNorm
    target: onnx.NodeProto
    direction: Literal["backward", "forward"]
    """backward: the BN's producer absorbs it and takes over the BN's output name.
    forward: every target that reads the BN's output reads the BN's input instead."""
    updates: list[TensorUpdate]
    attributes: dict[str, float | int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    also_targets: list[onnx.NodeProto] = field(default_factory=list)
    """Further nodes a forward fold changes (other consumers of the BN, or the layer
    behind a Flatten); ``attributes`` apply to ``target`` only."""
    added_biases: list[AddedBias] = field(default_factory=list)

    @property
    def targets(self) -> list[onnx.NodeProto]:
        return [self.target, *self.also_targets]

    @property
    def touched_nodes(self) -> list[onnx.NodeProto]:
        """Every node the plan removes or changes: no other plan may touch them in the same pass."""
        return [
            *self.bn.nodes,
            *self.targets,
            *(update.node for update in self.updates),
            *(added.node for added in self.added_biases),
        ]


class FoldRule(ABC):
    """One folding pattern. Subclasses are small and declarative; see the concrete rules."""

    name: str
    """Short identifier shown in reports, e.g. ``conv-bn``."""

    @abstractmethod
    def plan(self, bn: BatchNorm, graph: GraphIndex) -> FoldPlan | Refusal | None:
        """Match around ``bn`` and return a plan, a refusal with its reason, or None."""


def constant_input(
    graph: GraphIndex, node: onnx.NodeProto, slot: int, role: str
) -> np.ndarray | Refusal | None:
    """The constant value at input ``slot`` of ``node``; None if the slot is empty.

    A value that is fed at run time (a graph input, or computed from one) cannot
    be folded; the refusal says which input it is.
    """
    if slot >= len(node.input) or not node.input[slot]:
        return None
    name = node.input[slot]
    value = graph.constant_value(name)
    if value is None:
        origin = "a graph input" if graph.is_runtime_input(name) else "computed at run time"
        return Refusal(f"{describe(node)} {role} '{name}' is not a constant ({origin})")
    dequantize = dequantizing_node(graph, name)
    if dequantize is not None:
        return Refusal(
            f"{describe(node)} {role} is dequantized by {describe(dequantize)}; "
            "folding would drop quantization"
        )
    return value


def dequantizing_node(graph: GraphIndex, name: str) -> onnx.NodeProto | None:
    """The DequantizeLinear among the nodes that compute constant ``name``, if any.

    In QDQ models a weight is stored quantized and dequantized in the graph. It is
    constant, but replacing it by folded float values would silently turn a
    quantized layer into a float one, so such weights are not folded. Inside a
    subgraph, values of the enclosing graphs are followed too.
    """
    pending, seen = [(graph, name)], set()
    while pending:
        scope, current = pending.pop()
        while scope.parent is not None and scope.is_outer(current):
            scope = scope.parent
        producer = scope.producer_of(current)
        if producer is None or (id(scope), current) in seen:
            continue
        seen.add((id(scope), current))
        if producer.op_type == "DequantizeLinear":
            return producer
        pending.extend((scope, value) for value in producer.input if value)
    return None


def require_float(values: np.ndarray, node: onnx.NodeProto, role: str) -> Refusal | None:
    """Scales are real numbers: an integer weight cannot absorb one exactly."""
    if values.dtype.kind not in "fV" and values.dtype.name != "bfloat16":
        return Refusal(f"{describe(node)} {role} is {values.dtype.name}; only float weights can absorb a scale")
    return None


def constant_weight_and_bias(
    graph: GraphIndex, node: onnx.NodeProto, weight_role: str, bias_role: str
) -> tuple[np.ndarray, np.ndarray | None] | Refusal:
    """A layer's constant float weight (input 1) and optional constant bias (input 2)."""
    weight = constant_input(graph, node, 1, weight_role)
    if weight is None:
        return Refusal(f"{describe(node)} has no {weight_role} input")
    if isinstance(weight, Refusal):
        return weight
    bias = constant_input(graph, node, 2, bias_role)
    if isinstance(bias, Refusal):
        return bias
    return require_float(weight, node, weight_role) or (weight, bias)


def weight_and_bias_updates(
    node: onnx.NodeProto,
    weight: np.ndarray,
    folded_weight: np.ndarray,
    bias: np.ndarray | None,
    folded_bias: np.ndarray,
) -> list[TensorUpdate] | Refusal:
    """Cast float64 results back to the replaced tensors' dtypes (the bias takes the
    weight's dtype when it is created) and describe them as updates of inputs 1 and 2,
    with how far they moved and what the cast cost (shown per fold in the report)."""
    return _cast_updates(
        node, lambda: fold_math.cast_with_effect(folded_weight, weight.dtype, weight, "weight"), weight.dtype,
        bias, folded_bias,
    )


def scaled_weight_and_bias_updates(
    node: onnx.NodeProto,
    weight: np.ndarray,
    factor: np.ndarray,
    bias: np.ndarray | None,
    folded_bias: np.ndarray,
    weight_role: str = "weight",
) -> list[TensorUpdate] | Refusal:
    """:func:`weight_and_bias_updates` for ``W' = W * factor``, which is scaled and cast
    in one blocked pass (:func:`fold_math.scale_with_effect`) instead of first being
    computed whole in float64. ``weight_role`` names input 1 in notes and refusals
    (a BatchNormalization's is its 'scale')."""
    return _cast_updates(
        node, lambda: fold_math.scale_with_effect(weight, factor, weight_role), weight.dtype, bias, folded_bias,
        weight_role,
    )


def _cast_updates(
    node: onnx.NodeProto,
    cast_weight: Callable[[], tuple[np.ndarray, float | None, float]],
    weight_dtype: np.dtype,
    bias: np.ndarray | None,
    folded_bias: np.ndarray,
    weight_role: str = "weight",
) -> list[TensorUpdate] | Refusal:
    """The updates of inputs 1 and 2 from ``cast_weight()`` and the cast-back bias."""
    try:
        new_weight, weight_change, weight_rounding = cast_weight()
        new_bias, bias_change, bias_rounding = fold_math.cast_with_effect(
            folded_bias, weight_dtype if bias is None else bias.dtype, bias, "bias"
        )
    except fold_math.FoldOverflowError as error:
        return Refusal(f"{describe(node)}: {error}")
    return [
        TensorUpdate(node, 1, new_weight, weight_role, weight_change, weight_rounding),
        TensorUpdate(node, 2, new_bias, "bias", bias_change, bias_rounding),
    ]


class IntoProducer(FoldRule):
    """Backward fold: ``BN(layer(x))`` becomes ``layer'(x)``, the layer taking the BN's output.

    Shared preconditions, checked here once for every producer type:

    1. the BN's input is produced by one of ``producer_ops`` in the standard domain;
    2. that output is read by nothing but the BN (and is not a graph output), since
       other readers still need the un-normalized values.

    Subclasses say only how their weights absorb ``s`` and ``t`` (:meth:`absorb`).
    """

    producer_ops: frozenset[str]

    def plan(self, bn: BatchNorm, graph: GraphIndex) -> FoldPlan | Refusal | None:
        producer = graph.producer_of(bn.input_name)
        if producer is None or producer.op_type not in self.producer_ops:
            return None
        if producer.domain not in ("", "ai.onnx"):
            return None
        if list(producer.output).index(bn.input_name) != 0:
            return Refusal(f"the BN reads a secondary output of {describe(producer)}")
        other_uses = graph.other_uses(bn.input_name, besides=bn.nodes[0])
        if other_uses:
            return Refusal(f"{describe(producer)} output also feeds {', '.join(other_uses)}")
        absorbed = self.absorb(producer, bn, graph)
        if isinstance(absorbed, Refusal):
            return absorbed
        updates, attributes = absorbed
        return FoldPlan(
            rule=self.name,
            bn=bn,
            target=producer,
            direction="backward",
            updates=updates,
            attributes=attributes,
        )

    @abstractmethod
    def absorb(
        self, producer: onnx.NodeProto, bn: BatchNorm, graph: GraphIndex
    ) -> tuple[list[TensorUpdate], dict[str, float | int]] | Refusal:
        """New tensors (and attributes) that make ``producer`` compute ``BN(producer(x))``."""


class ScaledLayerIntoProducer(IntoProducer):
    """Backward fold into a layer whose input 1 is a weight scaled per output channel
    and whose optional input 2 is a bias: ``W' = scale(W, s)``, ``b' = b * s + t``.

    The flow is the same for Conv, ConvTranspose and Gemm; a subclass states only
    what differs: how its weight gives the BN's channels (:meth:`weight_refusal`),
    the factor that scales it (:meth:`weight_factor`), and, where the layer has its own bias
    semantics, :meth:`bias_refusal` and :meth:`bias_terms`.
    """

    weight_role = "weight"
    bias_role = "bias"

    def absorb(
        self, producer: onnx.NodeProto, bn: BatchNorm, graph: GraphIndex
    ) -> tuple[list[TensorUpdate], dict[str, float | int]] | Refusal:
        found = constant_weight_and_bias(graph, producer, self.weight_role, self.bias_role)
        if isinstance(found, Refusal):
            return found
        weight, bias = found
        attributes = {a.name: helper.get_attribute_value(a) for a in producer.attribute}
        refusal = (
            self.weight_refusal(producer, attributes, weight, bn)
            or channel_axis_refusal(bn, producer, axis=1, rank=self.output_rank(weight))
            or self.bias_refusal(producer, bias, bn)
        )
        if refusal:
            return refusal
        bias, shift, new_attributes = self.bias_terms(bias, bn, attributes)
        updates = scaled_weight_and_bias_updates(
            producer, weight, self.weight_factor(weight, bn.s, attributes), bias, fold_math.fold_bias(bias, bn.s, shift)
        )
        return updates if isinstance(updates, Refusal) else (updates, new_attributes)

    @abstractmethod
    def weight_refusal(
        self, producer: onnx.NodeProto, attributes: dict[str, Any], weight: np.ndarray, bn: BatchNorm
    ) -> Refusal | None:
        """Why this weight cannot give the BN's channels (None when it can)."""

    @abstractmethod
    def weight_factor(self, weight: np.ndarray, s: np.ndarray, attributes: dict[str, Any]) -> np.ndarray:
        """The float64 factor, broadcastable to the weight, that gives ``W' = W * factor``:
        each output channel's slice times its ``s``."""

    def output_rank(self, weight: np.ndarray) -> int:
        """Rank of the layer's output, for the channel-axis check (a Conv's is its weight's)."""
        return weight.ndim

    def bias_refusal(self, producer: onnx.NodeProto, bias: np.ndarray | None, bn: BatchNorm) -> Refusal | None:
        if bias is not None and bias.shape != (bn.channels,):
            return Refusal(f"{describe(producer)} {self.bias_role} shape {list(bias.shape)} is not [{bn.channels}]")
        return None

    def bias_terms(
        self, bias: np.ndarray | None, bn: BatchNorm, attributes: dict[str, Any]
    ) -> tuple[np.ndarray | None, np.ndarray, dict[str, float | int]]:
        """The bias to fold, the shift added to it, and attribute changes: ``b * s + t``."""
        return bias, bn.t, {}


def cast_or_refuse(node: onnx.NodeProto, values: np.ndarray, dtype: np.dtype, role: str) -> np.ndarray | Refusal:
    """:func:`fold_math.cast_back` for one tensor of ``node``, an overflow becoming a refusal."""
    try:
        return fold_math.cast_back(values, dtype, role)
    except fold_math.FoldOverflowError as error:
        return Refusal(f"{describe(node)}: {error}")


@dataclass
class ConsumerFold:
    """What one reader of the BN output needs in order to absorb it (see :class:`IntoConsumer`)."""

    updates: list[TensorUpdate]
    added_biases: list[AddedBias] = field(default_factory=list)
    also_changed: list[onnx.NodeProto] = field(default_factory=list)
    """Nodes changed besides the reader itself, e.g. the Gemm behind a Flatten."""
    notes: list[str] = field(default_factory=list)


# Ops that read only the shape of their input, which folding an affine map never changes.
SHAPE_READERS = frozenset({"Shape", "Size"})


def is_standard(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


class IntoConsumer(FoldRule):
    """Forward fold: ``layer(BN(x))`` becomes ``layer'(x)``, the layer reading the BN's input.

    With ``BN(x) = s * x + t`` along the layer's *input* channels, a linear layer
    ``y = W x + b`` gives ``W (s * x + t) + b = (W diag(s)) x + (b + W t)``: every
    input channel of W is scaled by ``s`` and ``W t`` joins the bias.

    Shared preconditions, checked here once for every consumer type:

    1. some reader of the BN output is one of ``consumer_ops`` (else the rule does not match);
    2. the BN output is not a graph output, which must keep the normalized values;
    3. *every* reader is one of ``consumer_ops`` and reads it as its data input (input 0):
       a reader that cannot absorb the BN would still need the normalized values.
       ``Shape`` and ``Size`` readers are the exception (``x.view(x.size(0), -1)``): a BN
       keeps its input's shape, so they read the BN's input instead.

    Each reader then gets its own tensors (:meth:`absorb`); a weight shared between
    readers is cloned by the rewrite, never overwritten.
    """

    consumer_ops: frozenset[str]

    def plan(self, bn: BatchNorm, graph: GraphIndex) -> FoldPlan | Refusal | None:
        consumers: list[onnx.NodeProto] = []
        shape_readers: list[onnx.NodeProto] = []
        for node in graph.consumers_of(bn.output_name):
            (shape_readers if is_standard(node) and node.op_type in SHAPE_READERS else consumers).append(node)
        if not any(is_standard(node) and node.op_type in self.consumer_ops for node in consumers):
            return None
        if bn.output_name in graph.graph_outputs:
            return Refusal("the BN output is also a graph output")
        for consumer in consumers:
            if not (is_standard(consumer) and consumer.op_type in self.consumer_ops):
                return Refusal(f"BN output also feeds {describe(consumer)}, which cannot absorb it")
            if list(consumer.input).count(bn.output_name) != 1 or consumer.input[0] != bn.output_name:
                return Refusal(f"{describe(consumer)} reads the BN output other than as its data input")
        folds: list[ConsumerFold] = []
        for consumer in consumers:
            absorbed = self.absorb(consumer, bn, graph)
            if isinstance(absorbed, Refusal):
                return absorbed
            folds.append(absorbed)
        return FoldPlan(
            rule=self.name,
            bn=bn,
            target=consumers[0],
            direction="forward",
            updates=[update for fold in folds for update in fold.updates],
            notes=[note for fold in folds for note in fold.notes],
            also_targets=[*consumers[1:], *shape_readers, *(node for fold in folds for node in fold.also_changed)],
            added_biases=[added for fold in folds for added in fold.added_biases],
        )

    @abstractmethod
    def absorb(self, consumer: onnx.NodeProto, bn: BatchNorm, graph: GraphIndex) -> ConsumerFold | Refusal:
        """New tensors that make ``consumer`` compute ``consumer(BN(x))`` from ``x``."""


def channel_axis_refusal(bn: BatchNorm, producer: onnx.NodeProto, axis: int, rank: int | None) -> Refusal | None:
    """Refuse unless the affine scales ``axis`` of the producer's output (of ``rank`` dims).

    A BatchNormalization always scales axis 1; a decomposed affine may scale the
    last axis instead (a ``[C]`` constant), which is a layer's channel axis only
    when the two coincide for the output's rank.
    """
    if bn.channel_axis == axis or (rank is not None and bn.channel_axis % rank == axis % rank):
        return None
    shape = f"a rank-{rank} output" if rank is not None else "an output of unknown rank"
    return Refusal(
        f"{describe(bn.node)} scales axis {bn.channel_axis} of {shape} from {describe(producer)}, "
        f"whose channels are axis {axis}"
    )


def matmul_weight(graph: GraphIndex, matmul: onnx.NodeProto, bn: BatchNorm) -> np.ndarray | Refusal:
    """A MatMul's constant float weight ``[K, C]``: then column c computes output channel c.

    A batched (3-D+) or runtime weight has no single column per channel to scale.
    """
    weight = constant_input(graph, matmul, 1, "weight")
    if weight is None:
        return Refusal(f"{describe(matmul)} has no weight input")
    if isinstance(weight, Refusal):
        return weight
    if weight.ndim != 2 or weight.shape[1] != bn.channels:
        return Refusal(f"{describe(matmul)} weight shape {list(weight.shape)} is not [K, {bn.channels}]")
    return require_float(weight, matmul, "weight") or weight


def matmul_output_rank(graph: GraphIndex, matmul: onnx.NodeProto) -> int | None:
    """Rank of a MatMul's output: declared or inferred, else ``max(rank X, 2)`` for a 2-D weight."""
    rank = graph.rank_of(matmul.output[0])
    if rank is None:
        x_rank = graph.rank_of(matmul.input[0])
        rank = None if x_rank is None else max(x_rank, 2)
    return rank
