"""Showing what a run did: rich tables for people, JSON for machines, one line for --quiet.

The JSON report carries the same facts as the tables (schema documented in the
README); non-finite floats are written as the strings "inf"/"nan" so the file is
strict JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.progress import Progress, TextColumn
from rich.table import Table
from rich.text import Text

from bnfold.attribution import Attribution
from bnfold.batch import BatchReport, ModelResult
from bnfold.pipeline import CheckReport, FoldReport, ModelStats
from bnfold.verify import OutputComparison, Verification

FOLD_SCHEMA = "bnfold.fold/1"
CHECK_SCHEMA = "bnfold.check/1"
BATCH_SCHEMA = "bnfold.batch/1"
STATUS_STYLE = {"equivalent": "bold green", "not-equivalent": "bold red", "unverified": "bold yellow",
                "error": "bold red"}


# -- JSON ---------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """Dataclasses, paths, tuples and floats as strict-JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _verification_json(verification: Verification | None) -> dict[str, Any] | None:
    if verification is None:
        return None
    document = _plain(verification)
    document["passed"] = verification.passed
    for key in ("outputs", "expected"):
        for output, comparison in zip(document[key], getattr(verification, key)):
            output["passed"] = comparison.passed
    return document


def fold_report_json(report: FoldReport) -> dict[str, Any]:
    document = {"schema": FOLD_SCHEMA, **_plain(report)}
    document.update(
        status=report.status,
        exit_code=report.exit_code,
        verification=_verification_json(report.verification),
    )
    return document


def check_report_json(report: CheckReport) -> dict[str, Any]:
    document = {"schema": CHECK_SCHEMA, **_plain(report)}
    document.update(
        status=report.status, exit_code=report.exit_code, verification=_verification_json(report.verification)
    )
    return document


def batch_report_json(report: BatchReport) -> dict[str, Any]:
    """Every model's full ``bnfold.fold/1`` report (null for a model that failed) and the totals."""
    models = [
        {"input": str(result.input), "status": result.status, "exit_code": result.exit_code,
         "error": result.error, "seconds": result.seconds,
         "report": fold_report_json(result.report) if result.report else None}
        for result in report.results
    ]
    return {"schema": BATCH_SCHEMA, "exit_code": report.exit_code, "jobs": report.jobs, "models": models,
            "totals": _plain(report.totals())}


def dump_json(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, allow_nan=False)


# -- human output -------------------------------------------------------------------------------


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


def stats_table(before: ModelStats, after: ModelStats, titles: tuple[str, str] = ("before", "after")) -> Table:
    table = Table(box=box.SIMPLE_HEAD, title="Before / after", title_justify="left")
    table.add_column("")
    table.add_column(titles[0], justify="right")
    table.add_column(titles[1], justify="right")
    table.add_column("Δ", justify="right")
    for op in sorted(set(before.op_counts) | set(after.op_counts)):
        b, a = before.op_counts.get(op, 0), after.op_counts.get(op, 0)
        table.add_row(op, str(b), str(a), _delta(b, a))
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
    return table


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
    seeds = [t.seed for t in verification.trials if t.seed is not None]
    if len(verification.trials) == 1:
        source = f"seed {first.seed}" if first.seed is not None else f"from {first.label}"
    elif seeds:
        source = f"{len(seeds)} trials, seeds {seeds[0]}..{seeds[-1]} (worst trial per output)"
    else:
        source = f"{len(verification.trials)} data sets (worst per output)"
    return f"inputs {shapes}, {source}"


def _guessed_lines(verification: Verification) -> str:
    """One line per input whose sizes were guessed: what was used and why."""
    return "".join(
        f"\nguessed {guess.input} [{','.join(map(str, guess.shape))}]: {guess.reason} (--input-shape gives exact sizes)"
        for guess in verification.guessed_sizes
    )


def _comparison_table(title: str, comparisons: list[OutputComparison], with_trial: bool) -> Group:
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False)
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
            f"{output.name}\n{_shape(output.dtype, output.shape)}",
            *([output.trial] if with_trial else []),
            *cells,
        )
        if output.problem:
            problems.append(Text(f"{output.name}: {output.problem}", style="red"))
    return Group(table, *problems)


def verification_table(verification: Verification) -> Group:
    """One row per output; outputs that could not be compared are explained below.

    Expected outputs shipped with real inputs get a second table (folded vs expected).
    """
    several = len(verification.trials) > 1
    parts = [
        _comparison_table(
            f"Verification: onnxruntime {verification.provider}, graph optimizations off\n"
            f"{_inputs_line(verification)}{_guessed_lines(verification)}",
            verification.outputs,
            several,
        )
    ]
    if verification.expected:
        parts.append(_comparison_table("Folded vs expected outputs", verification.expected, True))
    return Group(*parts)


def attribution_table(attribution: Attribution) -> Table:
    """The fold(s) that break equivalence on their own, found by re-applying folds in groups."""
    table = Table(
        box=box.SIMPLE_HEAD,
        title=f"Broken by ({attribution.verifications} partial folds verified)",
        title_justify="left",
    )
    for column in ("BatchNormalization", "into", "rule", "output", "max |Δ|", "max rel", "out of tol"):
        table.add_column(column, justify="right" if column.startswith(("max", "out")) else "left")
    for guilty in attribution.guilty:
        table.add_row(
            "\n".join(guilty.batchnorms), "\n".join(guilty.targets), "\n".join(guilty.rules), guilty.output,
            _fmt(guilty.max_abs_error), _fmt(guilty.max_rel_error), f"{guilty.mismatches:,}",
        )
    return table


