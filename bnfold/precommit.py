"""``bnfold-precommit``: the pre-commit hooks ``bnfold-fold`` and ``bnfold-check``.

pre-commit calls a hook with the changed files that match its pattern (``\\.onnx$``),
all at once, options first (the hook's ``args``) and file names last. Every file
stands for its pair ``X.onnx`` / ``X.folded.onnx``, whichever of the two changed:
a commit that changes only ``X.onnx`` must still be checked against ``X.folded.onnx``,
or a stale folded model slips through. Each pair is handled once, in the order
first named.

    bnfold-precommit fold  [OPTIONS] FILE...   # X.folded.onnx = fold(X.onnx), or fail
    bnfold-precommit check [OPTIONS] FILE...   # X.folded.onnx exists and matches X.onnx

``fold`` is a fixer: it folds ``X.onnx`` into a scratch folder beside the target and
moves the result into place only when it differs byte for byte from the existing
``X.folded.onnx`` (and its ``.data`` file), so an up-to-date file is not touched.
Writing a file fails the hook (exit 1), as pre-commit's fixers do, so that the
user sees and stages it (a last line names the files to ``git add``). Each model
prints one line on stdout, each failure one ``bnfold: error: ...`` line on stderr,
and the hook exits with the worst code over all pairs (4 > 3 > 2 > 1 > 0, as
``bnfold`` with several models).
"""

from __future__ import annotations

import dataclasses
import filecmp
import os
import shlex
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from bnfold.api import fold_options, verify_options
from bnfold.cli import BnfoldGroup, hook_verification_options, selection_options
from bnfold.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_NOT_EQUIVALENT,
    EXIT_OK,
    BnfoldError,
    InputError,
    first_line,
    internal_error_message,
)
from bnfold.inputs import check_option_values
from bnfold.io.load import external_data_locations
from bnfold.io.paths import RunFiles, resolved, validate_output_path
from bnfold.io.save import (
    FOLDED_SUFFIX,
    STAGING_PREFIX,
    default_output_path,
    move_into_place,
    output_data_location,
    remove_folder,
)
from bnfold.options import VerifyOptions
from bnfold.pipeline import FoldOptions, check_files, fold_file
from bnfold.report import quiet_check_line, quiet_fold_line, single_line

EXIT_CODES_HELP = """\b
Exit codes (the worst over all pairs: 4 > 3 > 2 > 1 > 0):
  0  every pair up to date and equivalent
  1  not equivalent, or (fold) a folded file was written: review and stage it
  2  bad input or usage: a missing or invalid model, a bad option
  3  onnxruntime cannot load or run a given model (its message is shown)
  4  internal error (a bug in bnfold): one line
  130 interrupted (Ctrl-C, SIGTERM); no partial output is left"""


@dataclass(frozen=True)
class ModelPair:
    """A model and the folded model committed beside it."""

    original: Path
    folded: Path


def pair_of(file: Path) -> ModelPair:
    """The pair a changed file belongs to: ``X.folded.onnx`` is the folded half of ``X.onnx``."""
    if file.name.endswith(FOLDED_SUFFIX):
        return ModelPair(file.with_name(file.name[: -len(FOLDED_SUFFIX)] + ".onnx"), file)
    return ModelPair(file, default_output_path(file))


def model_pairs(files: Sequence[Path]) -> list[ModelPair]:
    """Every file's pair, each pair once (however its files were named), in the order first seen."""
    pairs: dict[Path, ModelPair] = {}
    for file in files:
        pair = pair_of(file)
        pairs.setdefault(resolved(pair.original), pair)
    return list(pairs.values())


def _require_original(pair: ModelPair) -> None:
    if not pair.original.exists():
        raise InputError(f"{pair.original}: no such file (the original of {pair.folded})")


def same_bytes(fresh: Path, existing: Path) -> bool:
    """Whether ``existing`` is a file holding the bytes of ``fresh``."""
    return existing.is_file() and filecmp.cmp(fresh, existing, shallow=False)


def data_file(model: Path) -> Path:
    """The external data file bnfold writes beside a folded model (when the model needs one)."""
    return model.parent / output_data_location(model)


def install_if_changed(fresh: Path, target: Path) -> list[Path]:
    """Move ``fresh`` (and its data file, if any) over ``target`` unless both already hold
    the same bytes; the files written (none when ``target`` was up to date).

    ``fresh`` has the target's file name, so its data file has the target's data
    file name and the model's reference to it is byte-identical. A data file left
    beside ``target`` that ``fresh`` does not have is not referenced by an identical
    model, so it does not count.
    """
    fresh_data = data_file(fresh)
    has_data = fresh_data.exists()
    if same_bytes(fresh, target) and (not has_data or same_bytes(fresh_data, data_file(target))):
        return []
    move_into_place(fresh, target, (fresh_data, data_file(target)) if has_data else None)
    return [target, data_file(target)] if has_data else [target]


def _refuse_overwriting_the_original(pair: ModelPair) -> None:
    """The checks ``bnfold fold`` makes on its output, made on the real target (the fold
    itself writes into a scratch folder, where they cannot catch a clash)."""
    locations: tuple[str, ...] = ()
    if pair.folded.exists() or data_file(pair.folded).exists():  # only an existing file can be read
        locations = external_data_locations(pair.original) or ()
    validate_output_path(pair.folded, external_data=bool(locations))
    files = RunFiles()
    files.read_model(pair.original, locations)
    files.write_output(pair.original, pair.folded, in_place=False)
    files.check()


