"""The contract between the rules, the fold driver (:mod:`bnfold.fold`) and the rewrite
(:mod:`bnfold.rewrite`).

A rule looks at one per-channel :class:`Affine` (a BatchNormalization, or a Mul/Add chain that
computes the same kind of map) and answers with one of

* ``None``: its pattern does not match here (another rule may),
* :class:`Refusal`: it matches, but a precondition fails; the reason is shown to the user,
* :class:`FoldPlan`: the new tensors and the rewiring that remove the affine.

Sibling branches summed by an Add can also merge into one layer with no affine involved
(RepVGG's Conv branches): a :class:`MergeRule` answers with a :class:`MergePlan`.

Rules never modify the graph: a plan can be discarded, and rules cannot interfere with one
another. :mod:`bnfold.rewrite` applies the plans the driver accepts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx

from bnfold.fold_math import ScaledWeight

if TYPE_CHECKING:
    from bnfold.graph import GraphIndex


@dataclass(frozen=True)
class Refusal:
    """Why an affine is left in the graph, in words a user reads."""

    reason: str


@dataclass(frozen=True)
class Affine:
    """A per-channel affine map ``y = s * x + t`` that a fold can remove.

    Usually one inference-mode BatchNormalization node; readers of decomposed forms (a
    Mul/Add chain by per-channel constants) produce the same object with several ``nodes``.
    Folding removes every node in ``nodes``: the chain reads ``input_name`` and its last node
    writes ``output_name``. Moved through another op (:class:`Mover`), the same map is
    described on that op's other side: ``nodes`` is then that op, whose input or output the
    moved affine stands on.
    """

    nodes: tuple[onnx.NodeProto, ...]
    input_name: str
    output_name: str
    s: np.ndarray
    t: np.ndarray
    channel_axis: int = 1
    """Axis of the tensor that ``s`` and ``t`` index: 1 for BatchNormalization (``[N, C, ...]``),
    negative when counted from the end (-1: a constant broadcast along the last axis). Rules
    that absorb an affine before them compare it modulo their output's rank."""
    exact_channels: bool = True
    """Whether the input is known to have exactly C entries on ``channel_axis``. A
    BatchNormalization's always has; a Mul/Add by a ``[1, C, 1, 1]`` constant on data of unknown
    shape might broadcast a single channel to C, which only a layer before it can rule out."""
    uniform: bool = False
    """Whether ``s`` and ``t`` are scalars (one entry each) that act on every channel alike: a
    Mul/Add by a scalar, which :mod:`bnfold.rules.uniform` repeats over whichever axis a layer
    next to it has."""
    note: str = ""
    """What the affine is known to be, for the report (e.g. a LayerNorm's γ and β)."""

    @property
    def node(self) -> onnx.NodeProto:
        """The node that names the affine in reports (the BatchNormalization itself)."""
        return self.nodes[0]

    @property
    def channels(self) -> int:
        return int(self.s.shape[0])

    @property
    def kind(self) -> str:
        """The op types it is made of: 'BatchNormalization', or e.g. 'Mul+Add'."""
        return "+".join(node.op_type for node in self.nodes)

    @property
    def parameter_names(self) -> list[str]:
        """Constant inputs of the affine's nodes (released when it is folded)."""
        outputs = {node.output[0] for node in self.nodes}
        return [
            name for node in self.nodes for name in node.input
            if name and name != self.input_name and name not in outputs
        ]


@dataclass(frozen=True)
class TensorUpdate:
    """Give input ``slot`` of ``node`` a new constant value (appending the slot if absent)."""

    node: onnx.NodeProto
    slot: int
    values: np.ndarray | ScaledWeight
    """The new value, or for a weight in a file the recipe that computes it when it is written."""
    role: str
    """What the tensor is, for notes: 'weight', 'bias', 'B', 'scale'."""
    relative_change: float | None = None
    """Largest ``|new - old| / |old|`` of a scaled weight (None for a bias or a new tensor)."""
    rounding_error: float | None = None
    """Largest ``|values - exact|`` against the float64 result before the cast back."""


