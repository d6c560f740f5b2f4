"""Showing what a run did: rich tables for people, JSON for machines, one line for --quiet.

The JSON report carries the same facts as the tables; each report builds its own
document (``to_dict()``, see :mod:`bnfold.schema`), written here as strict JSON.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.measure import Measurement
from rich.progress import Progress, TextColumn
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from bnfold.attribution import Attribution
from bnfold.batch import BatchReport, ModelResult
from bnfold.pipeline import CheckReport, FoldReport, ModelStats
from bnfold.verify import OutputComparison, Verification

STATUS_STYLE = {"equivalent": "bold green", "not-equivalent": "bold red", "unverified": "bold yellow",
                "error": "bold red"}


# -- JSON ---------------------------------------------------------------------------------------


def dump_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, allow_nan=False)


# -- human output -------------------------------------------------------------------------------

def printable(text: str) -> str:
    """``text`` as every terminal and pipe can take it: the bytes of a file name that are not
    UTF-8 (which Python holds as surrogate escapes) shown as ``\\xe9``, the rest unchanged.

    Used on paths before they are laid out in a table (so columns line up) and by the CLI on
    everything it prints.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name produces
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


# Control characters as escapes: a name with a newline (models may hold any string) must not
# split an error, which is one line on stderr.
_CONTROL_ESCAPES = {
    **{code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F)},
    ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
}


def single_line(text: str) -> str:
    """:func:`printable`, with control characters (newlines included) written as escapes:
    what an error line on stderr needs, whatever names the model holds."""
    return printable(text).translate(_CONTROL_ESCAPES)


# Wider than any line a report can have: the measuring console never wraps.
_UNBOUNDED = 1_000_000


def human_text(renderable: RenderableType) -> str:
    """A report as stdout will show it: fitted to the window on a terminal (with its colours);
    elsewhere (a CI log, a pipe, a file) at its natural width, so that no column is squeezed or
    cut and no name is wrapped, and without the trailing spaces a fixed width would pad every
    line with. Rendered apart from printing so that a fold can render before it commits."""
    console = Console(soft_wrap=False)
    if console.is_terminal:
        with console.capture() as capture:
            console.print(renderable)
        return capture.get()
    width = Measurement.get(console, console.options.update_width(_UNBOUNDED), renderable).maximum
    buffer = io.StringIO()
    Console(file=buffer, width=max(width, 1), soft_wrap=False, color_system=None).print(renderable)
    return "".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())


def _titled(title: str, table: Table) -> Group:
    """A table under its title. Not rich's own table title, which wraps to the table's
    width: a long title (the inputs of a verification) would break over lines in a log."""
    return Group(Text(title, style="table.title"), table)


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    scaled = float(value)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(scaled) < 1000 or unit == "GB":
            return f"{scaled:.0f} {unit}" if unit == "B" else f"{scaled:.1f} {unit}"
        scaled /= 1000
    return str(value)


def _delta(before: int | None, after: int | None) -> Text:
    if before is None or after is None or before == after:
        return Text("")
    change = after - before
    return Text(f"{change:+,}", style="green" if change < 0 else "yellow")


def stats_table(before: ModelStats, after: ModelStats, titles: tuple[str, str] = ("before", "after")) -> Group:
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("")
    table.add_column(titles[0], justify="right")
    table.add_column(titles[1], justify="right")
    table.add_column("Δ", justify="right")
    for op in sorted(set(before.op_counts) | set(after.op_counts)):
        b, a = before.op_counts.get(op, 0), after.op_counts.get(op, 0)
        table.add_row(Text(op), str(b), str(a), _delta(b, a))
    table.add_section()
    table.add_row("nodes", f"{before.nodes:,}", f"{after.nodes:,}", _delta(before.nodes, after.nodes))
    table.add_row(
        "parameters", f"{before.parameters:,}", f"{after.parameters:,}", _delta(before.parameters, after.parameters)
    )
    size_change = (
        Text(_size(after.file_bytes - before.file_bytes))
        if before.file_bytes is not None and after.file_bytes is not None and after.file_bytes != before.file_bytes
        else Text("")
    )
    table.add_row("file size", _size(before.file_bytes), _size(after.file_bytes), size_change)
    return _titled("Before / after", table)


def _fmt(value: float) -> str:
    return f"{value:.2e}" if math.isfinite(value) else str(value)


def _measured(value: float | None) -> str:
    return "-" if value is None else _fmt(value)


