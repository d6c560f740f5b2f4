"""Templates that most rules are a small subclass of, and the helper composite rules share.

* :class:`IntoProducer`: backward fold, the layer before the affine absorbs it
  (:class:`ScaledLayerIntoProducer` for layers whose weight is scaled per output channel);
* :class:`IntoConsumer`: forward fold, every layer after the affine absorbs it;
* :func:`delegate`: hand an affine (moved, or one slice of it) to other rules and keep the
  first plan, or every refusal;
* :class:`Piece`, :func:`absorb_piece` and :func:`split_plan`: an affine split over the inputs
  of a Concat or an Add, each piece absorbed by what computes that input, and the pieces'
  plans joined into one.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, attributes, describe, is_standard
from bnfold.rules.plan import (
    AddedBias,
    Affine,
    AttributeUpdate,
    FoldPlan,
    FoldRule,
    InsertedAffine,
    OpTypeUpdate,
    Refusal,
    Replaced,
    RuleOptions,
    RuleSet,
    TensorUpdate,
)
from bnfold.rules.weights import (
    cast_tensor,
    constant_weight_and_bias,
    dequantizing_node,
    require_float,
    weight_and_bias_updates,
)

# Ops that read only the shape of their input, which folding an affine map never changes.
SHAPE_READERS = frozenset({"Shape", "Size"})


def reads_only_shape(node: onnx.NodeProto, name: str) -> bool:
    """Whether ``node`` reads value ``name`` for nothing but its shape or element type, which a
    fold keeps: Shape and Size (``x.view(x.size(0), -1)``), or CastLike's type example
    (input 1; the dynamo exporter's zero bias is ``CastLike(0, x)``)."""
    if not is_standard(node):
        return False
    if node.op_type in SHAPE_READERS:
        return True
    return node.op_type == "CastLike" and name in node.input[1:] and name not in node.input[:1]


def value_uses(graph: GraphIndex, name: str, besides: onnx.NodeProto) -> tuple[list[str], list[onnx.NodeProto]]:
    """The uses of ``name`` other than ``besides``: labels of those that read its values
    (a graph output included), and the nodes that read only its shape (:func:`reads_only_shape`)."""
    keep = graph.position_of(besides)
    readers = [node for node in graph.consumers_of(name) if graph.position_of(node) != keep]
    shape_readers = [node for node in readers if reads_only_shape(node, name)]
    uses = [describe(node) for node in readers if not reads_only_shape(node, name)]
    if name in graph.graph_outputs:
        uses.append("a graph output")
    return uses, shape_readers


def delegate(
    affine: Affine, candidates: Sequence[FoldRule], graph: GraphIndex, rules: RuleSet
) -> FoldPlan | Refusal | None:
    """The first plan any of ``candidates`` makes for ``affine`` that removes all of it, else the
    first that removes part of it (:attr:`FoldPlan.partial`); else their refusals joined in
    one, or None when none of them matched."""
    refusals = []
    partial = None
    for rule in candidates:
        planned = rule.plan(affine, graph, rules)
        if isinstance(planned, FoldPlan) and not planned.partial:
            return planned
        if isinstance(planned, FoldPlan):
            partial = partial or planned
        elif isinstance(planned, Refusal):
            refusals.append(planned.reason)
    if partial is not None:
        return partial
    return Refusal("; ".join(refusals)) if refusals else None


def channel_axis_refusal(affine: Affine, producer: onnx.NodeProto, axis: int, rank: int | None) -> Refusal | None:
    """Refuse unless the affine scales ``axis`` of the producer's output (of ``rank`` dims).

    A BatchNormalization always scales axis 1; a decomposed affine may scale the last axis
    instead (a ``[C]`` constant), which is a layer's channel axis only when the two coincide
    for the output's rank.
    """
    if affine.channel_axis == axis or (rank is not None and affine.channel_axis % rank == axis % rank):
        return None
    shape = f"a rank-{rank} output" if rank is not None else "an output of unknown rank"
    return Refusal(
        f"{describe(affine.node)} scales axis {affine.channel_axis} of {shape} from {describe(producer)}, "
        f"whose channels are axis {axis}"
    )


def matmul_output_rank(graph: GraphIndex, matmul: onnx.NodeProto) -> int | None:
    """Rank of a MatMul's output: declared or inferred, else ``max(rank X, 2)`` for a 2-D weight."""
    rank = graph.rank_of(matmul.output[0])
    if rank is None:
        x_rank = graph.rank_of(matmul.input[0])
        rank = None if x_rank is None else max(x_rank, 2)
    return rank


def becomes_gemm(graph: GraphIndex, matmul: onnx.NodeProto, dtype: np.dtype) -> bool:
    """Whether a MatMul that gains a bias is better turned into a Gemm, whose C holds it, than
    followed by an Add: when its input is known to be a matrix (Gemm's A is one; a MatMul of
    higher rank is batched, and stays MatMul + Add) and Gemm takes the dtype at the model's
    opset (from opset 7, where C broadcasts without an attribute; bfloat16 from opset 13).
    onnxruntime's own MatMul + BatchNormalization fusion gives the same Gemm."""
    opset = graph.default_opset()
    if graph.rank_of(matmul.input[0]) != 2 or opset < 7:
        return False
    name = np.dtype(dtype).name
    return name in ("float16", "float32", "float64") or (name == "bfloat16" and opset >= 13)


def gemm_takes_bias(graph: GraphIndex, matmul: onnx.NodeProto, bias: np.ndarray) -> bool:
    """Whether ``bias`` can be the C of the Gemm a rank-2 MatMul becomes: C broadcasts *to*
    the product's ``[M, N]`` and may never enlarge it, where an Add's bias may (``[3, N]``
    added to a ``[1, N]`` product gives ``[3, N]``). A matrix bias therefore needs one row,
    or exactly M rows when M is known."""
    if bias.ndim < 2:
        return True
    rows = (graph.static_shape(matmul.input[0]) or (None,))[0]
    return bias.ndim == 2 and (bias.shape[0] == 1 or bias.shape[0] == rows)


@dataclass
class Absorbed:
    """What a layer needs to absorb an affine: its new tensors, and what else changes."""

    updates: list[TensorUpdate]
    attributes: list[AttributeUpdate] = field(default_factory=list)
    added_biases: list[AddedBias] = field(default_factory=list)
    also_changed: list[onnx.NodeProto] = field(default_factory=list)
    """Nodes changed besides the layer itself, e.g. the Gemm behind a Flatten."""
    notes: list[str] = field(default_factory=list)
    retyped: list[OpTypeUpdate] = field(default_factory=list)
    """Op type changes: a rank-2 MatMul with a bias becomes a Gemm."""
    replaced: list[Replaced] = field(default_factory=list)
    """Nodes removed because the layer took them over: the bias Add that Gemm's C now holds."""
    target: onnx.NodeProto | None = None
    """Backward: the node that takes the affine's place when it is not the matched producer
    (a MatMul that takes over the bias Add the rule matched)."""


class IntoProducer(FoldRule):
    """Backward fold: ``affine(layer(x))`` becomes ``layer'(x)``, the layer taking the affine's output.

    Shared preconditions, checked here once for every producer type:

    1. the affine's input is the first output of one of ``producer_ops`` (standard domain);
    2. that output is read by nothing but the affine (and is not a graph output), since
       other readers still need the un-normalized values. A reader of its shape alone (a
       ``Shape`` node) is no obstacle: it reads the affine's output instead, which has the
       same shape.

    Subclasses say only how their tensors absorb ``s`` and ``t`` (:meth:`absorb`).
    """

    producer_ops: frozenset[str]

    def plan(self, affine: Affine, graph: GraphIndex, rules: RuleSet) -> FoldPlan | Refusal | None:
        producer = graph.producer_of(affine.input_name)
        if producer is None or producer.op_type not in self.producer_ops or not is_standard(producer):
            return None
        if list(producer.output).index(affine.input_name) != 0:
            return Refusal(f"the BN reads a secondary output of {describe(producer)}")
        other_uses, shape_readers = value_uses(graph, affine.input_name, besides=affine.nodes[0])
        if other_uses:
            return Refusal(f"{describe(producer)} output also feeds {', '.join(other_uses)}")
        absorbed = self.absorb(producer, affine, graph)
        if isinstance(absorbed, Refusal):
            return absorbed
        return FoldPlan(
            rule=self.name,
            affine=affine,
            target=producer if absorbed.target is None else absorbed.target,
            direction="backward",
            updates=absorbed.updates,
            attributes=absorbed.attributes,
            notes=absorbed.notes,
            also_targets=[*absorbed.also_changed, *shape_readers],
            added_biases=absorbed.added_biases,
            retyped=absorbed.retyped,
            replaced=absorbed.replaced,
        )

    @abstractmethod
    def absorb(self, producer: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Absorbed | Refusal:
        """What makes ``producer`` compute ``affine(producer(x))``."""


class ScaledLayerIntoProducer(IntoProducer):
    """Backward fold into a layer whose input 1 is a weight scaled per output channel and whose
    optional input 2 is a bias: ``W' = W * factor``, ``b' = b * s + t``.

    The flow is the same for Conv, ConvTranspose and Gemm; a subclass states only what differs:
    how its weight gives the affine's channels (:meth:`weight_refusal`), the factor that scales
    it (:meth:`weight_factor`), and, where the layer has its own bias semantics,
    :meth:`bias_refusal` and :meth:`bias_terms`.
    """

    weight_role = "weight"
    bias_role = "bias"

    def absorb(self, producer: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Absorbed | Refusal:
        found = constant_weight_and_bias(graph, producer, self.weight_role, self.bias_role)
        if isinstance(found, Refusal):
            return found
        weight, bias = found
        attributes_now = attributes(producer)
        refusal = (
            channel_axis_refusal(affine, producer, axis=1, rank=self.output_rank(weight))
            or self.weight_refusal(producer, attributes_now, weight, affine)
            or self.bias_refusal(producer, bias, affine)
        )
        if refusal:
            return refusal
        bias, shift, changed = self.bias_terms(bias, affine, attributes_now)
        updates = weight_and_bias_updates(
            producer, weight, self.weight_factor(weight, affine.s, attributes_now), bias,
            # A layer's bias has its channels last: Conv/ConvTranspose [M], Gemm C [N], [1, N], [M, N].
            fold_math.fold_bias(bias, affine.s, shift, axis=-1), self.weight_role,
        )
        if isinstance(updates, Refusal):
            return updates
        return Absorbed(updates, [AttributeUpdate(producer, name, value) for name, value in changed.items()])

    @abstractmethod
    def weight_refusal(
        self, producer: onnx.NodeProto, attributes: dict[str, Any], weight: np.ndarray, affine: Affine
    ) -> Refusal | None:
        """Why this weight cannot give the affine's channels (None when it can)."""

    @abstractmethod
    def weight_factor(self, weight: np.ndarray, s: np.ndarray, attributes: dict[str, Any]) -> np.ndarray:
        """The float64 factor, broadcastable to the weight, that gives ``W' = W * factor``:
        each output channel's slice times its ``s``."""

    def output_rank(self, weight: np.ndarray) -> int:
        """Rank of the layer's output, for the channel-axis check (a Conv's is its weight's)."""
        return weight.ndim

    def bias_refusal(self, producer: onnx.NodeProto, bias: np.ndarray | None, affine: Affine) -> Refusal | None:
        if bias is not None and bias.shape != (affine.channels,):
            return Refusal(f"{describe(producer)} {self.bias_role} shape {list(bias.shape)} is not [{affine.channels}]")
        return None

    def bias_terms(
        self, bias: np.ndarray | None, affine: Affine, attributes: dict[str, Any]
    ) -> tuple[np.ndarray | None, np.ndarray, dict[str, float | int]]:
        """The bias to fold, the shift added to it, and attribute changes: ``b * s + t``."""
        return bias, affine.t, {}


class IntoConsumer(FoldRule):
    """Forward fold: ``layer(affine(x))`` becomes ``layer'(x)``, the layer reading the affine's input.

    With ``affine(x) = s * x + t`` along the layer's *input* channels, a linear layer
    ``y = W x + b`` gives ``W (s * x + t) + b = (W diag(s)) x + (b + W t)``: every input channel
    of W is scaled by ``s`` and ``W t`` joins the bias.

    Shared preconditions, checked here once for every consumer type:

    1. some reader of the affine's output is one of ``consumer_ops`` (else the rule does not match);
    2. the affine's output is not a graph output, which must keep the normalized values;
    3. the affine's input is known to have C channels (a Mul by ``[1, C, 1, 1]`` might
       otherwise broadcast one channel to C, which the layer's weights would not show);
    4. *every* reader is one of ``consumer_ops`` and reads it as its data input (input 0): a
       reader that cannot absorb the affine would still need the normalized values. ``Shape``
       and ``Size`` readers are the exception (``x.view(x.size(0), -1)``): the affine keeps its
       input's shape, so they read its input instead.

    Each reader then gets its own tensors (:meth:`absorb`); a weight shared between readers is
    cloned by the rewrite, never overwritten.
    """

    consumer_ops: frozenset[str]

    def plan(self, affine: Affine, graph: GraphIndex, rules: RuleSet) -> FoldPlan | Refusal | None:
        consumers: list[onnx.NodeProto] = []
        shape_readers: list[onnx.NodeProto] = []
        for node in graph.consumers_of(affine.output_name):
            (shape_readers if reads_only_shape(node, affine.output_name) else consumers).append(node)
        if not any(is_standard(node) and node.op_type in self.consumer_ops for node in consumers):
            return None
        if affine.output_name in graph.graph_outputs:
            return Refusal("the BN output is also a graph output")
        if not affine.exact_channels:
            return Refusal(
                f"the size of '{affine.input_name}' on axis {affine.channel_axis} is unknown, so the "
                f"{affine.kind} constant might broadcast it to {affine.channels} channels"
            )
        for consumer in consumers:
            if not (is_standard(consumer) and consumer.op_type in self.consumer_ops):
                return Refusal(f"BN output also feeds {describe(consumer)}, which cannot absorb it")
            if list(consumer.input).count(affine.output_name) != 1 or consumer.input[0] != affine.output_name:
                return Refusal(f"{describe(consumer)} reads the BN output other than as its data input")
        folds: list[Absorbed] = []
        for consumer in consumers:
            absorbed = self.absorb(consumer, affine, graph, rules.options)
            if isinstance(absorbed, Refusal):
                return absorbed
            folds.append(absorbed)
        return FoldPlan(
            rule=self.name,
            affine=affine,
            target=consumers[0],
            direction="forward",
            updates=[update for fold in folds for update in fold.updates],
            attributes=[update for fold in folds for update in fold.attributes],
            notes=[note for fold in folds for note in fold.notes],
            also_targets=[*consumers[1:], *shape_readers, *(node for fold in folds for node in fold.also_changed)],
            added_biases=[added for fold in folds for added in fold.added_biases],
            retyped=[retyped for fold in folds for retyped in fold.retyped],
            replaced=[replaced for fold in folds for replaced in fold.replaced],
        )

    @abstractmethod
    def absorb(
        self, consumer: onnx.NodeProto, affine: Affine, graph: GraphIndex, options: RuleOptions
    ) -> Absorbed | Refusal:
        """What makes ``consumer`` compute ``consumer(affine(x))`` from ``x``."""


@dataclass(frozen=True)
class Piece:
    """One input of a Concat or an Add, and the part of an affine that input must take.

    ``affine`` stands on the input: its ``nodes`` are the Concat or Add (the input's reader,
    so that a layer rule asks whether anything *else* reads it), and its input and output
    names are the input's name, which the layer behind it keeps writing.
    """

    slot: int
    part: str | None
    """Which part of the affine, when not all of it: ``channels 0-3``."""
    affine: Affine
    axes_after: int | None
    """Axes after the channel axis in this input, to lay ``s`` and ``t`` on a constant input
    (None when unknown)."""

    @property
    def name(self) -> str:
        return self.affine.input_name

    @property
    def label(self) -> str:
        """How the report's notes name the piece."""
        return self.part or f"input {self.slot}"

    @property
    def is_identity(self) -> bool:
        """Whether the piece maps its input to itself (``s = 1``, ``t = 0``): it needs nothing."""
        return bool(np.all(self.affine.s == 1) and np.all(self.affine.t == 0))

    def describe(self) -> str:
        part = f" ({self.part})" if self.part else ""
        return f"{describe(self.affine.node)} input {self.slot} '{self.name}'{part}"


def absorb_piece(piece: Piece, graph: GraphIndex, rules: RuleSet) -> FoldPlan | TensorUpdate | Refusal:
    """What absorbs ``piece``: a constant input takes it in place (``c' = s * c + t``), a
    computed one hands it to every rule that folds into what computes its input. A refusal
    says why not (a plan that would leave part of the piece behind is one)."""
    value = graph.constant_value(piece.name)
    if value is not None:
        return _constant_piece(piece, value, graph)
    producer = graph.producer_of(piece.name)
    if producer is None:
        where = "an enclosing graph's value" if graph.is_outer(piece.name) else "a graph input"
        return Refusal(f"'{piece.name}' is {where}")
    planned = delegate(piece.affine, rules.into_producers, graph, rules)
    if isinstance(planned, FoldPlan) and planned.partial:
        return Refusal(f"only part of it would fold into {describe(producer)}")
    if planned is None:
        return Refusal(f"it comes from {describe(producer)}, which cannot absorb it")
    return planned


def _constant_piece(piece: Piece, constant: np.ndarray, graph: GraphIndex) -> TensorUpdate | Refusal:
    node = piece.affine.node
    dequantize = dequantizing_node(graph, piece.name)
    if dequantize is not None:
        return Refusal(f"'{piece.name}' is dequantized by {describe(dequantize)}; folding would drop quantization")
    refusal = require_float(constant, node, f"input {piece.slot}")
    if refusal:
        return refusal
    if piece.axes_after is None:
        return Refusal(f"the channel axis of constant '{piece.name}' is unknown (rank unknown)")
    values = fold_math.constant_with_affine(constant, piece.affine.s, piece.affine.t, piece.axes_after)
    return cast_tensor(node, piece.slot, values, constant.dtype, "constant")


AbsorbedPiece = tuple[Piece, FoldPlan | TensorUpdate]
"""A piece and what absorbs it: a plan for the layer behind its input, or a constant's new value."""


def split_plan(
    rule: str,
    affine: Affine,
    target: onnx.NodeProto,
    absorbed: Sequence[AbsorbedPiece],
    inserted: Sequence[tuple[Piece, InsertedAffine]] = (),
) -> FoldPlan:
    """One plan that removes ``affine`` from the output of ``target`` (a Concat or an Add) by
    the plans of its pieces: ``target`` writes the affine's output, the layers behind the
    pieces keep their names, and the notes say what became of each piece."""
    updates: list[TensorUpdate] = []
    attributes_changed: list[AttributeUpdate] = []
    added: list[AddedBias] = []
    layers: list[onnx.NodeProto] = []
    notes: list[str] = []
    for piece, result in absorbed:
        if isinstance(result, TensorUpdate):
            updates.append(result)
            notes.append(f"{piece.label}: constant '{piece.name}' absorbs it")
            continue
        updates += result.updates
        attributes_changed += result.attributes
        added += result.added_biases
        layers += result.targets
        into = ", ".join(describe(node) for node in result.targets)
        notes.append(f"{piece.label}: {result.rule} into {into}")
        notes += result.notes
    for piece, kept in inserted:
        form = f"BatchNormalization '{kept.name}'" if kept.batchnorm else "Mul/Add"
        notes.append(f"{piece.label}: kept as {form} on '{piece.name}'")
    return FoldPlan(
        rule=rule,
        affine=affine,
        target=target,
        direction="backward",
        updates=updates,
        attributes=attributes_changed,
        notes=notes,
        also_targets=layers,
        added_biases=added,
        inserted_affines=[kept for _, kept in inserted],
    )