@dataclass(frozen=True)
class AddedBias:
    """Add the constant ``values`` to ``node``'s output through a new Add node.

    For a bias the node cannot hold itself (MatMul has no bias input; a per-position
    correction does not fit a Conv's per-channel bias). The Add takes over the node's output
    name, so every reader of that output sees the corrected value.
    """

    node: onnx.NodeProto
    values: np.ndarray
    role: str
    rounding_error: float | None = None


@dataclass(frozen=True)
class InsertedAffine:
    """Compute ``scale * x + shift`` on one edge: between the value input ``slot`` of ``reader``
    reads and that input, which reads the result instead (other readers keep ``x``).

    For the part of an affine no layer can absorb, e.g. the slice of a BatchNormalization over
    the one Concat segment that comes from a Relu. With ``batchnorm`` it is written as one
    BatchNormalization (scale ``scale``, bias ``shift``, mean 0, variance 1, epsilon 0: exactly
    ``scale * x + shift`` on axis 1) named ``name``; otherwise as a Mul by ``scale`` then an Add
    of ``shift``, leaving out a Mul by ones or an Add of zeros. ``scale`` and ``shift`` are
    final: cast to their dtype and shaped to broadcast along the channel axis.
    """

    reader: onnx.NodeProto
    slot: int
    scale: np.ndarray
    shift: np.ndarray
    batchnorm: bool
    name: str

    @property
    def node_count(self) -> int:
        """How many nodes the rewrite writes for it."""
        if self.batchnorm:
            return 1
        return int(bool(np.any(self.scale != 1))) + int(bool(np.any(self.shift != 0)))


@dataclass(frozen=True)
class DroppedTerm:
    """Remove input ``slot`` of the Add or Sum ``node``: what it added is now computed elsewhere
    (a sibling branch merged into another branch of the same sum).

    A node left with one input is removed. ``heir``, the node that computes that remaining
    input, then writes the node's output name; without an heir (the remaining input is read by
    other nodes too, or is a graph input) the node's readers read the remaining input instead,
    which the rule allows only when the node's output is no graph output.
    """

    node: onnx.NodeProto
    slot: int
    heir: onnx.NodeProto | None = None


@dataclass(frozen=True)
class AttributeUpdate:
    """Set attribute ``name`` of ``node`` to ``value`` (e.g. a Gemm's ``beta``)."""

    node: onnx.NodeProto
    name: str
    value: float | int


@dataclass(frozen=True)
class OpTypeUpdate:
    """Turn ``node`` into a ``op_type`` node of the standard domain, keeping its name, inputs and outputs.

    A rank-2 MatMul that absorbs a BN's shift becomes a Gemm, whose input C holds the bias
    (the plan's :class:`TensorUpdate` of slot 2 adds it); Gemm's default attributes
    (``alpha = beta = 1``, no transposes) make it compute ``X W + C`` from the MatMul's inputs.
    """

    node: onnx.NodeProto
    op_type: str


@dataclass(frozen=True)
class Replaced:
    """``node`` is removed and ``by`` writes its (first) output from now on.

    A MatMul turned into a Gemm takes over the bias Add after it, whose constant the Gemm's C
    now holds. Applied before the backward renaming, so a target that takes over a node may
    then take the affine's output name too.
    """

    node: onnx.NodeProto
    by: onnx.NodeProto