@contextmanager
def _scratch_folder(beside: Path) -> Iterator[Path]:
    """A hidden folder next to ``beside`` (same file system, so the final move is atomic),
    named as staging folders are (``.bnfold-<pid>-<hex>``): folding a whole folder skips it,
    and the next run removes it if this process is killed outright. Always removed."""
    folder = beside.parent
    scratch = folder / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    try:
        scratch.mkdir(mode=0o700)
    except OSError as error:
        raise InputError(f"{beside}: cannot write in {folder} ({first_line(error)})") from None
    try:
        yield scratch
    finally:
        remove_folder(scratch)


def fold_pair(pair: ModelPair, options: FoldOptions) -> tuple[int, list[Path]]:
    """Fold ``pair.original`` and update ``pair.folded`` if it differs: the exit code, and
    the files written (writing one fails the hook, so that it gets staged)."""
    _require_original(pair)
    _refuse_overwriting_the_original(pair)
    existed = pair.folded.exists()
    with _scratch_folder(pair.folded) as scratch:
        report = fold_file(pair.original, dataclasses.replace(options, output=scratch / pair.folded.name))
        written = install_if_changed(scratch / pair.folded.name, pair.folded) if report.written else []
    line = quiet_fold_line(dataclasses.replace(report, output=pair.folded))
    if report.written:
        line += "; " + (("updated" if existed else "created") if written else "up to date")
    click.echo(line)
    return max(report.exit_code, EXIT_NOT_EQUIVALENT if written else EXIT_OK), written


def check_pair(pair: ModelPair, options: VerifyOptions) -> int:
    """Compare ``pair.folded`` with ``pair.original``; either missing is an error."""
    _require_original(pair)
    if not pair.folded.exists():
        raise InputError(f"{pair.folded}: no such file; run `bnfold {shlex.quote(str(pair.original))}` to create it")
    report = check_files(pair.original, pair.folded, options)
    click.echo(quiet_check_line(report))
    return report.exit_code


def _exit_code_of(run_one: Callable[[ModelPair], int], pair: ModelPair) -> int:
    """Run one pair; bnfold's errors (and bugs) become one stderr line and their exit code."""
    try:
        return run_one(pair)
    except BnfoldError as error:
        click.echo(single_line(f"bnfold: error: {error}"), err=True)
        return error.exit_code
    except Exception as error:  # noqa: BLE001 - one pair's bug must not stop the others
        click.echo(single_line(f"bnfold: {internal_error_message(error)}"), err=True)
        return EXIT_INTERNAL


def _worst_exit_code(pairs: list[ModelPair], run_one: Callable[[ModelPair], int]) -> int:
    """The worst exit code over all pairs; Ctrl-C exits 130 at once (scratch folders are removed)."""
    worst = EXIT_OK
    try:
        for pair in pairs:
            worst = max(worst, _exit_code_of(run_one, pair))
    except KeyboardInterrupt:
        click.echo("bnfold: interrupted; no partial output was left", err=True)
        sys.exit(EXIT_INTERRUPTED)
    return worst


def _refuse_json(json_path: str | None) -> None:
    if json_path is not None:
        raise click.UsageError("the hooks print one line per model; run `bnfold` itself for a JSON report")


def _require_valid_values(options: VerifyOptions) -> None:
    """Impossible option values are one error for the whole hook, not one per pair."""
    try:
        check_option_values(options)
    except InputError as error:
        click.echo(single_line(f"bnfold: error: {error}"), err=True)
        sys.exit(error.exit_code)


@click.group(cls=BnfoldGroup, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """The pre-commit hooks of bnfold. Each FILE (X.onnx or X.folded.onnx) stands for the
    pair X.onnx / X.folded.onnx; the exit code is the worst over all pairs."""


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("files", nargs=-1, type=click.Path(path_type=Path), metavar="FILE...")
@click.option("--exact-padding", is_flag=True, help="As `bnfold fold --exact-padding`.")
@click.option("--keep-overridable", is_flag=True, help="As `bnfold fold --keep-overridable`.")
@selection_options
@hook_verification_options
def fold(files: tuple[Path, ...], exact_padding: bool, keep_overridable: bool, skip: tuple[str, ...],
         only: tuple[str, ...], json_path: str | None, quiet: bool, **comparison: Any) -> None:
    """Write X.folded.onnx when it is missing or differs from a fresh fold of X.onnx, and
    then exit 1 so the new file gets staged; exit 0 when every folded file is up to date.

    Every fold is verified as `bnfold fold` does; one that is not equivalent writes
    nothing and exits 1. --quiet is accepted and implied.
    """
    _refuse_json(json_path)
    options = fold_options(verify_options(**comparison), exact_padding=exact_padding,
                           keep_overridable=keep_overridable, skip=skip, only=only)
    _require_valid_values(options.verify_options)
    written: list[Path] = []

    def fold_and_note(pair: ModelPair) -> int:
        code, files_written = fold_pair(pair, options)
        written.extend(files_written)
        return code

    code = _worst_exit_code(model_pairs(files), fold_and_note)
    if written:
        names = " ".join(shlex.quote(str(path)) for path in written)
        click.echo(f"bnfold: wrote {names}; review and stage: git add {names}")
    sys.exit(code)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("files", nargs=-1, type=click.Path(path_type=Path), metavar="FILE...")
@hook_verification_options
def check(files: tuple[Path, ...], json_path: str | None, quiet: bool, **comparison: Any) -> None:
    """Compare X.folded.onnx with X.onnx for every pair (`bnfold check`); a missing
    X.onnx or X.folded.onnx is an error. Writes nothing. --quiet is accepted and implied."""
    _refuse_json(json_path)
    options = verify_options(**comparison)
    _require_valid_values(options)
    sys.exit(_worst_exit_code(model_pairs(files), lambda pair: check_pair(pair, options)))
