"""Folding many models in one run: find them, fold each, collect one report.

Each model is an ordinary :func:`bnfold.pipeline.fold_file` run. A model that
cannot be folded (unreadable, not ONNX, failing the checker, onnxruntime unable
to run it) becomes an error record with its one-line message and exit code, and
the other models carry on. The run's exit code is the worst over all models,
ordered ``4 > 3 > 2 > 1 > 0``: the numerically largest, the order ``bnfold-precommit``
uses, so a batch run and the hook exit alike on the same files. Any failure
outranks success, and a model that could not be folded or verified at all (2 bad
input, 3 onnxruntime cannot run it) outranks one verified and found different
(1): the run then vouches for fewer models than it was given.

With ``jobs > 1`` models are folded in worker processes, one model at a time each;
everything a worker returns is picklable, and results are reported in input order
whatever order they finish in. A worker that dies hard (a segfault in a native
library, the out-of-memory killer) costs only the model it held: that model's row is
an internal error (exit 4), its staging folder is removed by the parent, and a fresh
worker takes the next model. Ctrl-C stops the workers through SIGTERM, which each
worker turns into an exception so the staging folder of the model it was writing is
removed before it exits: no partial output is ever left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from bnfold.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, BnfoldError, internal_error_message
from bnfold.inputs import check_option_values, files_read_by_inputs
from bnfold.io.load import external_data_locations
from bnfold.io.paths import RunFiles, resolved
from bnfold.io.save import FOLDED_SUFFIX, STAGING_PREFIX, default_output_path, remove_staging_of
from bnfold.pipeline import FoldOptions, FoldReport, fold_file
from bnfold.schema import BATCH_SCHEMA, plain


def _is_model_file(path: Path, folder: Path) -> bool:
    """A ``*.onnx`` file that is not bnfold's own output or inside a staging folder."""
    hidden = any(part.startswith(STAGING_PREFIX) for part in path.relative_to(folder).parts)
    return path.is_file() and not path.name.endswith(FOLDED_SUFFIX) and not hidden


def find_models(paths: Sequence[Path]) -> list[Path]:
    """The models to fold, in argument order; folders searched recursively (sorted).

    Files named on the command line are kept whatever their name (a missing or
    broken one is reported like any bad model). Folders contribute their
    ``*.onnx`` files except bnfold's outputs (``*.folded.onnx``) and hidden
    staging folders (``.bnfold-*``); a folder without any stays in the list as
    itself so it is reported rather than silently skipped. A file reached twice
    is folded once.
    """
    models: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        found = [p for p in sorted(path.rglob("*.onnx")) if _is_model_file(p, path)] if path.is_dir() else []
        for model in found or [path]:
            if resolved(model) not in seen:
                seen.add(resolved(model))
                models.append(model)
    return models


def output_in(folder: Path, model: Path) -> Path:
    """Where ``--output-dir`` puts a model: ``FOLDER/<name>.folded.onnx``."""
    return folder / default_output_path(model).name


def check_batch_files(models: Sequence[Path], per_model: Sequence[FoldOptions], options: FoldOptions) -> None:
    """Refuse, before any model is folded, a batch where some written path (an output, its
    data file, the ``--json`` report) is a file that any model of the batch reads (a model,
    its external data, ``--inputs``) or that another output also writes: folding in order
    would otherwise overwrite a model before its turn, or keep one of two results.

    A file that cannot even be parsed is still read (so nothing may overwrite it) but writes
    nothing: it will fail on its own.
    """
    files = RunFiles()
    for model, model_options in zip(models, per_model):
        if not model.is_file():
            continue
        locations = external_data_locations(model)
        files.read_model(model, locations or ())
        if locations is not None and not options.dry_run:
            files.write_output(model, model_options.output or default_output_path(model), in_place=options.in_place)
    files.read_inputs(files_read_by_inputs(options.verify_options.inputs))
    if options.report is not None:
        files.write_report(options.report)
    files.check()


@dataclass(frozen=True)
class ModelResult:
    """One model of a batch: its fold report, or the error that stopped it."""

    input: Path
    report: FoldReport | None
    error: str | None
    exit_code: int
    seconds: float

    @property
    def status(self) -> str:
        return "error" if self.report is None else self.report.status

    @property
    def max_abs_error(self) -> float | None:
        verification = self.report.verification if self.report else None
        return verification.max_abs_error if verification else None


@dataclass(frozen=True)
class BatchTotals:
    """The totals row: sums over the models that were folded (errors have nothing to add)."""

    models: int
    statuses: dict[str, int]
    batchnorms_folded: int
    batchnorms: int
    affines_folded: int
    """Decomposed BN forms (per-channel Mul/Add chains) folded."""
    nodes_before: int
    nodes_after: int
    file_bytes_before: int
    file_bytes_after: int
    max_abs_error: float | None
    seconds: float
    """Wall-clock time of the run."""


