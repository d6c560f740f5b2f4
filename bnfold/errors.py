"""Errors that end a run, each tied to one documented exit code.

The CLI turns any of these into a one-line message on stderr and its exit code;
nothing else in the package prints or exits. The Python API raises them as they
are (exported from :mod:`bnfold`), so a script sees the message the CLI prints.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

EXIT_OK = 0
EXIT_NOT_EQUIVALENT = 1
EXIT_BAD_INPUT = 2
EXIT_RUNTIME_FAILURE = 3
EXIT_INTERNAL = 4
"""A bug in bnfold itself: reported in one line; the input is untouched, nothing is written."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (the shell's 128 + SIGINT), or SIGTERM to a command; no partial output is left."""


class InterruptedAfterMove(KeyboardInterrupt):
    """Ctrl-C or SIGTERM that arrived while an output was being moved into place, raised once
    the move is done: that output is written; nothing after it is done."""


def interrupt_on_sigterm() -> None:
    """SIGTERM (``kill``, ``docker stop``, a supervisor) ends a command as Ctrl-C does: raised
    as KeyboardInterrupt, so staging folders are removed and worker processes stopped before
    the exit (130). By default it would kill the process on the spot, leaving both behind.
    For the commands' own processes only: a library does not take its caller's signals."""
    signal.signal(signal.SIGTERM, _raise_interrupt)


def _raise_interrupt(_number: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class BnfoldError(Exception):
    """Base class: a problem the user must fix, reported in one line."""

    exit_code = EXIT_BAD_INPUT


class InputError(BnfoldError):
    """The input file, output path or options are unusable (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class RuntimeFailure(BnfoldError):
    """onnxruntime cannot load or run a model given to it (exit 3)."""

    exit_code = EXIT_RUNTIME_FAILURE


class NotDeterministic(RuntimeFailure):
    """The original model computes different outputs from the same inputs (random ops,
    Dropout in training mode): no comparison can tell a fold's error from its randomness, so
    no verdict and no blame is given (exit 3, like a model onnxruntime cannot run)."""

    exit_code = EXIT_RUNTIME_FAILURE


class NotEquivalent(BnfoldError):
    """The folded model does not compute what the original computes (exit 1).

    The command reports this as a result, not an error; the Python API raises it only when
    asked (``raise_on_mismatch=True``), with the run's report attached.
    """

    exit_code = EXIT_NOT_EQUIVALENT

    def __init__(self, message: str, report: Any) -> None:
        super().__init__(message)
        self.report = report


def internal_error_message(error: Exception) -> str:
    """One line for an unexpected exception: what it was, and that it is ours to fix."""
    return f"internal error ({type(error).__name__}: {first_line(error)}); please report it with the model"


def onnxruntime_message(error: BaseException) -> str:
    """onnxruntime's message on one line: its detail lines matter ("index: 1 Got: 4
    Expected: 5" follows "Got invalid dimensions for input: x for the following indices"),
    so they are joined, not dropped; a message of pages is cut at 500 characters."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= 500 else text[:499] + "…"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries often add pages of detail)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].strip()
