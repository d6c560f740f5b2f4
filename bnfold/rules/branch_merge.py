"""Sibling branches summed together merge into one Conv (RepVGG, ACNet, MobileOne).

A train-form RepVGG block computes ``Conv3x3(x) + Conv1x1(x) + BN(x)``; once each branch's own
BN is folded into its Conv, the sum is one Conv of the same function:

* two Convs over the same input are one Conv when the smaller one's kernel fits in the larger
  one's: every tap of it reads, for every output, the input position some tap of the larger
  reads (same strides and output sizes, e.g. a 1×1 unpadded beside a 3×3 with pads 1, or
  ACNet's 1×3 and 3×1 beside a 3×3), and its groups lie inside the larger one's. The smaller
  kernel is zero-padded into the larger and added, biases too
  (:func:`~bnfold.fold_math.kernel_with_branch`);
* a BatchNormalization on the identity branch is ``s * x + t``, a depthwise 1×1 kernel ``s``
  with bias ``t`` (:func:`~bnfold.fold_math.identity_kernel`): it fits in a sibling Conv with
  stride 1, as many output as input channels, and a tap that reads ``x`` itself, where ``s``
  lands on the diagonal. Any group count takes it (a depthwise sibling as its per-channel
  kernel), and any dilation, as long as that tap exists.

Only a kernel that fits in a sibling's merges, so the merged Conv is that sibling with new
values: no merge adds arithmetic (1×3 beside 3×1 alone would make a 3×3, and stays two Convs).
A BN merge is a fold of that BN (rule ``branch-merge``, direction ``sibling``); a Conv merge
with no BN involved (what the dynamo exporter leaves of ACNet, having folded every BN) is a
:class:`~bnfold.rules.plan.MergePlan` of its own. The fixed point merges one branch per sum
and pass, the largest kernel first taking every branch that fits in it.

Preconditions: the branches are standard Convs reading the same value as their data input,
with constant float weights (and biases) of one dtype; each branch's output feeds only the
sum, and dropping its term leaves the sum well formed (:func:`~bnfold.rules.sums.drop`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.fold_math import ConvGeometry
from bnfold.graph import GraphIndex, attributes, describe, is_standard
from bnfold.rules.base import channel_axis_refusal
from bnfold.rules.plan import (
    Affine,
    FoldPlan,
    FoldRule,
    MergePlan,
    MergeRule,
    Refusal,
    RuleSet,
    TensorUpdate,
)
from bnfold.rules.sums import Term, drop, is_root, sum_tree, tree_adding
from bnfold.rules.weights import cast_tensor, constant_weight_and_bias

RULE = "branch-merge"


@dataclass(frozen=True)
class Kernel:
    """A Conv kernel as a merge sees it: weight ``[M, C/group, k...]``, groups, taps, bias."""

    weight: np.ndarray
    group: int
    geometry: ConvGeometry
    bias: np.ndarray | None

    @property
    def cost(self) -> int:
        """Multiply-adds per output position."""
        return int(self.weight.size)

    @property
    def size(self) -> str:
        return "×".join(str(k) for k in self.geometry.kernel)


@dataclass(frozen=True)
class Branch:
    """A Conv whose output is a term of a sum."""

    conv: onnx.NodeProto
    term: Term
    kernel: Kernel


def conv_geometry(conv: onnx.NodeProto, weight: np.ndarray, graph: GraphIndex) -> ConvGeometry | Refusal:
    """Where ``conv``'s taps read: strides, dilations and explicit pads (``auto_pad`` resolved)."""
    settings = attributes(conv)
    kernel = tuple(int(k) for k in weight.shape[2:])
    rank = len(kernel)
    strides = [int(v) for v in settings.get("strides", [1] * rank)]
    dilations = [int(v) for v in settings.get("dilations", [1] * rank)]
    auto_pad = settings.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        shape = graph.static_shape(conv.input[0])
        spatial = shape[2:] if shape is not None else None
        if all(stride == 1 for stride in strides):
            spatial = (0,) * rank  # with stride 1 the padding does not depend on the size
        if spatial is None or len(spatial) != rank or None in spatial:
            return Refusal(f"{describe(conv)} pads SAME with strides on an input of unknown size")
        pads = fold_math.same_padding(auto_pad, tuple(d for d in spatial if d is not None), kernel, strides, dilations)
    elif auto_pad == "VALID":
        pads = [0] * (2 * rank)
    else:
        pads = [int(v) for v in settings.get("pads", [0] * (2 * rank))]
    if len(strides) != rank or len(dilations) != rank or len(pads) != 2 * rank:
        return Refusal(f"{describe(conv)} attributes do not match its {rank}-D kernel")
    return ConvGeometry(kernel, tuple(strides), tuple(dilations), tuple(pads[:rank]), tuple(pads[rank:]))