@dataclass
class BatchReport:
    """Every model's result, in the order the models were given."""

    results: list[ModelResult]
    jobs: int
    seconds: float
    """Wall-clock time of the whole run (less than the sum of the models' with several jobs)."""

    @property
    def exit_code(self) -> int:
        """The worst outcome over all models: 4 > 3 > 2 > 1 > 0 (see the module docstring)."""
        return max((result.exit_code for result in self.results), default=EXIT_OK)

    def totals(self) -> BatchTotals:
        reports = [result.report for result in self.results if result.report is not None]
        return BatchTotals(
            models=len(self.results),
            statuses=dict(Counter(result.status for result in self.results)),
            batchnorms_folded=sum(report.batchnorms_folded for report in reports),
            batchnorms=sum(report.batchnorms_total for report in reports),
            affines_folded=sum(report.affines_folded for report in reports),
            nodes_before=sum(report.before.nodes for report in reports),
            nodes_after=sum(report.after.nodes for report in reports),
            file_bytes_before=sum(report.before.file_bytes or 0 for report in reports),
            file_bytes_after=sum(report.after.file_bytes or 0 for report in reports),
            max_abs_error=max((r.max_abs_error for r in self.results if r.max_abs_error is not None), default=None),
            seconds=self.seconds,
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``bnfold.batch/1`` document: every model's full ``bnfold.fold/1`` report
        (null for a model that failed, whose ``error`` says why) and the totals."""
        models = [
            {"input": str(result.input), "status": result.status, "exit_code": result.exit_code,
             "error": result.error, "seconds": result.seconds,
             "report": result.report.to_dict() if result.report else None}
            for result in self.results
        ]
        return {"schema": BATCH_SCHEMA, "exit_code": self.exit_code, "jobs": self.jobs, "models": models,
                "totals": plain(self.totals())}


def fold_one(model: Path, options: FoldOptions) -> ModelResult:
    """Fold one model of a batch; bnfold's errors become the model's error record."""
    start = time.perf_counter()
    try:
        report = fold_file(model, options)
    except BnfoldError as error:
        return ModelResult(model, None, str(error), error.exit_code, time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 - one model's bug must not stop the others
        return ModelResult(model, None, internal_error_message(error), EXIT_INTERNAL, time.perf_counter() - start)
    return ModelResult(model, report, None, report.exit_code, time.perf_counter() - start)


class _Stopped(SystemExit):
    """Raised in a worker by SIGTERM. A SystemExit, so an idle worker exits without a traceback."""


def _stop_on_sigterm(_signal: int, _frame: FrameType | None) -> None:
    raise _Stopped(EXIT_INTERRUPTED)


def _start_worker(parent: int) -> None:
    """Ctrl-C reaches every process of the terminal's group: workers leave it to the
    parent, which stops them with SIGTERM, raised here as an exception so cleanup runs.

    A parent killed outright (SIGKILL, or the out-of-memory killer) cannot stop them: on
    Linux the system then sends them SIGTERM itself, so that no worker goes on folding,
    and writing outputs, for a run that has ended.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before that took effect
            os._exit(EXIT_INTERRUPTED)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _fold_in_worker(model: Path, options: FoldOptions) -> ModelResult:
    try:
        return fold_one(model, options)
    except _Stopped:
        # The staging folder is gone (``finally`` ran); exit now rather than take the next queued model.
        os._exit(EXIT_INTERRUPTED)


def _serve(connection: Connection, parent: int) -> None:
    """A worker's life: fold the models the parent sends, one at a time, until it sends None.

    What escapes a model's fold (:func:`fold_one` turns every ``Exception`` into the model's
    result; a KeyboardInterrupt or SystemExit is left) goes to the parent, which raises it.
    """
    _start_worker(parent)
    while (task := connection.recv()) is not None:
        index, model, options = task
        try:
            outcome: ModelResult | BaseException = _fold_in_worker(model, options)
        except BaseException as escaped:  # noqa: BLE001 - handed to the parent, which raises it
            outcome = escaped
        connection.send((index, outcome))
        if isinstance(outcome, BaseException):
            return


@dataclass
class _Worker:
    """A worker process, the parent's end of its pipe, and the model it is folding."""

    process: BaseProcess
    connection: Connection
    task: int | None = None
    started: float = 0.0


def _start(context: BaseContext) -> _Worker:
    """A worker process waiting for its first model at the other end of a pipe."""
    parent_end, worker_end = context.Pipe()
    process = context.Process(target=_serve, args=(worker_end, os.getpid()), daemon=True)  # type: ignore[attr-defined]
    process.start()
    worker_end.close()
    return _Worker(process, parent_end)


def _death(process: BaseProcess) -> str:
    """How a worker process ended, in words: 'killed by SIGKILL', 'exited with code 1'."""
    process.join()
    code = process.exitcode or 0
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _dead_worker_result(worker: _Worker, model: Path, options: FoldOptions) -> ModelResult:
    """The error row of a model whose worker died hard, after removing what it was staging.

    A segfault in a native library or the out-of-memory killer ends the process without any
    cleanup: its staging folders (beside the output, or in the temporary folder for a dry run)
    are removed here. Nothing was committed: that happens last, after verification.
    """
    how = _death(worker.process)
    output = options.output or default_output_path(model)
    for folder in (output.parent, Path(tempfile.gettempdir())):
        remove_staging_of(worker.process.pid or 0, folder)
    message = (f"internal error (the worker process folding it died: {how}; a crash in a native library, "
               "or killed for memory); nothing was written")
    return ModelResult(model, None, message, EXIT_INTERNAL, time.perf_counter() - worker.started)


def _stop_workers(workers: Sequence[_Worker]) -> None:
    """Stop every worker, waiting until their cleanup is done (SIGTERM: see the module docstring)."""
    for worker in workers:
        if worker.process.is_alive():
            worker.process.terminate()
    for worker in workers:
        worker.process.join()


def fold_models(
    models: Sequence[Path],
    options: FoldOptions,
    *,
    output_dir: Path | None = None,
    jobs: int = 1,
    on_result: Callable[[ModelResult], None] | None = None,
) -> BatchReport:
    """Fold every model with the same options; ``on_result`` hears of each as it finishes.

    ``options.output`` is ignored: each model gets its own output, beside it or in
    ``output_dir``. ``jobs == 1`` folds in this process.

    Raises:
        InputError: before any work, when a path the batch writes is one it reads or
            writes twice (:func:`check_batch_files`).
    """
    per_model = [
        dataclasses.replace(options, output=output_in(output_dir, model) if output_dir else None) for model in models
    ]
    check_option_values(options.verify_options)
    check_batch_files(models, per_model, options)
    notify = on_result or (lambda _result: None)
    start = time.perf_counter()
    if jobs == 1 or len(models) <= 1:
        results = []
        for model, model_options in zip(models, per_model):
            results.append(fold_one(model, model_options))
            notify(results[-1])
    else:
        results = _fold_in_workers(models, per_model, jobs, notify)
    return BatchReport(results=results, jobs=jobs, seconds=time.perf_counter() - start)


def _fold_in_workers(
    models: Sequence[Path], per_model: Sequence[FoldOptions], jobs: int, notify: Callable[[ModelResult], None]
) -> list[ModelResult]:
    """Fold the models in ``jobs`` worker processes, each told one model at a time.

    The parent knows which model every worker holds, so a worker that dies hard costs only
    that model (its error row, exit 4): a fresh worker takes its place and the run goes on.
    """
    context = multiprocessing.get_context()
    queued = deque(range(len(models)))
    results: list[ModelResult | None] = [None] * len(models)
    workers: list[_Worker] = []

    def give_work(position: int) -> None:
        """Send the next queued model to the worker at ``position`` (a fresh one if it died idle)."""
        worker = workers[position]
        worker.task = queued.popleft() if queued else None
        if worker.task is None:
            return
        task = (worker.task, models[worker.task], per_model[worker.task])
        try:
            worker.connection.send(task)
        except OSError:  # it died between two models
            worker.process.join()
            workers[position] = _start(context)
            workers[position].task = worker.task
            workers[position].connection.send(task)
        workers[position].started = time.perf_counter()

    try:
        for position in range(min(jobs, len(models))):
            workers.append(_start(context))
            give_work(position)
        while busy := [position for position, worker in enumerate(workers) if worker.task is not None]:
            wait([workers[p].connection for p in busy] + [workers[p].process.sentinel for p in busy])
            for position in busy:
                worker = workers[position]
                result = None
                with contextlib.suppress(EOFError, OSError):  # it died while sending: as if before
                    if worker.connection.poll():
                        _index, result = worker.connection.recv()
                if result is None and worker.process.is_alive():
                    continue
                if isinstance(result, BaseException):
                    raise result
                index = worker.task
                if index is None:  # busy workers have a task: only a changed loop gets here
                    continue
                if result is None:
                    result = _dead_worker_result(worker, models[index], per_model[index])
                    workers[position] = _start(context)
                results[index] = result
                notify(result)
                give_work(position)
    except BaseException:
        _stop_workers(workers)
        raise
    for worker in workers:
        with contextlib.suppress(OSError):
            worker.connection.send(None)
        worker.process.join()
    return [result for result in results if result is not None]
