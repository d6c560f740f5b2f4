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
from bnfold.errors import BnfoldError, InputError
from bnfold.pipeline import FoldOptions, VerifyOptions, check_files, fold_file

EXIT_CODES_HELP = """\b
Exit codes:
  0  folded (or compared) and equivalent
  1  not equivalent: outputs differ beyond tolerance (nothing written)
  2  bad input or usage: missing/unreadable/invalid model, bad option
  3  onnxruntime cannot load or run the original model"""


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


def verification_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by ``fold`` and ``check``: how the two models are compared."""
    decorators = [
        click.option("--input-shape", "shapes", multiple=True, callback=_parse_shape, metavar="NAME:D1,D2,...",
                     help="Shape for a model input with symbolic dims (repeatable). Symbolic dims default to 1."),
        click.option("--seed", default=0, show_default=True, help="Seed for the generated inputs."),
        click.option("--atol", type=float, default=None,
                     help="Absolute tolerance for every output (default per dtype: float32 1e-4, float16 1e-2, "
                     "bfloat16 5e-2, float64 1e-9; integers exact)."),
        click.option("--rtol", type=float, default=None,
                     help="Relative tolerance for every output (default per dtype: float32 1e-3, float16 1e-2, "
                     "bfloat16 5e-2, float64 1e-7; integers exact)."),
        click.option("--provider", default="CPUExecutionProvider", show_default=True,
                     help="onnxruntime execution provider for both models."),
        click.option("--json", "json_path", metavar="PATH", default=None,
                     help="Also write the report as JSON to PATH ('-' for stdout, replacing the tables)."),
        click.option("--quiet", "-q", is_flag=True, help="Print one summary line instead of tables."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def _verify_options(shapes: dict[str, tuple[int, ...]], seed: int, atol: float | None, rtol: float | None,
                    provider: str) -> VerifyOptions:
    tolerance = None
    if atol is not None or rtol is not None:
        tolerance = (atol if atol is not None else 0.0, rtol if rtol is not None else 0.0)
    return VerifyOptions(shapes=shapes, seed=seed, tolerance=tolerance, provider=provider)


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


def _run(action: Callable[[], int]) -> None:
    """Turn bnfold's errors into one stderr line and their exit code."""
    try:
        code = action()
    except BnfoldError as error:
        click.echo(f"bnfold: error: {error}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo("bnfold: interrupted; nothing was written", err=True)
        sys.exit(130)
    sys.exit(code)


@click.group(cls=DefaultCommandGroup, epilog=EXIT_CODES_HELP,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bnfold")
def main() -> None:
    """Fold BatchNormalization into neighbouring layers of ONNX models and prove,
    with onnxruntime, that the result computes the same function.

    `bnfold MODEL.onnx` is short for `bnfold fold MODEL.onnx`.
    """


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Where to write the folded model (default: MODEL.folded.onnx beside the input).")
@click.option("--in-place", is_flag=True, help="Allow the output to be the input file itself.")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime comparison.")
@click.option("--dry-run", is_flag=True, help="Fold and verify in a temporary folder; write nothing.")
@click.option("--keep-failed", is_flag=True, help="Write the folded model even if verification fails.")
@click.option("--exact-padding", is_flag=True,
              help="Also fold a BN into a following padded Conv, adding a per-position bias (static shapes only).")
@verification_options
def fold(model: Path, output: Path | None, in_place: bool, no_verify: bool, dry_run: bool, keep_failed: bool,
         exact_padding: bool,
         shapes: dict[str, tuple[int, ...]], seed: int, atol: float | None, rtol: float | None, provider: str,
         json_path: str | None, quiet: bool) -> None:
    """Fold every foldable BatchNormalization of MODEL, verify, and write the result."""
    options = FoldOptions(output=output, in_place=in_place, verify=not no_verify, dry_run=dry_run,
                          keep_failed=keep_failed, exact_padding=exact_padding,
                          verify_options=_verify_options(shapes, seed, atol, rtol, provider))

    def action() -> int:
        result = fold_file(model, options)
        _emit(render.fold_report_json(result), render.render_fold_report(result),
              render.quiet_fold_line(result), json_path, quiet)
        return result.exit_code

    _run(action)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("original", type=click.Path(path_type=Path))
@click.argument("folded", type=click.Path(path_type=Path))
@verification_options
def check(original: Path, folded: Path, shapes: dict[str, tuple[int, ...]], seed: int, atol: float | None,
          rtol: float | None, provider: str, json_path: str | None, quiet: bool) -> None:
    """Compare ORIGINAL and FOLDED with onnxruntime; exit 0 only if every output matches. Writes nothing."""
    options = _verify_options(shapes, seed, atol, rtol, provider)

    def action() -> int:
        result = check_files(original, folded, options)
        _emit(render.check_report_json(result), render.render_check_report(result),
              render.quiet_check_line(result), json_path, quiet)
        return result.exit_code

    _run(action)

