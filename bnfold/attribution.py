"""Naming the fold that broke equivalence.

When the folded model does not compute what the original does, knowing *that*
is not enough to fix it: a user (or a rule's author) needs the BatchNormalization
and the layer it was folded into. The folds are re-applied in groups on fresh
copies of the original (``fold_batchnorms(..., may_fold=...)``) and each partial
model is verified exactly like the full one (same trials, tolerances, provider).
Sibling-branch merges take part like folds, under the label of the branch merged away.
A failing group is split in halves until single folds remain, so k guilty folds
among n cost about ``2 k log2 n`` verifications instead of n. A group that fails
while both its halves pass is reported as a whole: its folds are only wrong
together (for example errors that add up along a chain). A fold whose error only
shows next to another, already guilty fold is not separated from it: the search
names what must be fixed first, not every contributor. Partial models are
verified with the same body checks as the full one (:mod:`bnfold.bodies`), so a
broken fold in a branch no trial takes is found like any other.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from bnfold.bodies import BodyChecks
from bnfold.fold import FoldRecord, MergeRecord, fold_batchnorms
from bnfold.inputs import Trial
from bnfold.io.load import LoadedModel
from bnfold.io.save import stage
from bnfold.options import Tolerances
from bnfold.rules import RuleSet
from bnfold.verify import OutputComparison, Reference, Verification, run_reference, verify_equivalence


@dataclass(frozen=True)
class GuiltyFold:
    """Fold(s) that alone make the model differ from the original, with the error they cause."""

    batchnorms: tuple[str, ...]
    """The folded BNs (or merged branches) at fault, by label."""
    targets: tuple[str, ...]
    rules: tuple[str, ...]
    output: str
    """The output with the largest error when only these folds are applied (for a body verified
    on its own, prefixed with the body: ``If 'b' then_branch / y``)."""
    max_abs_error: float
    max_rel_error: float
    mismatches: int
    problem: str | None


@dataclass
class Attribution:
    guilty: list[GuiltyFold]
    verifications: int
    """How many partially folded models were verified to find them."""


class _Search:
    """Group testing over the folds of one failed run."""

    def __init__(self, original: LoadedModel, folds: Sequence[FoldRecord], merges: Sequence[MergeRecord],
                 trials: Sequence[Trial], tolerances: Tolerances, provider: str, rules: RuleSet,
                 bodies: BodyChecks | None, progress: Callable[[str, int | None], None]) -> None:
        self.original = original
        self.records: dict[str, FoldRecord | MergeRecord] = {
            **{fold.batchnorm: fold for fold in folds}, **{merge.merged: merge for merge in merges}
        }
        self.trials = trials
        self.tolerances = tolerances
        self.provider = provider
        self.rules = rules
        self.bodies = bodies
        self.progress = progress
        self.verifications = 0
        self._reference: Reference | None = None

    def reference(self) -> Reference:
        """What the original computes on the trials: the same for every partial fold, so it is
        computed once (one session of the original for the whole search, not one per step)."""
        if self._reference is None:
            self._reference = run_reference(self.original.path, self.trials, self.provider, "original",
                                            self.tolerances)
        return self._reference

    def verify_partial(self, labels: Sequence[str]) -> Verification:
        """Fold only the BNs (and merge only the branches) in ``labels`` on a fresh copy of the
        original and verify it."""
        self.progress(f"finding the fold that broke equivalence ({self.verifications} partial folds verified, "
                      f"now {len(labels)} of {len(self.records)})", None)
        model = onnx.ModelProto()
        model.CopyFrom(self.original.model)
        allowed = set(labels)
        store = self.original.store.unchanged_copy()
        fold_batchnorms(model, self.rules, may_fold=allowed.__contains__, store=store)
        self.verifications += 1
        with tempfile.TemporaryDirectory(prefix="bnfold-attribution-") as folder:
            target = Path(folder) / self.original.path.name
            with stage(model, target, store, external_data=bool(self.original.external_data_files)) as staged:
                verification = verify_equivalence(self.original.path, staged.staged_path, self.trials,
                                                  tolerances=self.tolerances, provider=self.provider,
                                                  reference=self.reference())
                if self.bodies is not None:
                    self.bodies.add_to(verification, staged.staged_path, tolerances=self.tolerances,
                                       provider=self.provider)
                return verification

    def guilty_in(self, labels: Sequence[str], failed: Verification) -> list[GuiltyFold]:
        """The smallest failing groups within ``labels``, whose joint fold gave ``failed``."""
        if len(labels) == 1:
            return [self.describe(labels, failed)]
        half = len(labels) // 2
        found: list[GuiltyFold] = []
        for part in (labels[:half], labels[half:]):
            verification = self.verify_partial(part)
            if not verification.passed:
                found += self.guilty_in(part, verification)
        return found or [self.describe(labels, failed)]

    def describe(self, labels: Sequence[str], failed: Verification) -> GuiltyFold:
        where, worst = max(
            ((where, c) for where, c in failed.comparisons() if not c.passed), key=lambda found: _badness(found[1])
        )
        records = [self.records[label] for label in labels]
        return GuiltyFold(
            batchnorms=tuple(labels),
            targets=tuple(r.target for r in records),
            rules=tuple(r.rule for r in records),
            output=where + worst.name,
            max_abs_error=worst.max_abs_error,
            max_rel_error=worst.max_rel_error,
            mismatches=worst.mismatches,
            problem=worst.problem,
        )


def _badness(comparison: OutputComparison) -> tuple[bool, float]:
    return (comparison.problem is not None, comparison.max_abs_error)


def attribute_failure(
    original: LoadedModel,
    folds: Sequence[FoldRecord],
    failed: Verification,
    trials: Sequence[Trial],
    *,
    tolerances: Tolerances,
    provider: str,
    rules: RuleSet,
    merges: Sequence[MergeRecord] = (),
    bodies: BodyChecks | None = None,
    progress: Callable[[str, int | None], None] = lambda _stage, _size: None,
) -> Attribution:
    """Find the fold(s) behind ``failed`` (the verification of all ``folds`` and ``merges``
    applied together).

    ``original`` must be the model as loaded, before any folding; ``bodies`` the body checks
    the failed verification ran (None when no fold lies in a body). ``progress`` hears how far
    the search is, before each partial fold it verifies (a big model takes a while).
    """
    search = _Search(original, folds, merges, trials, tolerances, provider, rules, bodies, progress)
    labels = list(search.records)
    guilty = search.guilty_in(labels, failed) if labels else []
    return Attribution(guilty=guilty, verifications=search.verifications)
