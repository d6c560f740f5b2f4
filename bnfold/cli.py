"""The ``bnfold`` command: a thin Click layer over the Python API (:mod:`bnfold.api`).

``bnfold MODEL`` is short for ``bnfold fold MODEL``. Results go to stdout (tables,
or JSON with ``--json -``); errors go to stderr as one line with a documented
exit code, never a traceback, usage errors included.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import os
import platform
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from bnfold import api
from bnfold import report as render
from bnfold.batch import find_models, fold_models, output_in
from bnfold.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    BnfoldError,
    InputError,
    InterruptedAfterMove,
    internal_error_message,
    interrupt_on_sigterm,
)
from bnfold.inputs import files_read_by_inputs
from bnfold.io.load import external_data_locations
from bnfold.io.paths import PathClash, RunFiles
from bnfold.io.save import default_output_path, output_folder, write_text_whole
from bnfold.options import DEFAULT_TOLERANCES
from bnfold.pipeline import FoldReport
from bnfold.schema import BATCH_SCHEMA, CHECK_SCHEMA, FOLD_SCHEMA, failure_document

EXIT_CODES_HELP = """\b
Exit codes:
  0  folded (or compared) and equivalent, or folded with --no-verify
  1  not equivalent: outputs differ beyond tolerance (nothing written)
  2  bad input or usage: missing/unreadable/invalid model, bad option
  3  onnxruntime cannot load or run a given model (its message is shown),
     or the original model is not deterministic (differs from itself)
  4  internal error (a bug in bnfold): one line, nothing written
  130 interrupted (Ctrl-C, SIGTERM); no partial output is left"""
BATCH_EXIT_HELP = """
  Several models: the worst code over all of them (4 > 3 > 2 > 1 > 0)."""
ERROR_PREFIX = "bnfold: error: "


def one_line(error: click.ClickException) -> str:
    """Click's message for a usage error as one line, with where to find help."""
    message = " ".join(error.format_message().split()).rstrip(".")
    context = getattr(error, "ctx", None)
    return f"{message} (see '{context.command_path} --help')" if context is not None else message


class BnfoldGroup(click.Group):
    """A group whose usage errors (a bad option value, an unknown option, a missing
    argument) are one line ``bnfold: error: ...`` with exit code 2, like every other
    error, instead of Click's three-line Usage/Try/Error block; and whose command list
    shows each command's whole first sentence, never cut off with "..."."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, command.get_short_help_str(limit=sys.maxsize))
                for name in self.list_commands(ctx)
                if (command := self.get_command(ctx, name)) is not None and not command.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def main(  # type: ignore[override]
        self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any
    ) -> NoReturn:
        extra.pop("standalone_mode", None)
        try:
            result = super().main(args, prog_name, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as error:
            click.echo(f"{ERROR_PREFIX}nothing to do (see '{error.ctx.command_path} --help')", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except click.ClickException as error:
            click.echo(ERROR_PREFIX + one_line(error), err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("bnfold: interrupted; nothing was written", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(result if isinstance(result, int) else 0)


class DefaultCommandGroup(BnfoldGroup):
    """A group where an unknown first word means the default ``fold`` command, unless it
    is not a file and looks like a misspelt command (``bnfold chek a.onnx b.onnx``)."""

    default_command = "fold"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            self._refuse_misspelt_command(args[0])
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)

    def _refuse_misspelt_command(self, word: str) -> None:
        if word.startswith("-") or "." in word or "/" in word or Path(word).exists():
            return
        close = difflib.get_close_matches(word, list(self.commands), n=1, cutoff=0.6)
        if close:
            raise click.UsageError(f"'{word}' is neither a file nor a command; did you mean 'bnfold {close[0]}'?")


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
    """Options shared by ``fold`` and ``check``: how the two models are compared (their
    names are the keyword arguments of :func:`bnfold.api.verify_options`), and the report."""
    return _with_verification_options(function, hooks=False)


def hook_verification_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`verification_options` for the pre-commit hooks, which print one line per model:
    ``--json`` is refused there (and not offered in their help), ``--quiet`` implied."""
    return _with_verification_options(function, hooks=True)