def _shape(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype}[{','.join(map(str, shape))}]"


def _inputs_line(verification: Verification) -> str:
    """The inputs used: shapes of the first trial, and which trials (seeds or data sets) ran."""
    if not verification.trials:
        return "no trials"
    first = verification.trials[0]
    shapes = ", ".join(f"{s.name} {_shape(s.dtype, s.shape)}" for s in first.inputs) or "none"
    others = sorted({", ".join(f"{s.name} {_shape(s.dtype, s.shape)}" for s in trial.inputs)
                     for trial in verification.trials[1:]} - {shapes})
    if others:  # the wider trial of a model whose symbolic sizes were guessed
        shapes = " and ".join([shapes, *others])
    seeds = [t.seed for t in verification.trials if t.seed is not None]
    if len(verification.trials) == 1:
        source = f"seed {first.seed}" if first.seed is not None else f"from {first.label}"
    elif seeds:
        source = f"{len(seeds)} trials, seeds {seeds[0]}..{seeds[-1]} (worst trial per output)"
    else:
        source = f"{len(verification.trials)} data sets (worst per output)"
    return f"inputs {shapes}, {source}"


def _guessed_lines(verification: Verification) -> str:
    """One line per input whose sizes beyond the batch were guessed: what was used and why
    (a batch of 1 goes without saying; the JSON report lists it too)."""
    return "".join(
        f"\nguessed {guess.input} [{','.join(map(str, guess.shape))}]: {guess.reason} (--input-shape gives exact sizes)"
        for guess in verification.guessed_sizes if guess.beyond_batch
    )


def _comparison_table(title: str, comparisons: list[OutputComparison], with_trial: bool) -> Group:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("", no_wrap=True)
    table.add_column("output", overflow="fold", min_width=14)
    columns = ("trial", "max |Δ|", "max rel", "worst at", "out of tol", "atol/rtol")
    for column in columns if with_trial else columns[1:]:
        table.add_column(column, justify="right", no_wrap=True)
    problems = []
    for output in comparisons:
        verdict = Text("ok", style="green") if output.passed else Text("FAIL", style="bold red")
        cells = [
            _fmt(output.max_abs_error),
            _fmt(output.max_rel_error),
            ",".join(map(str, output.worst_index)),
            f"{output.mismatches:,}/{output.elements:,}",
            f"{output.atol:.0e}/{output.rtol:.0e}",
        ]
        table.add_row(
            verdict,
            Text(f"{output.name}\n{_shape(output.dtype, output.shape)}"),
            *([Text(output.trial)] if with_trial else []),
            *cells,
        )
        if output.problem:
            problems.append(Text(f"{output.name}: {output.problem}", style="red"))
    return Group(_titled(title, table), *problems)


def verification_table(verification: Verification) -> Group:
    """One row per output; outputs that could not be compared are explained below.

    Expected outputs shipped with real inputs get a second table (folded vs expected).
    """
    several = len(verification.trials) > 1
    parts: list[RenderableType] = [
        _comparison_table(
            f"Verification: onnxruntime {verification.provider}, graph optimizations off\n"
            f"{_inputs_line(verification)}{_guessed_lines(verification)}",
            verification.outputs,
            several,
        )
    ]
    if verification.expected:
        parts.append(_comparison_table("Folded vs expected outputs", verification.expected, True))
    for body in verification.bodies:
        inputs = ", ".join(f"{value.name} {_shape(value.dtype, value.shape)} ({value.source})"
                           for value in body.inputs) or "none"
        parts.append(_comparison_table(f"{body.label}, verified on its own\ninputs {inputs}", body.outputs, several))
    for unverified in verification.unverified_bodies:
        parts.append(Text(f"{unverified.label}: not verified on its own ({unverified.reason}); "
                          f"its {len(unverified.withheld)} fold(s) were not applied", style="yellow"))
    return Group(*parts)


def attribution_table(attribution: Attribution) -> Group:
    """The fold(s) that break equivalence on their own, found by re-applying folds in groups."""
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("BatchNormalization", "into", "rule", "output", "max |Δ|", "max rel", "out of tol"):
        table.add_column(column, justify="right" if column.startswith(("max", "out")) else "left")
    for guilty in attribution.guilty:
        table.add_row(
            Text("\n".join(guilty.batchnorms)), Text("\n".join(guilty.targets)), Text("\n".join(guilty.rules)),
            Text(guilty.output), _fmt(guilty.max_abs_error), _fmt(guilty.max_rel_error), f"{guilty.mismatches:,}",
        )
    return _titled(f"Broken by ({attribution.verifications} partial folds verified)", table)