@dataclass
class FoldPlan:
    """Everything needed to remove one affine by changing the nodes around it."""

    rule: str
    """The rule's name as reported, e.g. ``conv-bn`` or ``conv-bn through Transpose``."""
    affine: Affine
    target: onnx.NodeProto
    """The node that takes the affine's place.

    backward: it writes the affine's output name from now on, in place of the output the
    affine read (the producer that absorbed the affine, the op nearest to the affine that it
    moved through, or the Concat or Add whose inputs it was split over).
    forward: it reads the affine's *input* name from now on (the first consumer).
    sibling: the affine read the same input as ``target``, a branch summed with it, and is
    added into it; the term the affine added to the sum is dropped (``dropped_terms``).
    """
    direction: Literal["backward", "forward", "sibling"]
    updates: list[TensorUpdate]
    attributes: list[AttributeUpdate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    also_targets: list[onnx.NodeProto] = field(default_factory=list)
    """Further nodes the fold changes, shown after ``target`` in the report.

    forward: every one of them that reads the affine's output reads its input instead (the
    other consumers; a Shape node reading it; the op the affine moved through).
    backward: they keep their names (the layer behind the ops the affine moved through), and
    one that reads the value ``target`` wrote (a Shape node: it reads only the shape, which
    the fold keeps) reads it under its new name, the affine's output.
    """
    added_biases: list[AddedBias] = field(default_factory=list)
    retyped: list[OpTypeUpdate] = field(default_factory=list)
    replaced: list[Replaced] = field(default_factory=list)
    inserted_affines: list[InsertedAffine] = field(default_factory=list)
    """Pieces of the affine that stay in the graph, on the edges no layer could absorb them
    from: the plan then removes the affine only partly (:attr:`partial`)."""
    dropped_terms: list[DroppedTerm] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        """Whether part of the affine stays in the graph (``inserted_affines``)."""
        return bool(self.inserted_affines)

    @property
    def targets(self) -> list[onnx.NodeProto]:
        return [self.target, *self.also_targets]

    @property
    def touched_nodes(self) -> list[onnx.NodeProto]:
        """Every node the plan removes or changes: no other plan may touch them in the same pass."""
        return [
            *self.affine.nodes,
            *self.targets,
            *(update.node for update in self.updates),
            *(added.node for added in self.added_biases),
            *(update.node for update in self.attributes),
            *(update.node for update in self.retyped),
            *(replaced.node for replaced in self.replaced),
            *(inserted.reader for inserted in self.inserted_affines),
            *_sum_nodes(self.dropped_terms),
        ]


@dataclass
class MergePlan:
    """A sibling branch summed with ``target`` (both read the same input) merged into it.

    ``merged`` is removed, ``target`` takes its weights through ``updates``, and the term
    the branch added to the sum is dropped (``dropped_terms``).
    """

    rule: str
    target: onnx.NodeProto
    merged: onnx.NodeProto
    updates: list[TensorUpdate]
    dropped_terms: list[DroppedTerm]
    notes: list[str] = field(default_factory=list)

    @property
    def touched_nodes(self) -> list[onnx.NodeProto]:
        """Every node the plan removes or changes: no other plan may touch them in the same pass."""
        return [self.target, self.merged, *(update.node for update in self.updates), *_sum_nodes(self.dropped_terms)]


def _sum_nodes(dropped_terms: list[DroppedTerm]) -> list[onnx.NodeProto]:
    """The sums that lose a term, and the nodes that take over their output."""
    return [node for term in dropped_terms for node in (term.node, term.heir) if node is not None]


@dataclass(frozen=True)
class RuleOptions:
    """Choices the user makes for a whole run."""

    exact_padding: bool = False
    """Fold into a following padded Conv too, adding a per-position bias (``--exact-padding``)."""
    keep_overridable: bool = False
    """Initializers that are also graph inputs (IR 4+) count as fed at run time, so nothing that
    reads them folds (``--keep-overridable``); by default they are the constants they are in
    practice, and those a fold replaces leave the graph inputs."""


class FoldRule(ABC):
    """One folding pattern: match around an affine, check its preconditions, plan the fold.

    A new pattern is one module with one subclass, and one line in the registry
    (:mod:`bnfold.rules`); see ``rules/conv.py`` for the shape of a small one.
    """

    name: str
    """Identifier shown in reports, e.g. ``conv-bn``."""

    @abstractmethod
    def plan(self, affine: Affine, graph: GraphIndex, rules: RuleSet) -> FoldPlan | Refusal | None:
        """Match around ``affine`` and return a plan, a refusal with its reason, or None.

        ``rules`` is the whole rule set of the run: its options, and the rules a composite
        rule hands a moved or split affine to (:func:`bnfold.rules.base.delegate`).
        """


class MergeRule(ABC):
    """Sibling branches that one layer can compute: a rewrite of the same function with fewer
    nodes, tried on every Add and Sum, to the same fixed point as the folds."""

    name: str

    @abstractmethod
    def plan(self, node: onnx.NodeProto, graph: GraphIndex, rules: RuleSet) -> MergePlan | None:
        """A merge of two branches summed by ``node``, or None."""


class Mover(ABC):
    """An op that a per-channel affine can cross: ``op(s * x + t) = s' * op(x) + t'``.

    Movers do not fold anything; the travelling rules (:mod:`bnfold.rules.travel`) move an
    affine across chains of them until a layer rule absorbs it. A new op is one module with
    one subclass, and one line in the registry.

    On the other side the affine may scale another axis (a Transpose), or have a different
    number of channels: a reshape that merges each channel with the axes after it
    (``[N, C, H, W] ↔ [N, C*H*W]``) repeats each ``s`` and ``t`` once per merged entry.
    Either way the answer says the same map in the other side's terms, exactly, or refuses.
    """

    ops: frozenset[str]
    """Op types (standard domain) this mover knows."""

    @abstractmethod
    def backward(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal | None:
        """The affine on ``node``'s data input such that ``node`` after it equals ``affine`` after ``node``.

        ``affine`` reads one of :meth:`affine_outputs`. Return it with ``s``, ``t``,
        ``channel_axis`` and ``exact_channels`` as they lie on the input (names are set by the
        caller), a refusal, or None when ``node`` is not one this mover knows.
        """

    @abstractmethod
    def forward(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal | None:
        """The affine on ``node``'s outputs such that it after ``node`` equals ``node`` after ``affine``.

        ``affine``'s output is ``node``'s data input (input 0); the answer holds on every one
        of :meth:`affine_outputs`. Same answers as :meth:`backward`.
        """

    def affine_outputs(self, node: onnx.NodeProto) -> list[int]:
        """The outputs of ``node`` that the moved affine lies on: the first, unless the op
        writes several values of the same kind (Split). Every other output of ``node``
        (MaxPool's indices, Dropout's mask) must be unused for the affine to cross."""
        return [0]


class SymmetricMover(Mover):
    """A mover whose op treats the affine alike in both directions: the op keeps every value on
    its channel (Identity, Pad, Split) or mixes only values of one channel with weights that
    sum to one (Resize), so the affine lies the same way on either side. Subclasses say once
    what crossing takes (:meth:`cross`)."""

    def backward(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal | None:
        return self.cross(node, affine, graph)

    def forward(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal | None:
        return self.cross(node, affine, graph)

    @abstractmethod
    def cross(self, node: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Affine | Refusal | None:
        """The affine on the other side of ``node`` (either side), a refusal, or None."""


@dataclass(frozen=True)
class RuleSet:
    """The rules of one run, by kind, and the order the driver tries them in (see
    :func:`bnfold.rules.build_rules`)."""

    backward: tuple[FoldRule, ...]
    """Layers before the affine that absorb it."""
    forward: tuple[FoldRule, ...]
    """Layers after the affine that absorb it."""
    movers: tuple[Mover, ...]
    order: tuple[FoldRule, ...]
    """Every rule the driver tries, first match wins."""
    options: RuleOptions = RuleOptions()
    into_producers: tuple[FoldRule, ...] = ()
    """Every rule that folds an affine into what computes its input: the layers, the
    travelling rule and the splits. A split hands each piece of an affine to these."""
    merges: tuple[MergeRule, ...] = ()
    """Sibling branches merged into one layer, tried on every Add and Sum."""
