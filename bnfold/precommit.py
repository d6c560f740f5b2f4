"""``bnfold-precommit``: run ``bnfold fold`` or ``bnfold check`` over many models, for pre-commit.

pre-commit calls a hook with every matching file name at once, while the bnfold
commands take one model. This entry point loops: each model is one ordinary
``bnfold`` run (same options, messages and exit codes), and the hook exits with
the worst code seen (4 > 3 > 2 > 1 > 0), so a single non-equivalent model fails the commit.

    bnfold-precommit fold  [OPTIONS] A.onnx B.onnx ...          # writes A.folded.onnx, ...
    bnfold-precommit check [OPTIONS] A.folded.onnx ...          # compares with A.onnx, ...

Arguments ending in ``.onnx`` are the models; everything before them is passed
to every run (pre-commit puts the hook's ``args`` first, the file names last).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from bnfold.cli import main as bnfold_main
from bnfold.errors import EXIT_BAD_INPUT
from bnfold.io.save import FOLDED_SUFFIX


def split_models(arguments: Sequence[str]) -> tuple[list[str], list[str]]:
    """(options, models): the trailing ``*.onnx`` arguments are the models."""
    split = len(arguments)
    while split > 0 and arguments[split - 1].endswith(".onnx"):
        split -= 1
    return list(arguments[:split]), list(arguments[split:])


def bnfold_arguments(command: str, options: list[str], model: str) -> list[str] | None:
    """The ``bnfold`` command line for one model, or None when ``check`` has no original to compare with."""
    if command == "fold":
        return ["fold", "--quiet", *options, model]
    if not model.endswith(FOLDED_SUFFIX):
        return None
    return ["check", "--quiet", *options, model[: -len(FOLDED_SUFFIX)] + ".onnx", model]


def run_bnfold(arguments: list[str]) -> int:
    """One ordinary ``bnfold`` run; its exit code."""
    try:
        bnfold_main.main(arguments, prog_name="bnfold")
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else EXIT_BAD_INPUT
    return 0


@click.command(context_settings={"ignore_unknown_options": True, "help_option_names": ["-h", "--help"]})
@click.argument("command", type=click.Choice(["fold", "check"]))
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
def main(command: str, arguments: tuple[str, ...]) -> None:
    """Run `bnfold COMMAND [OPTIONS] MODEL` for every MODEL; exit with the worst exit code."""
    options, models = split_models(arguments)
    worst = 0
    for model in models:
        command_line = bnfold_arguments(command, options, model)
        if command_line is None:
            click.echo(f"bnfold: error: {model}: check expects a *{FOLDED_SUFFIX} file beside its original", err=True)
            code = EXIT_BAD_INPUT
        else:
            code = run_bnfold(command_line)
        worst = max(worst, code)
    sys.exit(worst)
