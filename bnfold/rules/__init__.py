"""The registry: every rule, mover and affine reader, in the order they are tried.

A new pattern is one module and one line here:

* a layer that absorbs an affine *after* it: a :class:`~bnfold.rules.plan.FoldRule` (usually a
  small :class:`~bnfold.rules.base.IntoProducer` subclass) in ``BACKWARD_RULES``;
* a layer that absorbs an affine *before* it: an :class:`~bnfold.rules.base.IntoConsumer`
  subclass in ``FORWARD_RULES``;
* an op an affine may cross on its way to a layer: a :class:`~bnfold.rules.plan.Mover` in
  ``MOVERS``; the travelling rules then cross it in both directions, in chains, for every
  layer rule;
* another form of affine map (like the Mul/Add chains tf2onnx writes): a reader in
  ``AFFINE_READERS``; if the rules need it restated first (a scalar affine repeated over a
  layer's channels), a rule in ``RESTATING``; an affine removed outright (one that computes
  nothing), a rule in ``REMOVALS``;
* an op whose inputs each take a piece of an affine after it (Concat, Add): a split in
  ``SPLITS``, which hands each piece to the layer, travelling and split rules;
* an affine that a branch summed with it absorbs: a rule in ``SIBLINGS``; branches summed
  together that one layer can compute: a :class:`~bnfold.rules.plan.MergeRule` in ``MERGES``,
  tried on every Add and Sum to the same fixed point as the folds.

Backward folds come first, so that an affine between two layers folds into the one before it;
the splits follow (a split that leaves a piece behind yields to any rule that removes the whole
affine); then forward folds, sibling branches, and merging into an earlier BatchNormalization
as the last resort.
"""

from __future__ import annotations

from bnfold.rules.add import AddSplit
from bnfold.rules.batchnorm import read_batchnorm
from bnfold.rules.batchnorm_merge import BnMerge
from bnfold.rules.branch_merge import IdentityIntoSibling, SiblingConvMerge
from bnfold.rules.concat import ConcatSplit
from bnfold.rules.conv import ConvBn
from bnfold.rules.convtranspose import ConvTransposeBn
from bnfold.rules.decomposed import read_decomposed_affine
from bnfold.rules.forward_conv import BnConv
from bnfold.rules.forward_linear import BnLinear
from bnfold.rules.gemm import GemmBn
from bnfold.rules.identity import IdentityAffine
from bnfold.rules.layout import LayoutMover
from bnfold.rules.matmul import MatMulBn
from bnfold.rules.matmul_add import MatMulAddBn
from bnfold.rules.move_average import AverageMover
from bnfold.rules.move_max import MaxMover
from bnfold.rules.move_pad import PadMover
from bnfold.rules.move_reshape import ReshapeMover
from bnfold.rules.move_resize import ResizeMover
from bnfold.rules.move_slice import SliceMover
from bnfold.rules.move_split import SplitMover
from bnfold.rules.passthrough import PassThroughMover
from bnfold.rules.plan import (
    Affine,
    FoldPlan,
    FoldRule,
    MergeRule,
    Mover,
    Refusal,
    RuleOptions,
    RuleSet,
    TensorUpdate,
)
from bnfold.rules.travel import ThroughIntoConsumer, ThroughIntoProducer
from bnfold.rules.uniform import UniformAffine, read_uniform_affine

# Functions that recognise a removable per-channel affine map at a node (or None).
AFFINE_READERS = (read_batchnorm, read_decomposed_affine, read_uniform_affine)

# Tried first: affines that computing nothing removes outright.
REMOVALS: tuple[FoldRule, ...] = (IdentityAffine(),)

# Tried next: they restate an affine (a scalar one, over a layer's channels) for the other rules.
RESTATING: tuple[FoldRule, ...] = (UniformAffine(),)

BACKWARD_RULES: tuple[FoldRule, ...] = (ConvBn(), GemmBn(), ConvTransposeBn(), MatMulBn(), MatMulAddBn())

FORWARD_RULES: tuple[FoldRule, ...] = (BnLinear(), BnConv())

MOVERS: tuple[Mover, ...] = (
    LayoutMover(),
    PassThroughMover(),
    AverageMover(),
    MaxMover(),
    ReshapeMover(),
    ResizeMover(),
    SliceMover(),
    SplitMover(),
    PadMover(),
)

SPLITS: tuple[FoldRule, ...] = (ConcatSplit(), AddSplit())

SIBLINGS: tuple[FoldRule, ...] = (IdentityIntoSibling(),)

MERGES: tuple[MergeRule, ...] = (SiblingConvMerge(),)

# Tried when no layer takes the affine: it merges into a BatchNormalization before it.
LAST_RESORT: tuple[FoldRule, ...] = (BnMerge(),)


def build_rules(
    *,
    exact_padding: bool = False,
    keep_overridable: bool = False,
    backward: tuple[FoldRule, ...] = BACKWARD_RULES,
    forward: tuple[FoldRule, ...] = FORWARD_RULES,
    movers: tuple[Mover, ...] = MOVERS,
    splits: tuple[FoldRule, ...] = SPLITS,
    siblings: tuple[FoldRule, ...] = SIBLINGS,
    merges: tuple[MergeRule, ...] = MERGES,
) -> RuleSet:
    """The rule set of a run, with the user's options; the registry's rules unless given."""
    into_producers = (*backward, ThroughIntoProducer(), *splits)
    order = (
        *REMOVALS,
        *RESTATING,
        *into_producers,
        *forward, ThroughIntoConsumer(),
        *siblings,
        *LAST_RESORT,
    )
    return RuleSet(backward, forward, movers, order,
                   RuleOptions(exact_padding=exact_padding, keep_overridable=keep_overridable),
                   into_producers=into_producers, merges=merges)


RULES = build_rules()
"""The default rule set."""

__all__ = [
    "AFFINE_READERS", "BACKWARD_RULES", "FORWARD_RULES", "LAST_RESORT", "MERGES", "MOVERS", "REMOVALS", "RESTATING",
    "RULES", "SIBLINGS", "SPLITS", "Affine", "FoldPlan", "FoldRule", "MergeRule", "Mover", "Refusal", "RuleOptions", "RuleSet",
    "TensorUpdate", "build_rules",
]
