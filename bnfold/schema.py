"""The JSON documents bnfold writes (``--json``, ``report.to_dict()``), as plain values.

Each report builds its own document (:meth:`bnfold.pipeline.FoldReport.to_dict` and
friends) from the helpers here, so the command and the Python API share one schema,
documented in the README. Non-finite floats become the strings "inf"/"nan", so every
document is strict JSON; a run that failed still gets a document, with ``status``
"error", its ``exit_code`` and the one-line ``error`` the command prints.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Protocol

from bnfold.verify import Verification

FOLD_SCHEMA = "bnfold.fold/1"
CHECK_SCHEMA = "bnfold.check/1"
BATCH_SCHEMA = "bnfold.batch/1"
ERROR_STATUS = "error"


def plain(value: Any) -> Any:
    """Dataclasses, paths, tuples and floats as strict-JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def verification_document(verification: Verification | None) -> dict[str, Any] | None:
    """A verification with the verdicts (``passed``) that are properties, not fields."""
    if verification is None:
        return None
    document = plain(verification)
    document["passed"] = verification.passed
    for key in ("outputs", "expected"):
        for output, comparison in zip(document[key], getattr(verification, key)):
            output["passed"] = comparison.passed
    return document


class Verdict(Protocol):
    """What a fold or check report has beyond its fields: its verdict and its verification."""

    @property
    def status(self) -> str: ...

    @property
    def exit_code(self) -> int: ...

    @property
    def verification(self) -> Verification | None: ...


def report_document(schema: str, report: Verdict) -> dict[str, Any]:
    """A fold or check report (a dataclass) as its document: its fields and its verdict."""
    document = {"schema": schema, **plain(report)}
    document.update(status=report.status, exit_code=report.exit_code, error=None,
                    verification=verification_document(report.verification))
    return document


def failure_document(schema: str, error: str, exit_code: int, **identity: Path | None) -> dict[str, Any]:
    """The document of a run that ended in an error: which files, the error and its exit code.

    ``identity`` names the files as the successful document does (``input`` and ``output``
    for a fold, ``original`` and ``folded`` for a check); every other field is absent.
    """
    return {"schema": schema, **plain(identity), "status": ERROR_STATUS, "exit_code": exit_code, "error": error}