def _name(path: Path | None, in_memory: str) -> str:
    """How a report names a model: its path, or a label for one the Python API held in memory."""
    return in_memory if path is None else str(path)


def _headline(source: str, target: str, status: str) -> Text:
    line = Text.assemble(("bnfold ", "bold"), printable(source), " → ", printable(target), "  ")
    line.append(status, style=STATUS_STYLE[status])
    return line


NAMES_SHOWN = 5
"""Names listed in a one-line summary of many (the JSON report has them all)."""


def _some_names(names: list[str]) -> str:
    """``'a', 'b', 'c'``, or the first few of them ``and 12 more``."""
    shown = ", ".join(f"'{printable(name)}'" for name in names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def overridable_line(names: list[str]) -> Text:
    """``3 overridable initializers folded and removed from the inputs: a, b, c``."""
    plural = "s" if len(names) != 1 else ""
    return Text(
        f"{len(names)} overridable initializer{plural} (also graph inputs) folded and removed from the inputs: "
        f"{_some_names(names)} (--keep-overridable refuses such folds)",
        style="yellow",
    )


def inlined_line(names: list[str]) -> Text:
    """``2 model-local functions inlined ...: 'Block', 'BatchNorm2d'``."""
    plural = "s" if len(names) != 1 else ""
    return Text(
        f"{len(names)} model-local function{plural} inlined, their BNs needing what their callers pass: "
        f"{_some_names(names)}",
        style="yellow",
    )


def _warnings(warnings: list[str]) -> list[Text]:
    return [Text(f"Warning: {printable(warning)}", style="yellow") for warning in warnings]


def render_fold_report(report: FoldReport) -> Group:
    """The full human summary of one fold run."""
    if report.dry_run:
        target = "(dry run, nothing written)"
    elif report.written:
        target = str(report.output)
    else:
        target = "(in memory)" if report.output is None else f"{report.output} (not written)"
    parts: list[Any] = [_headline(_name(report.input, "<model>"), target, report.status), *_warnings(report.warnings),
                        ""]
    parts.append(stats_table(report.before, report.after))
    folds = Table(box=box.SIMPLE_HEAD)
    for column in ("folded", "into", "rule", "max rel Δw", "rounding", "notes"):
        folds.add_column(column, justify="right" if column in ("max rel Δw", "rounding") else "left")
    for fold in report.folds:
        # A decomposed BN (e.g. Mul+Add) is named by its first node: say what it was.
        folded = fold.batchnorm if fold.kind == "BatchNormalization" else f"{fold.batchnorm} ({fold.kind})"
        folded += " (partly)" if fold.partial else ""
        folds.add_row(Text(folded), Text(fold.target), Text(fold.rule), _measured(fold.max_relative_weight_change),
                      _measured(fold.max_rounding_error), Text("; ".join(fold.notes)))
    parts.append(_titled(f"Folded ({len(report.folds)})", folds))
    if report.overridable_inputs_removed:
        parts.append(overridable_line(report.overridable_inputs_removed))
    if report.inlined_functions:
        parts.append(inlined_line(report.inlined_functions))
    if report.merges:
        merges = Table(box=box.SIMPLE_HEAD)
        for column in ("merged", "into", "rule", "rounding", "notes"):
            merges.add_column(column, justify="right" if column == "rounding" else "left")
        for merge in report.merges:
            merges.add_row(Text(merge.merged), Text(merge.target), Text(merge.rule), _measured(merge.max_rounding_error),
                           Text("; ".join(merge.notes)))
        parts.append(_titled(f"Merged branches ({len(report.merges)})", merges))
    if report.left:
        left = Table(box=box.SIMPLE_HEAD)
        left.add_column("BatchNormalization")
        left.add_column("reason")
        for record in report.left:
            left.add_row(Text(record.batchnorm), Text(record.reason))
        parts.append(_titled(f"Left in place ({len(report.left)})", left))
    if report.problem:
        parts.append(Text(f"Problem: {report.problem}", style="red"))
    if report.verification:
        parts.append(verification_table(report.verification))
    elif report.verification_skipped:
        style = "red" if report.problem else "yellow"
        parts.append(Text(f"Verification skipped ({report.verification_skipped}).", style=style))
    if report.attribution:
        parts.append(attribution_table(report.attribution))
    parts.append(Text("Timings: " + " · ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()), style="dim"))
    return Group(*parts)


def render_check_report(report: CheckReport) -> Group:
    return Group(
        _headline(_name(report.original, "<original>"), _name(report.folded, "<folded>"), report.status),
        *_warnings(report.warnings),
        "",
        stats_table(report.before, report.after, titles=("original", "folded")),
        verification_table(report.verification),
        Text("Timings: " + " · ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()), style="dim"),
    )


def _worst_error(verification: Verification | None) -> str:
    worst = verification.max_abs_error if verification else None
    return "" if worst is None else f" (max |Δ| {_fmt(worst)})"


def _affines(report: FoldReport) -> str:
    count = report.affines_folded
    return f" (+{count} decomposed affine{'s' if count != 1 else ''})" if count else ""


def _merges(report: FoldReport) -> str:
    count = len(report.merges)
    return f", merged {count} sibling branch{'es' if count != 1 else ''}" if count else ""


def _quiet_warnings(warnings: list[str]) -> str:
    return "".join(f"; warning: {warning}" for warning in warnings)


def quiet_fold_line(report: FoldReport) -> str:
    if report.dry_run:
        where = "dry run"
    elif report.written:
        where = str(report.output)
    else:
        where = "in memory" if report.output is None else "not written"
    culprits = ""
    if report.attribution and report.attribution.guilty:
        culprits = "; broken by " + ", ".join(
            f"{'+'.join(g.batchnorms)} → {'+'.join(g.targets)}" for g in report.attribution.guilty
        )
    removed = len(report.overridable_inputs_removed)
    inputs = f"; {removed} overridable initializer{'s' * (removed != 1)} removed from the inputs" if removed else ""
    return (
        f"{_name(report.input, '<model>')} → {where}: folded {report.batchnorms_folded} of {report.batchnorms_total} "
        f"BatchNormalization{_affines(report)}{_merges(report)}, {report.status}"
        f"{_worst_error(report.verification)}{inputs}{culprits}{_quiet_warnings(report.warnings)}"
    )


def quiet_check_line(report: CheckReport) -> str:
    original, folded = _name(report.original, "<original>"), _name(report.folded, "<folded>")
    return f"{original} vs {folded}: {report.status}{_worst_error(report.verification)}{_quiet_warnings(report.warnings)}"


def _error_message(result: ModelResult) -> str:
    """The model's error without its path, which the row already shows."""
    return (result.error or "").removeprefix(f"{result.input}: ")


def _status_cell(result: ModelResult) -> Text:
    label = f"error (exit {result.exit_code})" if result.report is None else result.status
    return Text(label, style=STATUS_STYLE[result.status])


def _change(before: str, after: str) -> str:
    return f"{before}→{after}"


def _size_change(before: int | None, after: int | None) -> str:
    """The new size and its change in percent: narrow enough for an 80-column table."""
    if not before or after is None:
        return _size(after)
    return f"{_size(after)} ({(after - before) / before:+.0%})"


def _batchnorm_counts(folded: int, total: int, affines: int) -> str:
    return f"{folded}/{total}" + (f" +{affines}" if affines else "")


def batch_table(report: BatchReport) -> Group:
    """One row per model in input order, then the totals (time: wall clock of the whole run).

    "BNs" is BatchNormalization nodes folded/present, then "+N" decomposed affines folded.
    """
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    longest_name = max((len(printable(str(result.input))) for result in report.results), default=16)
    table.add_column("model", overflow="fold", min_width=min(max(longest_name, 16), 24))
    for column in ("BNs", "nodes", "size", "status", "max |Δ|", "time"):
        table.add_column(column, justify="left" if column == "status" else "right", no_wrap=True)
    for result in report.results:
        seconds = f"{result.seconds:.2f}s"
        if result.report is None:
            model = Text.assemble(printable(str(result.input)), "\n", (printable(_error_message(result)), "red"))
            table.add_row(model, "-", "-", "-", _status_cell(result), "-", seconds)
            continue
        folded = result.report
        table.add_row(
            Text(printable(str(result.input))),
            _batchnorm_counts(folded.batchnorms_folded, folded.batchnorms_total, folded.affines_folded),
            _change(f"{folded.before.nodes:,}", f"{folded.after.nodes:,}"),
            _size_change(folded.before.file_bytes, folded.after.file_bytes),
            _status_cell(result), _measured(result.max_abs_error), seconds,
        )
    totals = report.totals()
    table.add_section()
    table.add_row(
        f"total ({totals.models} models)",
        _batchnorm_counts(totals.batchnorms_folded, totals.batchnorms, totals.affines_folded),
        _change(f"{totals.nodes_before:,}", f"{totals.nodes_after:,}"),
        _size_change(totals.file_bytes_before, totals.file_bytes_after),
        _statuses(totals.statuses, "\n"), _measured(totals.max_abs_error), f"{totals.seconds:.2f}s",
    )
    return _titled(f"Folded {len(report.results)} models (-j {report.jobs})", table)


def _statuses(counts: dict[str, int], separator: str = ", ") -> str:
    return separator.join(f"{count} {status}" for status, count in sorted(counts.items()))


def quiet_batch_lines(report: BatchReport) -> str:
    """One ``--quiet`` line per model (errors with their exit code), then the totals."""
    lines = [
        quiet_fold_line(result.report) if result.report
        else f"{result.input}: error (exit {result.exit_code}): {_error_message(result)}"
        for result in report.results
    ]
    totals = report.totals()
    lines.append(
        f"{totals.models} models: {_statuses(totals.statuses)}; folded {totals.batchnorms_folded} of "
        f"{totals.batchnorms} BatchNormalization in {totals.seconds:.2f}s"
    )
    return "\n".join(lines)


def rehearse_batch_row(report: FoldReport) -> None:
    """Render everything a batch run shows of one model (its table row, quiet line and JSON)
    to nowhere, as :attr:`~bnfold.pipeline.FoldOptions.before_commit`: a model whose report
    cannot be shown fails (an internal error in its row) before its output is moved into place."""
    label = report.input if report.input is not None else Path("<model>")
    alone = BatchReport([ModelResult(label, report, None, report.exit_code, 0.0)], jobs=1, seconds=0.0)
    Console(file=io.StringIO(), width=100).print(batch_table(alone))
    quiet_batch_lines(alone)
    dump_json(alone.to_dict())


@contextlib.contextmanager
def batch_progress(total: int, *, quiet: bool) -> Iterator[Callable[[ModelResult], None]]:
    """A progress bar on stderr, shown only on a terminal and without ``--quiet``.

    Yields the callback that advances it as each model finishes.
    """
    console = Console(stderr=True)
    # The file name is shown as it is (markup=False): a name like "[bold]x.onnx" is not markup.
    with Progress(*Progress.get_default_columns(), TextColumn("{task.fields[last]}", markup=False), console=console,
                  disable=quiet or not console.is_terminal, transient=True) as progress:
        task = progress.add_task("folding", total=total, last="")
        yield lambda result: progress.update(task, advance=1, last=printable(str(result.input)))


STATUS_AFTER_SECONDS = 0.5
"""A run shorter than this shows no status: a line flashing past is noise, not news."""
_STAGES = {
    "load": "loading",
    "fold": "folding",
    "save": "writing",
    "verify": "verifying in onnxruntime",
    "bodies": "extracting the If/Loop/Scan bodies that hold folds",
    "attribution": "finding the fold that broke equivalence",
}


class _RunStatus:
    """The status line of one model's run: what stage it is in, how big, for how long.

    Empty until the run has taken :data:`STATUS_AFTER_SECONDS`; rich redraws it a few times
    a second, so it appears by itself once the run proves slow.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = time.monotonic()
        self.stage = ""
        self.spinner = Spinner("dots")

    def update(self, stage: str, size: int | None) -> None:
        self.stage = _STAGES.get(stage, stage) + (f" ({_size(size)})" if size else "")

    def __rich__(self) -> RenderableType:
        elapsed = time.monotonic() - self.started
        if elapsed < STATUS_AFTER_SECONDS or not self.stage:
            return Text("")
        self.spinner.update(text=Text.assemble(self.name, f": {self.stage} · {elapsed:.0f}s"))
        return self.spinner


@contextlib.contextmanager
def run_status(name: str, *, quiet: bool) -> Iterator[Callable[[str, int | None], None]]:
    """A transient status line on stderr while one model (or one comparison) runs, shown only
    on a terminal, without ``--quiet``, and once the run takes more than a moment; it is
    erased when the run ends, so a log never holds it.

    Yields the progress callback the pipeline calls at each stage (load → fold → save → verify).
    """
    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        yield lambda _stage, _size: None
        return
    status = _RunStatus(name)
    with Live(status, console=console, transient=True, refresh_per_second=8,
              redirect_stdout=False, redirect_stderr=False):
        yield status.update
