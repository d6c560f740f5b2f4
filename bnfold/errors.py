"""Errors that end a run, each tied to one documented exit code.

The CLI turns any of these into a one-line message on stderr and its exit code;
nothing else in the package prints or exits.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_NOT_EQUIVALENT = 1
EXIT_BAD_INPUT = 2
EXIT_RUNTIME_FAILURE = 3
EXIT_INTERNAL = 4
"""A bug in bnfold itself: reported in one line; the input is untouched, nothing is written."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (the shell's 128 + SIGINT); no partial output is left."""


class BnfoldError(Exception):
    """Base class: a problem the user must fix, reported in one line."""

    exit_code = EXIT_BAD_INPUT


class InputError(BnfoldError):
    """The input file, output path or options are unusable (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class RuntimeFailure(BnfoldError):
    """onnxruntime cannot load or run a model given to it (exit 3)."""

    exit_code = EXIT_RUNTIME_FAILURE


class NotDeterministic(BnfoldError):
    """The original model computes different outputs from the same inputs (random ops,
    Dropout in training mode): no comparison can tell a fold's error from its randomness, so
    no verdict and no blame is given (exit 3, like a model onnxruntime cannot run)."""

    exit_code = EXIT_RUNTIME_FAILURE


def internal_error_message(error: Exception) -> str:
    """One line for an unexpected exception: what it was, and that it is ours to fix."""
    return f"internal error ({type(error).__name__}: {first_line(error)}); please report it with the model"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries often add pages of detail)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].strip()
