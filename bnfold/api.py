"""The Python API: ``bnfold.fold()`` and ``bnfold.check()``, over the engine the command runs.

Scripts and notebooks hold models in memory (``onnx.load``, an exporter's result) and
expect one call, as with ``onnxsim.simplify(model)``::

    import bnfold
    result = bnfold.fold(model)                  # an onnx.ModelProto or a path
    result.model                                 # the folded ModelProto (input untouched)
    result.report.passed, result.report.to_dict()

The command is a thin layer over these functions: the same options (``--input-shape``
is ``input_shapes=``, ``--tol`` is ``tol=``…), the same checks and the same reports. A
model given in memory is written to a scratch folder, folded and verified there exactly
like a file (the folded model is read back from what was verified), and the folder is
removed before the call returns; errors name it ``<model>`` (``<original>``/``<folded>``
for a check) instead of the scratch path.

Errors are the command's, raised: :class:`~bnfold.errors.InputError` (a bad model or
option, exit 2 in the command), :class:`~bnfold.errors.RuntimeFailure` (onnxruntime
cannot run the model, exit 3), and :class:`~bnfold.errors.NotEquivalent` (exit 1) only
with ``raise_on_mismatch=True``: otherwise a failed verification is a result
(``report.passed`` is False), as it is for the command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnx

from bnfold.errors import BnfoldError, InputError, NotEquivalent
from bnfold.io.load import PROTOBUF_LIMIT
from bnfold.io.store import all_tensors
from bnfold.options import Tolerances, VerifyOptions
from bnfold.pipeline import CheckReport, FoldOptions, FoldReport, Progress, check_files, fold_file
from bnfold.selection import Selection

ModelSource = Union[onnx.ModelProto, str, "os.PathLike[str]"]
"""A model in memory, or the path of a model file."""
InputValues = Union[Mapping[str, np.ndarray], str, "os.PathLike[str]", None]
"""Real inputs: arrays by input name, an ``.npz`` file, or a folder in the ONNX test layout."""
Patterns = Union[str, Iterable[str]]
"""One shell-style pattern, or several."""


@dataclass
class FoldResult:
    """What :func:`fold` returns: the run's report and the folded model."""

    report: FoldReport
    """The run's report: ``passed``, ``status``, ``folds``, ``left``, ``to_dict()``…"""
    _model: onnx.ModelProto | None = field(default=None, repr=False)

    @property
    def model(self) -> onnx.ModelProto | None:
        """The folded model. Without ``output`` it is the model that was verified, read back;
        with ``output`` it is read from that file on first use. None when nothing was
        written (``dry_run``, or a fold that was not equivalent without ``keep_failed``)."""
        if self._model is None and self.report.written and self.report.output is not None:
            self._model = onnx.load_model(os.fspath(self.report.output))
        return self._model


def verify_options(
    *,
    inputs: str | os.PathLike[str] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int | None = None,
    seed: int = 0,
    trials: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    tol: Mapping[str, tuple[float, float]] | None = None,
    provider: str = "CPUExecutionProvider",
) -> VerifyOptions:
    """How two models are compared, from the options of ``bnfold fold`` and ``bnfold check``.

    Raises:
        InputError: for a negative or non-finite tolerance.
    """
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        _require_tolerance(name, value)
    for output, pair in (tol or {}).items():
        for value in pair:
            _require_tolerance(f"--tol {output}", value)
    return VerifyOptions(
        shapes={name: tuple(int(d) for d in dims) for name, dims in (input_shapes or {}).items()},
        batch=batch, seed=seed, trials=trials,
        inputs=None if inputs is None else Path(inputs),
        tolerances=Tolerances(atol, rtol, dict(tol or {})),
        provider=provider,
    )


