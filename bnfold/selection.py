"""Which BatchNormalization a run may fold: ``--skip PATTERN`` and ``--only PATTERN``.

A user keeps a BN on purpose (a quantization boundary, a layer still being tuned) or
folds a few to bisect a problem by hand. Patterns are shell-style (:mod:`fnmatch`,
case-sensitive) and match a BN's node name or its first output name, wherever the BN
is: inside If/Loop/Scan bodies and functions the node's own name counts, not the
label the report gives it (and for a BN of a function inlined to fold, also the name it
had in the function). A BN kept by the selection is reported as left, with the
pattern that kept it, so a report never hides a BN that was not folded.

A pattern that matches nothing is almost always a typo, and silently folding
everything instead is the worst answer for a tool that gates CI: the run stops with
an error naming the BNs the model has.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import onnx

from bnfold.errors import InputError

# How many BN names an error lists before it only counts the rest.
LISTED_NAMES = 20


def matched_names(node: onnx.NodeProto) -> tuple[str, ...]:
    """What a pattern is matched against: the node's name and its first output's name."""
    return tuple(name for name in (node.name, node.output[0] if node.output else "") if name)


@dataclass(frozen=True)
class Selection:
    """``skip``: BNs never folded. ``only``: when given, the only BNs that may be folded."""

    skip: tuple[str, ...] = ()
    only: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.skip or self.only)

    def refusal(self, names: tuple[str, ...]) -> str | None:
        """Why the selection keeps a BN out of the fold, given the names it is matched by
        (:func:`matched_names`, and the name it had in a function inlined since), or None
        when it may be folded."""
        skipped_by = _first_match(self.skip, names)
        if skipped_by is not None:
            return f"skipped by --skip {skipped_by}"
        if self.only and _first_match(self.only, names) is None:
            return f"not selected by --only {' / --only '.join(self.only)}"
        return None

    def require_matches(self, candidates: Mapping[str, tuple[str, ...]], model: str) -> None:
        """Refuse a pattern that matched none of ``candidates`` (report label → matched names).

        Raises:
            InputError: naming the pattern and the model's BatchNormalization.
        """
        for option, patterns in (("--skip", self.skip), ("--only", self.only)):
            for pattern in patterns:
                if not any(_first_match((pattern,), names) for names in candidates.values()):
                    raise InputError(f"{model}: {option} {pattern} matches no BatchNormalization; {_listing(candidates)}")


def _first_match(patterns: Sequence[str], names: tuple[str, ...]) -> str | None:
    return next((p for p in patterns if any(fnmatch.fnmatchcase(name, p) for name in names)), None)


def _listing(candidates: Mapping[str, tuple[str, ...]]) -> str:
    labels = list(candidates)
    if not labels:
        return "the model has none"
    shown = ", ".join(labels[:LISTED_NAMES])
    more = f", … ({len(labels)} in all)" if len(labels) > LISTED_NAMES else ""
    return f"the model's are: {shown}{more}"