def _headline(source: str, target: str, status: str) -> Text:
    line = Text.assemble(("bnfold ", "bold"), source, " → ", target, "  ")
    line.append(status, style=STATUS_STYLE[status])
    return line


NAMES_SHOWN = 5
"""Names listed in a one-line summary of many (the JSON report has them all)."""


def _some_names(names: list[str]) -> str:
    """``'a', 'b', 'c'``, or the first few of them ``and 12 more``."""
    shown = ", ".join(f"'{name}'" for name in names[:NAMES_SHOWN])
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


def render_fold_report(report: FoldReport) -> Group:
    """The full human summary of one fold run."""
    if report.dry_run:
        target = "(dry run, nothing written)"
    elif report.written:
        target = str(report.output)
    else:
        target = f"{report.output} (not written)"
    parts: list[Any] = [_headline(str(report.input), target, report.status), ""]
    parts.append(stats_table(report.before, report.after))
    folds = Table(box=box.SIMPLE_HEAD, title=f"Folded ({len(report.folds)})", title_justify="left")
    for column in ("folded", "into", "rule", "max rel Δw", "rounding", "notes"):
        folds.add_column(column, justify="right" if column in ("max rel Δw", "rounding") else "left")
    for fold in report.folds:
        # A decomposed BN (e.g. Mul+Add) is named by its first node: say what it was.
        folded = fold.batchnorm if fold.kind == "BatchNormalization" else f"{fold.batchnorm} ({fold.kind})"
        folds.add_row(folded, fold.target, fold.rule, _measured(fold.max_relative_weight_change),
                      _measured(fold.max_rounding_error), "; ".join(fold.notes))
    parts.append(folds)
    if report.overridable_inputs_removed:
        parts.append(overridable_line(report.overridable_inputs_removed))
    if report.inlined_functions:
        parts.append(inlined_line(report.inlined_functions))
    if report.left:
        left = Table(box=box.SIMPLE_HEAD, title=f"Left in place ({len(report.left)})", title_justify="left")
        left.add_column("BatchNormalization")
        left.add_column("reason")
        for record in report.left:
            left.add_row(record.batchnorm, record.reason)
        parts.append(left)
    if report.problem:
        parts.append(Text(f"Problem: {report.problem}", style="red"))
    if report.verification:
        parts.append(verification_table(report.verification))
    else:
        parts.append(Text("Verification skipped (--no-verify).", style="yellow"))
    if report.attribution:
        parts.append(attribution_table(report.attribution))
    parts.append(Text("Timings: " + " · ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()), style="dim"))
    return Group(*parts)


def render_check_report(report: CheckReport) -> Group:
    return Group(
        _headline(str(report.original), str(report.folded), report.status),
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


def quiet_fold_line(report: FoldReport) -> str:
    where = "dry run" if report.dry_run else (str(report.output) if report.written else "not written")
    culprits = ""
    if report.attribution and report.attribution.guilty:
        culprits = "; broken by " + ", ".join(
            f"{'+'.join(g.batchnorms)} → {'+'.join(g.targets)}" for g in report.attribution.guilty
        )
    removed = len(report.overridable_inputs_removed)
    inputs = f"; {removed} overridable initializer{'s' * (removed != 1)} removed from the inputs" if removed else ""
    return (
        f"{report.input} → {where}: folded {report.batchnorms_folded} of {report.batchnorms_total} "
        f"BatchNormalization{_affines(report)}, {report.status}{_worst_error(report.verification)}{inputs}{culprits}"
    )


def quiet_check_line(report: CheckReport) -> str:
    return f"{report.original} vs {report.folded}: {report.status}{_worst_error(report.verification)}"


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


def batch_table(report: BatchReport) -> Table:
    """One row per model in input order, then the totals (time: wall clock of the whole run).

    "BNs" is BatchNormalization nodes folded/present, then "+N" decomposed affines folded.
    """
    table = Table(box=box.SIMPLE_HEAD, title=f"Folded {len(report.results)} models (-j {report.jobs})",
                  title_justify="left", pad_edge=False)
    longest_name = max((len(str(result.input)) for result in report.results), default=16)
    table.add_column("model", overflow="fold", min_width=min(max(longest_name, 16), 24))
    for column in ("BNs", "nodes", "size", "status", "max |Δ|", "time"):
        table.add_column(column, justify="left" if column == "status" else "right", no_wrap=True)
    for result in report.results:
        seconds = f"{result.seconds:.2f}s"
        if result.report is None:
            model = Text.assemble(str(result.input), "\n", (_error_message(result), "red"))
            table.add_row(model, "-", "-", "-", _status_cell(result), "-", seconds)
            continue
        folded = result.report
        table.add_row(
            str(result.input),
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
    return table


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


@contextlib.contextmanager
def batch_progress(total: int, *, quiet: bool) -> Iterator[Callable[[ModelResult], None]]:
    """A progress bar on stderr, shown only on a terminal and without ``--quiet``.

    Yields the callback that advances it as each model finishes.
    """
    console = Console(stderr=True)
    with Progress(*Progress.get_default_columns(), TextColumn("{task.fields[last]}"), console=console,
                  disable=quiet or not console.is_terminal, transient=True) as progress:
        task = progress.add_task("folding", total=total, last="")
        yield lambda result: progress.update(task, advance=1, last=str(result.input))