def _with_verification_options(function: Callable[..., Any], *, hooks: bool) -> Callable[..., Any]:
    decorators = [
        click.option("--input-shape", "input_shapes", multiple=True, callback=_parse_shape, metavar="NAME:D1,D2,...",
                     help="Shape for a model input with symbolic dims (repeatable). Otherwise symbolic dims are "
                     "guessed from the model (image sizes it states or its strides), else 1."),
        click.option("--batch", type=int, default=None,
                     help="Size for every symbolic first dim (inputs without --input-shape)."),
        click.option("--seed", default=0, show_default=True, help="Seed for the generated inputs (0 or more)."),
        click.option("--trials", type=int, default=1, show_default=True,
                     help="Run N trials of generated inputs (seeds SEED..SEED+N-1); the worst per output is reported."),
        click.option("--inputs", "inputs", type=click.Path(path_type=Path), default=None,
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
        click.option("--tol", "tol", multiple=True, callback=_parse_tolerances, metavar="NAME:ATOL,RTOL",
                     help="Tolerances for one output, overriding --atol/--rtol (repeatable). NAME must be an "
                     "output of the model."),
        click.option("--provider", default="CPUExecutionProvider", show_default=True,
                     help="onnxruntime execution provider for both models (one of "
                     "onnxruntime.get_available_providers())."),
        click.option("--json", "json_path", metavar="PATH", default=None, hidden=hooks,
                     help="Also write the report as JSON to PATH ('-' for stdout, replacing the tables). "
                     "Written when the run fails too, with status 'error', exit_code and error (not when "
                     "the command line itself is refused: an unknown option, a value out of range)."),
        click.option("--quiet", "-q", is_flag=True,
                     help="Accepted; the hooks always print one line per model." if hooks
                     else "Print one summary line instead of tables."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def selection_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """``--skip`` and ``--only``: which BatchNormalization may be folded."""
    decorators = [
        click.option("--skip", multiple=True, metavar="PATTERN",
                     help="Leave the BNs whose node name or output name matches PATTERN (shell-style: *, ?, "
                     "[seq]; repeatable). In If/Loop/Scan bodies and functions the node's own name is matched. "
                     "Skipped BNs are reported as left; a PATTERN matching no BN is an error."),
        click.option("--only", multiple=True, metavar="PATTERN",
                     help="Fold only the BNs matching PATTERN (as --skip; repeatable); the others are reported "
                     "as left."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


class _ReportNotWritten(InputError):
    """The ``--json`` file could not be written: the failure's own report is not tried there again."""


def _write_json(document: dict[str, Any], json_path: str) -> None:
    """The JSON report to stdout (``-``) or to a file, whole or not at all."""
    if json_path == "-":
        _print(render.dump_json(document) + "\n")
        return
    _reports_written.add(json_path)  # before: an interrupt may land just as the file lands
    try:
        write_text_whole(Path(json_path), render.dump_json(document) + "\n")
    except OSError as error:
        raise _ReportNotWritten(f"{json_path}: cannot write JSON report ({error.strerror or error})") from None


_reports_written: set[str] = set()
"""The ``--json`` files the current run (:func:`_run`) has written: an interrupt that follows
rewrites them."""


def _report_path(json_path: str | None) -> Path | None:
    """The ``--json`` file (None for none, or ``-``: stdout), for the run's path checks."""
    return None if json_path in (None, "-") else Path(json_path)


def _refuse_clobbering_report(json_path: str | None, models: Iterable[Path], outputs: Iterable[Path],
                              inputs: Path | None, *, in_place: bool) -> None:
    """Before any work: the ``--json`` file is none of the files the run reads or writes
    (models and their external data files, outputs, ``--inputs``). A failure's JSON document
    is written to it even when the run stops early (a bad option, a model that cannot be
    loaded), so this cannot wait for the run's own check."""
    report = _report_path(json_path)
    if report is None:
        return
    files = RunFiles()
    for model in models:
        files.read_model(model, external_data_locations(model) or ())
    for model, output in zip(models, outputs):
        files.write_output(model, output, in_place=in_place)
    files.read_inputs(files_read_by_inputs(inputs))
    files.write_report(report)
    files.check()


def _rendered(document: dict[str, Any], human: Any, quiet_line: str, json_path: str | None, quiet: bool) -> str:
    """What stdout gets, rendered now and printable (:func:`bnfold.report.printable`): JSON
    (``--json -``), one line (``--quiet``) or the tables; a JSON report file is written now too.

    A fold does this before its output is moved into place (``FoldOptions.before_commit``),
    so that an error while rendering or writing the report leaves no output behind.
    """
    if json_path == "-":
        return render.dump_json(document) + "\n"  # ASCII: non-ASCII characters are escaped
    if json_path:
        _write_json(document, json_path)
    return render.printable(quiet_line + "\n" if quiet else render.human_text(human))


def _print(text: str) -> None:
    """Write what :func:`_rendered` made, as it is: rich chose its colours for stdout already.

    A reader that stopped reading (``bnfold … | head -1``) has what it wanted: the run is
    finished (its output, if any, is in place), so its exit code stands, with no complaint
    about the pipe; later writes go nowhere.
    """
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


FailureDocument = Callable[[str, int], dict[str, Any]]
"""The JSON document of a run that failed, from its error message and exit code."""


def _run(action: Callable[[], int], json_path: str | None, failure: FailureDocument,
         interrupted: str = "nothing was written", interrupted_after_move: str | None = None) -> NoReturn:
    """Turn bnfold's errors into one stderr line and their exit code (and, with ``--json``,
    a document saying so); Ctrl-C or SIGTERM into 130, saying ``interrupted``, or
    ``interrupted_after_move`` when it came as an output was moved into place (that output
    is written). A report this run already wrote is then replaced by one saying it was
    interrupted, unless its output was written."""
    _reports_written.clear()  # this run's only (the API and tests may run several in a process)
    try:
        code = action()
    except BnfoldError as error:
        # A path the run may not write is never written, not even with the failure's report,
        # and a report that could not be written is not tried again.
        unwritable = isinstance(error, _ReportNotWritten) or (isinstance(error, PathClash) and error.report_involved)
        _fail(ERROR_PREFIX, str(error), error.exit_code, None if unwritable else json_path, failure)
    except KeyboardInterrupt as stop:
        after_move = isinstance(stop, InterruptedAfterMove) and interrupted_after_move is not None
        said = f"interrupted; {interrupted_after_move if after_move else interrupted}"
        if not after_move and json_path in _reports_written:
            with contextlib.suppress(BnfoldError, OSError):
                _write_json(failure(said, EXIT_INTERRUPTED), json_path)
        click.echo(f"bnfold: {said}", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as error:  # noqa: BLE001 - a bug must still end in one line, not a traceback
        _fail("bnfold: ", internal_error_message(error), EXIT_INTERNAL, json_path, failure)
    sys.exit(code)


def _fail(prefix: str, message: str, exit_code: int, json_path: str | None, failure: FailureDocument) -> NoReturn:
    """The error line on stderr, after the JSON document of the failure when one was asked for."""
    line = prefix + message
    if json_path:
        try:
            _write_json(failure(message, exit_code), json_path)
        except InputError as error:
            line += f" (and {error})"
    click.echo(render.single_line(line), err=True)
    sys.exit(exit_code)


def version_text() -> str:
    """bnfold's version and those of what it computes with: what a bug report needs."""
    import numpy
    import onnx
    import onnxruntime

    return (
        f"bnfold {importlib.metadata.version('bnfold')}\n"
        f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}, "
        f"Python {platform.python_version()}"
    )


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_text())
        ctx.exit()


@click.group(cls=DefaultCommandGroup, epilog=EXIT_CODES_HELP,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the versions of bnfold, onnx, onnxruntime and numpy, and exit.")
def main() -> None:
    """Fold BatchNormalization into neighbouring layers of ONNX models and prove,
    with onnxruntime, that the result computes the same function.

    `bnfold MODEL.onnx` is short for `bnfold fold MODEL.onnx`.
    """


@main.command(epilog=EXIT_CODES_HELP + BATCH_EXIT_HELP)
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="MODEL...")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Where to write the folded model (default: MODEL.folded.onnx beside the input). One model only.")
@click.option("--output-dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Write each folded model to DIR/<name>.folded.onnx instead of beside its input "
              "(DIR and its parents are created).")
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
@selection_options
@verification_options
def fold(models: tuple[Path, ...], output: Path | None, output_dir: Path | None, jobs: int, in_place: bool,
         no_verify: bool, dry_run: bool, keep_failed: bool, exact_padding: bool, keep_overridable: bool,
         skip: tuple[str, ...], only: tuple[str, ...], json_path: str | None, quiet: bool, **comparison: Any) -> None:
    """Fold every foldable BatchNormalization of each MODEL, verify, and write the result.

    A MODEL may be a folder: its *.onnx files are folded (recursively, skipping
    *.folded.onnx). Several models print one summary row each and exit with the
    worst code (4 > 3 > 2 > 1 > 0); a bad model does not stop the others.

    When the folded model is not equivalent, the folds are re-applied in groups on
    fresh copies of MODEL to name the fold(s) that broke it.
    """
    settings = dict(verify=not no_verify, skip=skip, only=only, exact_padding=exact_padding,
                    keep_overridable=keep_overridable, dry_run=dry_run, in_place=in_place, keep_failed=keep_failed)
    found = find_models(models)
    single = len(models) == 1 and found == list(models)  # a lone file, or a folder without models
    target = output_in(output_dir, models[0]) if single and output_dir else output

    def failure(message: str, exit_code: int) -> dict[str, Any]:
        if single:
            return failure_document(FOLD_SCHEMA, message, exit_code, input=models[0], output=target)
        return failure_document(BATCH_SCHEMA, message, exit_code)

    def action() -> int:
        _refuse_output_as_second_model(models, output, output_dir)
        outputs = [output_in(output_dir, model) if output_dir else default_output_path(model) for model in found]
        written = [] if dry_run else [target or outputs[0]] if single else outputs  # a dry run writes no model
        _refuse_clobbering_report(json_path, found, written, comparison.get("inputs"), in_place=in_place)
        if output is not None and str(output) == "-":
            raise InputError("-o -: the folded model is written to a file; name one (only --json writes to stdout)")
        if output and output_dir:
            raise InputError("-o/--output and --output-dir cannot be combined")
        if output and not single:
            raise InputError("-o/--output names one file; with several models or a folder use --output-dir DIR")
        with _output_dir(output_dir, dry_run):
            if single:
                return _fold_one_model(models[0], target, settings, comparison, json_path, quiet)
            return _fold_many_models(found, output_dir, jobs, settings, comparison, json_path, quiet)

    _run(action, json_path, failure, interrupted=(
        "nothing was written" if single else "models finished before were written; no partial output was left"),
         interrupted_after_move="the folded model had just been written" if single else None)


def _refuse_output_as_second_model(models: tuple[Path, ...], output: Path | None, output_dir: Path | None) -> None:
    """``bnfold in.onnx out.onnx`` (how onnxsim and onnxslim are called) would fold in.onnx
    and report out.onnx missing: say how to name the output, before any work."""
    if len(models) != 2 or output or output_dir:
        return
    source, target = models
    if source.is_file() and not target.exists() and not target.is_symlink() and target.suffix == ".onnx":
        raise InputError(f"{target}: no such file; to write the folded model there, use -o: "
                         f"bnfold {shlex.quote(str(source))} -o {shlex.quote(str(target))}")


@contextlib.contextmanager
def _output_dir(folder: Path | None, dry_run: bool) -> Iterator[None]:
    """``--output-dir`` created for the run (not for a dry run, which writes nothing)."""
    if folder is None or dry_run:
        yield
        return
    with output_folder(folder):
        yield


def _fold_one_model(model: Path, output: Path | None, settings: dict[str, Any], comparison: dict[str, Any],
                    json_path: str | None, quiet: bool) -> int:
    """The full report of one model (a lone file argument, not a folder)."""
    shown: list[str] = []

    def render_before_commit(report: FoldReport) -> None:
        shown.append(_rendered(report.to_dict(), render.render_fold_report(report), render.quiet_fold_line(report),
                               json_path, quiet))

    with render.run_status(model.name, quiet=quiet) as progress:
        result = api.fold(model, output=output or default_output_path(model), progress=progress,
                          report_file=_report_path(json_path), before_commit=render_before_commit,
                          **settings, **comparison)
    _print(shown[0])
    return result.report.exit_code


def _fold_many_models(models: list[Path], output_dir: Path | None, jobs: int, settings: dict[str, Any],
                      comparison: dict[str, Any], json_path: str | None, quiet: bool) -> int:
    """One summary row per model, a progress bar on a terminal, the worst exit code."""
    options = api.fold_options(api.verify_options(**comparison), report_file=_report_path(json_path),
                               before_commit=render.rehearse_batch_row, **settings)
    with render.batch_progress(len(models), quiet=quiet) as advance:
        result = fold_models(models, options, output_dir=output_dir, jobs=jobs, on_result=advance)
    _print(_rendered(result.to_dict(), render.batch_table(result), render.quiet_batch_lines(result), json_path, quiet))
    return result.exit_code


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

    def action() -> int:
        _refuse_clobbering_report(json_path, [original, folded], [], comparison.get("inputs"), in_place=False)
        with render.run_status(folded.name, quiet=quiet) as progress:
            report = api.check(original, folded, progress=progress, report_file=_report_path(json_path),
                               **comparison)
        _print(_rendered(report.to_dict(), render.render_check_report(report), render.quiet_check_line(report),
                         json_path, quiet))
        return report.exit_code

    def failure(message: str, exit_code: int) -> dict[str, Any]:
        return failure_document(CHECK_SCHEMA, message, exit_code, original=original, folded=folded)

    _run(action, json_path, failure)


def _arrays_in_small_pages() -> None:
    """Ask numpy to stop advising huge pages for large arrays in this process, unless the
    user set ``NUMPY_MADVISE_HUGEPAGE`` themselves.

    A fold allocates each large weight once, fills it once and writes it once; huge pages
    buy nothing there and cost kernel time to clear and compact once memory is fragmented
    (folding 1.0 GB of external data right after another large process: 3.2 s -> 2.2 s,
    of which 1.0 s less system time; no change on self-contained models). Only the command
    does this: it owns its process, where the Python API runs in its caller's.
    """
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return
    try:
        from numpy._core.multiarray import _set_madvise_hugepage  # type: ignore[attr-defined]  # numpy >= 2
    except ImportError:
        try:
            from numpy.core.multiarray import _set_madvise_hugepage  # type: ignore[attr-defined,no-redef,unused-ignore]
        except ImportError:  # a numpy without the switch: keep its default
            return
    _set_madvise_hugepage(False)


def run() -> NoReturn:
    """The ``bnfold`` command as a process: :func:`main`, then, once its output is flushed, an
    immediate exit with its code.

    Tearing the interpreter down (every module, the arrays and sessions a run leaves for the
    collector) costs tens of milliseconds and does nothing for the user; the run itself has
    already removed its staging folders and stopped its workers.
    """
    _arrays_in_small_pages()
    interrupt_on_sigterm()
    try:
        main(prog_name="bnfold")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else EXIT_BAD_INPUT)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: the exit code still says how it went
        pass
    os._exit(code)