def _require_tolerance(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise InputError(f"{name}: a tolerance is a finite number >= 0, got {value}")


def fold_options(
    comparison: VerifyOptions,
    *,
    output: str | os.PathLike[str] | None = None,
    verify: bool = True,
    skip: Patterns = (),
    only: Patterns = (),
    exact_padding: bool = False,
    keep_overridable: bool = False,
    dry_run: bool = False,
    in_place: bool = False,
    keep_failed: bool = False,
    report_file: str | os.PathLike[str] | None = None,
    before_commit: Callable[[FoldReport], None] | None = None,
) -> FoldOptions:
    """The options of one fold (those of ``bnfold fold``), verified as ``comparison`` says.
    ``report_file`` is where the caller will write the report (``--json``): refused, before
    any work, when it is a file the run reads or writes. ``before_commit`` sees the finished
    report before the output is moved into place (:attr:`FoldOptions.before_commit`)."""
    return FoldOptions(
        output=None if output is None else Path(output),
        in_place=in_place, verify=verify, dry_run=dry_run, keep_failed=keep_failed,
        exact_padding=exact_padding, keep_overridable=keep_overridable,
        selection=Selection(_patterns(skip, "skip"), _patterns(only, "only")),
        verify_options=comparison,
        report=None if report_file is None else Path(report_file),
        before_commit=before_commit,
    )


def _patterns(patterns: Patterns, option: str) -> tuple[str, ...]:
    """One pattern or several (a lone string is one pattern, not its characters)."""
    found = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    if not all(isinstance(pattern, str) and pattern for pattern in found):
        raise InputError(f"--{option}: patterns are non-empty strings, got {found!r}")
    return found


def fold(
    model: ModelSource,
    *,
    output: str | os.PathLike[str] | None = None,
    verify: bool = True,
    inputs: InputValues = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int | None = None,
    seed: int = 0,
    trials: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    tol: Mapping[str, tuple[float, float]] | None = None,
    provider: str = "CPUExecutionProvider",
    skip: Patterns = (),
    only: Patterns = (),
    exact_padding: bool = False,
    keep_overridable: bool = False,
    dry_run: bool = False,
    in_place: bool = False,
    keep_failed: bool = False,
    raise_on_mismatch: bool = False,
    progress: Progress | None = None,
    report_file: str | os.PathLike[str] | None = None,
    before_commit: Callable[[FoldReport], None] | None = None,
) -> FoldResult:
    """Fold every foldable BatchNormalization of ``model`` and verify the result in onnxruntime.

    ``model`` is an ``onnx.ModelProto`` (never modified) or a path. Without ``output``
    nothing is written and ``result.model`` is the folded ModelProto; with ``output`` the
    folded model is written there as ``bnfold MODEL -o OUTPUT`` writes it (only when
    equivalent, unless ``keep_failed``). The other options are the command's: ``verify``
    (``--no-verify``), ``inputs`` (``--inputs``, or arrays by input name), ``input_shapes``
    (``--input-shape``), ``batch``, ``seed``, ``trials``, ``atol``, ``rtol``, ``tol``
    (``{output: (atol, rtol)}``), ``provider``, ``skip``/``only`` (shell-style patterns on
    a BN's node or output name), ``exact_padding``, ``keep_overridable``, ``dry_run``,
    ``in_place``, ``keep_failed``. ``progress(stage, bytes)`` hears of each stage as it starts.
    ``report_file`` names a file the caller will write the report to: it is refused when it
    is one the run reads or writes. ``before_commit(report)`` is called with the finished
    report before the output is moved into place: an exception there leaves no output.

    Raises:
        InputError: unusable model, inputs or options.
        RuntimeFailure: onnxruntime cannot load or run the original model.
        NotEquivalent: the folded model differs, only with ``raise_on_mismatch=True``.
    """
    with _scratch() as scratch:
        source = scratch.model_file(model, "model")
        returns_model = output is None and not dry_run
        comparison = verify_options(
            inputs=scratch.inputs_file(inputs), input_shapes=input_shapes, batch=batch, seed=seed,
            trials=trials, atol=atol, rtol=rtol, tol=tol, provider=provider,
        )
        options = fold_options(
            comparison, output=scratch.folder / "folded.onnx" if returns_model else output,
            verify=verify, skip=skip, only=only, exact_padding=exact_padding, keep_overridable=keep_overridable,
            dry_run=dry_run, in_place=in_place, keep_failed=keep_failed or returns_model, report_file=report_file,
            before_commit=before_commit,
        )
        report = fold_file(source, options, progress=progress)
        folded = None
        if returns_model:  # the scratch file is read back, and the report never names it
            if report.written and options.output is not None:
                folded = onnx.load_model(os.fspath(options.output))
            report = dataclasses.replace(report, output=None, written=False)
        if isinstance(model, onnx.ModelProto):
            report = dataclasses.replace(report, input=None)
    if raise_on_mismatch and report.status == "not-equivalent":
        from bnfold.report import quiet_fold_line  # rich, only for this message

        raise NotEquivalent(quiet_fold_line(report), report)
    return FoldResult(report, folded)


def check(
    original: ModelSource,
    folded: ModelSource,
    *,
    inputs: InputValues = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int | None = None,
    seed: int = 0,
    trials: int = 1,
    atol: float | None = None,
    rtol: float | None = None,
    tol: Mapping[str, tuple[float, float]] | None = None,
    provider: str = "CPUExecutionProvider",
    raise_on_mismatch: bool = False,
    progress: Progress | None = None,
    report_file: str | os.PathLike[str] | None = None,
) -> CheckReport:
    """Compare two models (ModelProtos or paths) in onnxruntime, as ``bnfold check`` does.

    Outputs are matched by name; nothing is written. Options as for :func:`fold`.

    Raises:
        InputError: unusable models, inputs or options.
        RuntimeFailure: onnxruntime cannot load or run either model.
        NotEquivalent: an output differs, only with ``raise_on_mismatch=True``.
    """
    with _scratch() as scratch:
        original_path = scratch.model_file(original, "original")
        folded_path = scratch.model_file(folded, "folded")
        options = verify_options(
            inputs=scratch.inputs_file(inputs), input_shapes=input_shapes, batch=batch, seed=seed,
            trials=trials, atol=atol, rtol=rtol, tol=tol, provider=provider,
        )
        report = check_files(original_path, folded_path, options, progress=progress,
                             report=None if report_file is None else Path(report_file))
        report = dataclasses.replace(
            report,
            original=None if isinstance(original, onnx.ModelProto) else report.original,
            folded=None if isinstance(folded, onnx.ModelProto) else report.folded,
        )
    if raise_on_mismatch and not report.passed:
        from bnfold.report import quiet_check_line  # rich, only for this message

        raise NotEquivalent(quiet_check_line(report), report)
    return report


class _Scratch:
    """Files the engine needs for what was given in memory, in one temporary folder
    (created on first use), and how to name them in messages instead of their paths."""

    def __init__(self, stack: contextlib.ExitStack) -> None:
        self._stack = stack
        self._folder: Path | None = None
        self.labels: dict[str, str] = {}

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = Path(self._stack.enter_context(tempfile.TemporaryDirectory(prefix="bnfold-")))
        return self._folder

    def model_file(self, model: ModelSource, role: str) -> Path:
        """A path as given, or a ModelProto written to the scratch folder (the caller's
        object is only read: a model above protobuf's 2 GiB is converted on a copy)."""
        if isinstance(model, (str, os.PathLike)):
            return Path(model)
        if not isinstance(model, onnx.ModelProto):
            raise TypeError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")
        path = self.folder / f"{role}.onnx"
        if sum(len(tensor.raw_data) for tensor in all_tensors(model)) > PROTOBUF_LIMIT - 2**26:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, os.fspath(path), save_as_external_data=True, location=f"{role}.onnx.data")
        else:
            onnx.save_model(model, os.fspath(path))
        self.labels[str(path)] = f"<{role}>"
        return path

    def inputs_file(self, inputs: InputValues) -> Path | None:
        """A path as given, or arrays by input name written to an ``.npz`` the engine reads."""
        if inputs is None or isinstance(inputs, (str, os.PathLike)):
            return None if inputs is None else Path(inputs)
        path = self.folder / "inputs.npz"
        arrays: dict[str, Any] = {str(name): np.asarray(values) for name, values in inputs.items()}
        np.savez(path, **arrays)
        self.labels[str(path)] = "<inputs>"
        return path

    def relabel(self, message: str) -> str:
        for path, label in self.labels.items():
            message = message.replace(path, label)
        return message


@contextlib.contextmanager
def _scratch() -> Iterator[_Scratch]:
    """A :class:`_Scratch` removed on exit; errors name its files by their labels."""
    with contextlib.ExitStack() as stack:
        scratch = _Scratch(stack)
        try:
            yield scratch
        except BnfoldError as error:
            error.args = (scratch.relabel(str(error)), *error.args[1:])
            raise
