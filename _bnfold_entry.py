"""The commands ``bnfold`` and ``bnfold-precommit`` as installed scripts: Ctrl-C while the
package is still being imported ends like Ctrl-C at any other moment.

Importing bnfold (onnx, onnxruntime, numpy) takes a few tenths of a second. An interrupt
raised in the middle of it ends in Python's traceback, or, inside an extension module's
initialization (onnx's), in a C++ abort. So the import runs with Ctrl-C noted rather than
raised, and a noted one ends the command right after. This module lives outside the
package so that importing it imports nothing of bnfold's.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

_EXIT_INTERRUPTED = 130  # bnfold.errors.EXIT_INTERRUPTED, not imported: that is the point

Loaded = TypeVar("Loaded")


def _import_holding_interrupts(load: Callable[[], Loaded]) -> Loaded:
    """``load()``, with Ctrl-C and SIGTERM held until it returns; then the command ends if
    there was one (130, as for an interrupt at any later moment)."""
    received: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, lambda number, _frame: received.append(number)) for number in held}
    try:
        loaded = load()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if received:
        sys.stderr.write("bnfold: interrupted; nothing was written\n")
        sys.stderr.flush()
        os._exit(_EXIT_INTERRUPTED)
    return loaded


def _cli_run() -> Callable[[], NoReturn]:
    from bnfold.cli import run

    return run


def _precommit_main() -> Callable[[], None]:
    from bnfold.errors import interrupt_on_sigterm
    from bnfold.precommit import main

    interrupt_on_sigterm()
    return main


def bnfold() -> None:
    """``bnfold``: :func:`bnfold.cli.run`."""
    _import_holding_interrupts(_cli_run)()


def bnfold_precommit() -> None:
    """``bnfold-precommit``: :func:`bnfold.precommit.main`."""
    _import_holding_interrupts(_precommit_main)()