def branch_conv(term: Term, graph: GraphIndex) -> onnx.NodeProto | None:
    """The standard Conv whose (first) output ``term`` is, if any."""
    conv = graph.producer_of(term.value)
    if conv is None or conv.op_type != "Conv" or not is_standard(conv) or conv.output[0] != term.value:
        return None
    return conv


def read_branch(term: Term, conv: onnx.NodeProto, graph: GraphIndex) -> Branch | Refusal:
    """``conv``, which computes ``term``, as a mergeable branch, or why it is not one."""
    other_uses = graph.other_uses(term.value, besides=term.node)
    if other_uses:
        return Refusal(f"{describe(conv)} output also feeds {', '.join(other_uses)}")
    if list(term.node.input).count(term.value) > 1:  # Add(c, c): one Conv, two terms
        return Refusal(f"{describe(term.node)} adds the output of {describe(conv)} more than once")
    found = constant_weight_and_bias(graph, conv, "weight", "bias")
    if isinstance(found, Refusal):
        return found
    weight, bias = found
    group = int(attributes(conv).get("group", 1))
    if weight.ndim < 3 or weight.shape[0] % group or (bias is not None and bias.shape != weight.shape[:1]):
        return Refusal(f"{describe(conv)} weight shape {list(weight.shape)} (group={group}) is malformed")
    geometry = conv_geometry(conv, weight, graph)
    if isinstance(geometry, Refusal):
        return geometry
    return Branch(conv, term, Kernel(weight, group, geometry, bias))


def fit(inner: Kernel, outer: Kernel) -> tuple[np.ndarray, ...] | str:
    """The taps of ``outer`` where ``inner``'s taps go, or why ``inner`` does not fit in it."""
    in_channels = inner.weight.shape[1] * inner.group
    if inner.weight.shape[0] != outer.weight.shape[0] or in_channels != outer.weight.shape[1] * outer.group:
        return f"its {outer.weight.shape[0]} output channels are not {inner.weight.shape[0]}"
    if inner.group % outer.group:
        return f"its {outer.group} groups do not contain {inner.group}"
    taps = fold_math.tap_positions(inner.geometry, outer.geometry)
    if taps is None:
        return "its taps do not read every position the other reads (strides, pads or dilations differ)"
    return taps


def _updates(target: Branch, kernel: Kernel, taps: tuple[np.ndarray, ...], shift: np.ndarray | None
             ) -> list[TensorUpdate] | Refusal:
    """The target's new weight and bias: ``kernel`` added in at ``taps``, ``shift`` to the bias."""
    own = target.kernel
    weight = fold_math.kernel_with_branch(own.weight, own.group, kernel.weight, kernel.group, taps)
    updates = [cast_tensor(target.conv, 1, weight, own.weight.dtype, "weight")]
    biases = [np.asarray(part, dtype=np.float64) for part in (own.bias, shift) if part is not None]
    if biases:
        dtype = own.weight.dtype if own.bias is None else own.bias.dtype
        updates.append(cast_tensor(target.conv, 2, np.sum(biases, axis=0), dtype, "bias"))
    refused = next((update for update in updates if isinstance(update, Refusal)), None)
    return refused or updates  # type: ignore[return-value]


def _first_tap(taps: tuple[np.ndarray, ...]) -> str:
    return f"tap ({', '.join(str(int(axis[0])) for axis in taps)})"


