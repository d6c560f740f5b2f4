"""The ``bnfold`` command: a thin Click layer over :mod:`bnfold.pipeline` and :mod:`bnfold.report`.

``bnfold MODEL`` is short for ``bnfold fold MODEL``. Results go to stdout (tables,
or JSON with ``--json -``); errors go to stderr as one line with a documented
exit code, never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from bnfold import report as render
from bnfold.batch import find_models, fold_models, output_in
from bnfold.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, BnfoldError, InputError, internal_error_message
from bnfold.options import DEFAULT_TOLERANCES, Tolerances, VerifyOptions
from bnfold.pipeline import FoldOptions, check_files, fold_file

EXIT_CODES_HELP = """\b
Exit codes:
  0  folded (or compared) and equivalent
  1  not equivalent: outputs differ beyond tolerance (nothing written)
  2  bad input or usage: missing/unreadable/invalid model, bad option
  3  onnxruntime cannot load or run a given model (its message is shown),
     or the original model is not deterministic (differs from itself)"""
BATCH_EXIT_HELP = """
  4  internal error (a bug in bnfold): one line, nothing written
  130 interrupted (Ctrl-C); no partial output is left
  Several models: the worst code over all of them (4 > 3 > 2 > 1 > 0)."""


class DefaultCommandGroup(click.Group):
    """A group where an unknown first word means the default ``fold`` command."""

    default_command = "fold"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def _parse_shape(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, dims = value.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.split(",")) if dims else ()
        except ValueError:
            shape = (-1,)
        if not sep or not name or any(d < 0 for d in shape):
            raise click.BadParameter(f"'{value}' is not NAME:D1,D2,... with non-negative integers")
        shapes[name] = shape
    return shapes


def _parse_tolerances(
    _ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]
) -> dict[str, tuple[float, float]]:
    tolerances: dict[str, tuple[float, float]] = {}
    for value in values:
        name, sep, numbers = value.rpartition(":")
        try:
            atol, rtol = (float(n) for n in numbers.split(","))
        except ValueError:
            atol = rtol = -1.0
        if not sep or not name or atol < 0 or rtol < 0:
            raise click.BadParameter(f"'{value}' is not NAME:ATOL,RTOL with non-negative numbers")
        tolerances[name] = (atol, rtol)
    return tolerances


TOLERANCE_DEFAULTS = ", ".join(
    f"{dtype} {atol:g}/{rtol:g}" for dtype, (atol, rtol) in DEFAULT_TOLERANCES.items()
)


def verification_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``fold`` and ``check``: how the two models are compared."""
    decorators = [
        click.option("--input-shape", "shapes", multiple=True, callback=_parse_shape, metavar="NAME:D1,D2,...",
                     help="Shape for a model input with symbolic dims (repeatable). Otherwise symbolic dims are "
                     "guessed from the model (image sizes it states or its strides), else 1."),
        click.option("--batch", type=int, default=None,
                     help="Size for every symbolic first dim (inputs without --input-shape)."),
        click.option("--seed", default=0, show_default=True, help="Seed for the generated inputs (0 or more)."),
        click.option("--trials", type=int, default=1, show_default=True,
                     help="Run N trials of generated inputs (seeds SEED..SEED+N-1); the worst per output is reported."),
        click.option("--inputs", "inputs_path", type=click.Path(path_type=Path), default=None,
                     metavar="FILE.npz|FOLDER",
                     help="Real inputs instead of generated ones: an .npz keyed by input name, or a folder in "
                     "the ONNX test layout (test_data_set_*/input_*.pb; each data set is a trial, output_*.pb "
                     "are also checked against the folded model)."),
        click.option("--atol", type=click.FloatRange(min=0), default=None,
                     help=f"Absolute tolerance for every output. Defaults per dtype (atol/rtol): {TOLERANCE_DEFAULTS}; "
                     "integers and booleans exact."),
        click.option("--rtol", type=click.FloatRange(min=0), default=None,
                     help="Relative tolerance for every output (default per dtype, as for --atol). "
                     "An element passes if |folded - original| <= atol + rtol * |original|."),
        click.option("--tol", "per_output", multiple=True, callback=_parse_tolerances, metavar="NAME:ATOL,RTOL",
                     help="Tolerances for one output, overriding --atol/--rtol (repeatable)."),
        click.option("--provider", default="CPUExecutionProvider", show_default=True,
                     help="onnxruntime execution provider for both models (one of "
                     "onnxruntime.get_available_providers())."),
        click.option("--json", "json_path", metavar="PATH", default=None,
                     help="Also write the report as JSON to PATH ('-' for stdout, replacing the tables)."),
        click.option("--quiet", "-q", is_flag=True, help="Print one summary line instead of tables."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _verify_options(shapes: dict[str, tuple[int, ...]], batch: int | None, seed: int, trials: int,
                    inputs_path: Path | None, atol: float | None, rtol: float | None,
                    per_output: dict[str, tuple[float, float]], provider: str) -> VerifyOptions:
    return VerifyOptions(shapes=shapes, batch=batch, seed=seed, trials=trials, inputs=inputs_path,
                         tolerances=Tolerances(atol, rtol, per_output), provider=provider)


def _report_path(json_path: str | None) -> Path | None:
    """The ``--json`` file (None for none, or ``-``: stdout), for the run's path checks."""
    return None if json_path in (None, "-") else Path(json_path)


def _emit(document: dict[str, Any], human: Any, quiet_line: str, json_path: str | None, quiet: bool) -> None:
    """stdout gets JSON (``--json -``), one line (``--quiet``) or the tables."""
    if json_path == "-":
        click.echo(render.dump_json(document))
        return
    if json_path:
        try:
            Path(json_path).write_text(render.dump_json(document) + "\n", encoding="utf-8")
        except OSError as error:
            raise InputError(f"{json_path}: cannot write JSON report ({error.strerror or error})") from None
    if quiet:
        click.echo(quiet_line)
    else:
        Console(soft_wrap=False).print(human)


def _run(action: Callable[[], int], interrupted: str = "nothing was written") -> None:
    """Turn bnfold's errors into one stderr line and their exit code; Ctrl-C into 130."""
    try:
        code = action()
    except BnfoldError as error:
        click.echo(f"bnfold: error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo(f"bnfold: interrupted; {interrupted}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as error:  # noqa: BLE001 - a bug must still end in one line, not a traceback
        click.echo(f"bnfold: {internal_error_message(error)}", err=True)
        sys.exit(EXIT_INTERNAL)
    sys.exit(code)


@click.group(cls=DefaultCommandGroup, epilog=EXIT_CODES_HELP,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnfold")
def main() -> None:
    """Fold BatchNormalization into neighbouring layers of ONNX models and prove,
    with onnxruntime, that the result computes the same function.

    `bnfold MODEL.onnx` is short for `bnfold fold MODEL.onnx`.
    """


@main.command(epilog=EXIT_CODES_HELP + BATCH_EXIT_HELP)
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="MODEL...")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Where to write the folded model (default: MODEL.folded.onnx beside the input). One model only.")
@click.option("--output-dir", type=click.Path(exists=True, file_okay=False, writable=True, path_type=Path),
              default=None, help="Write each folded model to DIR/<name>.folded.onnx instead of beside its input.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Fold N models at a time in worker processes (1: in this process).")
@click.option("--in-place", is_flag=True, help="Allow the output to be the input file itself.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime comparison.")
@click.option("--dry-run", is_flag=True, help="Fold and verify in a temporary folder; write nothing.")
@click.option("--keep-failed", is_flag=True, help="Write the folded model even if verification fails.")
@click.option("--exact-padding", is_flag=True,
              help="Also fold a BN into a following padded Conv, adding a per-position bias (static shapes only).")
@click.option("--keep-overridable", is_flag=True,
              help="Treat initializers also listed as graph inputs (IR 4+) as fed at run time and fold nothing "
              "that reads them (by default they fold and leave the inputs).")
@verification_options
def fold(models: tuple[Path, ...], output: Path | None, output_dir: Path | None, jobs: int, in_place: bool,
         no_verify: bool, dry_run: bool, keep_failed: bool, exact_padding: bool, keep_overridable: bool,
         json_path: str | None, quiet: bool, **comparison: Any) -> None:
    """Fold every foldable BatchNormalization of each MODEL, verify, and write the result.

    A MODEL may be a folder: its *.onnx files are folded (recursively, skipping
    *.folded.onnx). Several models print one summary row each and exit with the
    worst code (4 > 3 > 2 > 1 > 0); a bad model does not stop the others.

    When the folded model is not equivalent, the folds are re-applied in groups on
    fresh copies of MODEL to name the fold(s) that broke it.
    """
    if output and output_dir:
        raise click.UsageError("-o/--output and --output-dir cannot be combined")
    found = find_models(models)
    options = FoldOptions(in_place=in_place, verify=not no_verify, dry_run=dry_run,
                          keep_failed=keep_failed, exact_padding=exact_padding, keep_overridable=keep_overridable,
                          verify_options=_verify_options(**comparison), report=_report_path(json_path))
    if len(models) == 1 and found == list(models):
        _fold_one_model(models[0], output_in(output_dir, models[0]) if output_dir else output, options,
                        json_path, quiet)
    elif output:
        raise click.UsageError("-o/--output names one file; with several models or a folder use --output-dir DIR")
    else:
        _fold_many_models(found, output_dir, jobs, options, json_path, quiet)


def _fold_one_model(model: Path, output: Path | None, options: FoldOptions, json_path: str | None,
                    quiet: bool) -> None:
    """The full report of one model (a lone file argument, not a folder)."""
    options.output = output

    def action() -> int:
        result = fold_file(model, options)
        _emit(render.fold_report_json(result), render.render_fold_report(result),
              render.quiet_fold_line(result), json_path, quiet)
        return result.exit_code

    _run(action)


def _fold_many_models(models: list[Path], output_dir: Path | None, jobs: int, options: FoldOptions,
                      json_path: str | None, quiet: bool) -> None:
    """One summary row per model, a progress bar on a terminal, the worst exit code."""

    def action() -> int:
        with render.batch_progress(len(models), quiet=quiet) as advance:
            result = fold_models(models, options, output_dir=output_dir, jobs=jobs, on_result=advance)
        _emit(render.batch_report_json(result), render.batch_table(result),
              render.quiet_batch_lines(result), json_path, quiet)
        return result.exit_code

    _run(action, interrupted="models finished before were written; no partial output was left")


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("folded", type=click.Path(path_type=Path))
@verification_options
def check(original: Path, folded: Path, json_path: str | None, quiet: bool, **comparison: Any) -> None:
    """Compare ORIGINAL and FOLDED with onnxruntime; exit 0 only if every output matches. Writes nothing.

    FOLDED may come from bnfold or any other tool: outputs are matched by name and
    must have the same shape and dtype. Either model failing to load or run in
    onnxruntime exits 3.
    """
    options = _verify_options(**comparison)

    def action() -> int:
        result = check_files(original, folded, options, report=_report_path(json_path))
        _emit(render.check_report_json(result), render.render_check_report(result),
              render.quiet_check_line(result), json_path, quiet)
        return result.exit_code

    _run(action)