class IdentityIntoSibling(FoldRule):
    """``Conv(x) + ... + affine(x)`` → ``Conv'(x) + ...``: the identity branch's affine joins a sibling's kernel."""

    name = RULE

    def plan(self, affine: Affine, graph: GraphIndex, rules: RuleSet) -> FoldPlan | Refusal | None:
        found = tree_adding(affine.output_name, graph)
        if found is None:
            return None
        tree, term = found
        siblings = [(candidate, conv) for candidate in tree.terms
                    if (conv := branch_conv(candidate, graph)) is not None and conv.input[0] == affine.input_name]
        if not siblings:
            return None
        reasons = []
        branches = []
        for sibling, conv in siblings:
            branch = read_branch(sibling, conv, graph)
            if isinstance(branch, Refusal):
                reasons.append(branch.reason)
                continue
            refusal = channel_axis_refusal(affine, branch.conv, axis=1, rank=branch.kernel.weight.ndim)
            if refusal:
                reasons.append(refusal.reason)
            else:
                branches.append(branch)
        for branch in sorted(branches, key=lambda candidate: -candidate.kernel.cost):
            rank = branch.kernel.weight.ndim - 2
            identity = Kernel(fold_math.identity_kernel(affine.s, rank), affine.channels,
                              ConvGeometry.identity(rank), affine.t)
            taps = fit(identity, branch.kernel)
            if isinstance(taps, str):
                reasons.append(f"{describe(branch.conv)}: {taps}")
                continue
            dropped = drop(term, graph)
            if isinstance(dropped, Refusal):
                return dropped
            updates = _updates(branch, identity, taps, affine.t)
            if isinstance(updates, Refusal):
                return updates
            return FoldPlan(
                rule=self.name, affine=affine, target=branch.conv, direction="sibling", updates=updates,
                notes=[f"identity branch: s on the diagonal of {_first_tap(taps)} of the {branch.kernel.size} kernel"],
                dropped_terms=[dropped],
            )
        return Refusal(f"no sibling Conv over '{affine.input_name}' can take it: {'; '.join(reasons)}")


class SiblingConvMerge(MergeRule):
    """``Conv_a(x) + Conv_b(x)`` → ``Conv_ab(x)`` when ``b``'s kernel fits in ``a``'s."""

    name = RULE

    def plan(self, node: onnx.NodeProto, graph: GraphIndex, rules: RuleSet) -> MergePlan | None:
        if not is_root(node, graph):
            return None
        by_input: dict[str, list[tuple[Term, onnx.NodeProto]]] = {}
        for term in sum_tree(node, graph).terms:
            conv = branch_conv(term, graph)
            if conv is not None:
                by_input.setdefault(conv.input[0], []).append((term, conv))
        for convs in by_input.values():
            if len(convs) < 2:
                continue  # weights are read only where two Convs share an input
            branches = [branch for term, conv in convs if isinstance(branch := read_branch(term, conv, graph), Branch)]
            ordered = sorted(branches, key=lambda branch: -branch.kernel.cost)
            for position, outer in enumerate(ordered):
                for inner in ordered[position + 1:]:
                    planned = self._merge(inner, outer, graph)
                    if planned is not None:
                        return planned
        return None

    def _merge(self, inner: Branch, outer: Branch, graph: GraphIndex) -> MergePlan | None:
        taps = fit(inner.kernel, outer.kernel)
        if isinstance(taps, str) or inner.kernel.weight.dtype != outer.kernel.weight.dtype:
            return None
        dropped = drop(inner.term, graph)
        updates = _updates(outer, inner.kernel, taps, inner.kernel.bias)
        if isinstance(dropped, Refusal) or isinstance(updates, Refusal):
            return None
        groups = f", {inner.kernel.group} groups into {outer.kernel.group}" if inner.kernel.group != outer.kernel.group else ""
        note = f"{inner.kernel.size} kernel added at {_first_tap(taps)} of the {outer.kernel.size} kernel{groups}"
        return MergePlan(rule=self.name, target=outer.conv, merged=inner.conv, updates=updates,
                         dropped_terms=[dropped], notes=[note])
