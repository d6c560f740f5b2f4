"""One run of bnfold on one model: load → fold → stage → verify → commit, with a report.

The folded model is written to a hidden staging folder first and verified *as
written* (onnxruntime loads the staged file), so what is checked is exactly what
lands on disk. It is moved into place only when verification passes (or was
skipped, or ``keep_failed``); otherwise nothing is left behind. The move is the last
step: attribution and the caller's rendering of the report (``before_commit``) run
while the output is still staged, so that a failure in them leaves no output either.

Folds inside If/Loop/Scan bodies are verified on their own as well
(:mod:`bnfold.bodies`), since a trial need not execute them. A body that cannot
be is decided before anything is written: the model is folded again from the
file without that body's folds, which are reported as left with the reason.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from bnfold.bodies import BodyChecks, BodyLayout, prepare_body_checks
from bnfold.errors import EXIT_NOT_EQUIVALENT, EXIT_OK, InputError
from bnfold.fold import FoldOutcome, FoldRecord, LeftRecord, MergeRecord, fold_batchnorms
from bnfold.inputs import (
    SET_TO_ONE,
    GuessedSize,
    Trial,
    check_option_values,
    explaining_guessed_shapes,
    files_read_by_inputs,
    fixed_size,
    guessed_shapes,
    prepare_trials,
    runtime_inputs,
    widened_guess,
    wider_trials,
)
from bnfold.io.load import LoadedModel, checker_complaint, load_model
from bnfold.io.paths import RunFiles, refuse_foreign_data_file, validate_output_path
from bnfold.io.save import default_output_path, stage
from bnfold.options import VerifyOptions
from bnfold.rules import RULES, RuleOptions, RuleSet
from bnfold.schema import CHECK_SCHEMA, FOLD_SCHEMA, report_document
from bnfold.selection import Selection
from bnfold.verify import Verification, check_provider, loads_in_onnxruntime, runs_on, verify_equivalence

if TYPE_CHECKING:
    from bnfold.attribution import Attribution

Progress = Callable[[str, int | None], None]
"""Told as each stage of a run starts ("load", "fold", "bodies", "save", "verify", "attribution"),
with the bytes that stage works on (None when not known yet): the command shows it as a
transient status line while one big model is folded."""


def _no_progress(_stage: str, _size: int | None) -> None:
    """The default :data:`Progress`: nobody is watching."""


@dataclass
class FoldOptions:
    output: Path | None = None
    in_place: bool = False
    verify: bool = True
    dry_run: bool = False
    keep_failed: bool = False
    exact_padding: bool = False
    """Fold a BN into a following padded Conv, adding a per-position bias to stay exact."""
    keep_overridable: bool = False
    """Refuse folds that would replace an initializer also listed as a graph input (IR 4+), for
    callers that really feed those inputs; by default they fold and leave the inputs."""
    selection: Selection = field(default_factory=Selection)
    """``--skip`` / ``--only``: BNs kept out of the fold (reported as left)."""
    verify_options: VerifyOptions = field(default_factory=VerifyOptions)
    rules: RuleSet = RULES
    """The registry's rules unless given (tests pass their own to exercise error attribution)."""
    report: Path | None = None
    """The ``--json`` file the caller will write: checked with the files the run reads and
    writes before any work, so that it can never overwrite one of them."""
    before_commit: Callable[[FoldReport], None] | None = None
    """Called with the finished report while the output is still staged. Whatever shows the
    report (the CLI renders every view of it here) runs before the output is moved into place,
    so that an error in it leaves no output behind. Module-level for ``-j`` (it is pickled)."""

    def rule_set(self) -> RuleSet:
        """The rules with the run's options applied."""
        wanted = RuleOptions(exact_padding=self.exact_padding, keep_overridable=self.keep_overridable)
        return self.rules if wanted == self.rules.options else replace(self.rules, options=wanted)


@dataclass(frozen=True)
class ModelStats:
    """What the before/after table shows for one model."""

    op_counts: dict[str, int]
    nodes: int
    parameters: int
    file_bytes: int | None

    @property
    def batchnorms(self) -> int:
        return self.op_counts.get("BatchNormalization", 0)


def model_stats(model: onnx.ModelProto, file_bytes: int | None) -> ModelStats:
    """Op counts, node count and parameter count (initializers and Constant tensors)."""
    graph = model.graph
    parameters = sum(math.prod(tensor.dims) for tensor in graph.initializer)
    for node in graph.node:
        if node.op_type == "Constant":
            parameters += sum(math.prod(a.t.dims) for a in node.attribute if a.name == "value")
    return ModelStats(
        op_counts=dict(Counter(node.op_type for node in graph.node)),
        nodes=len(graph.node),
        parameters=parameters,
        file_bytes=file_bytes,
    )


@dataclass
class FoldReport:
    """Everything a fold run found and did; rendered by :mod:`bnfold.report`."""

    input: Path | None
    """The model file (None for a model the Python API was given in memory)."""
    output: Path | None
    written: bool
    dry_run: bool
    before: ModelStats
    after: ModelStats
    folds: list[FoldRecord]
    left: list[LeftRecord]
    merges: list[MergeRecord]
    removed_initializers: list[str]
    overridable_inputs_removed: list[str]
    """Initializers also listed as graph inputs that folds replaced or removed: they are no
    longer inputs (``--keep-overridable`` refuses such folds instead)."""
    inlined_functions: list[str]
    """Model-local functions inlined so that the BNs in them, or next to their calls, could fold."""
    verification: Verification | None
    problem: str | None
    """A reason the folded model is unusable that is not a numeric mismatch."""
    attribution: Attribution | None
    """Which fold(s) broke equivalence, found when verification failed."""
    timings: dict[str, float]
    verification_skipped: str | None = None
    """Why no verification ran, when none did: ``--no-verify``, or the problem that makes the
    folded model unusable (then there is nothing to verify)."""
    warnings: list[str] = field(default_factory=list)
    """What the user should know that does not stop the fold (the input fails the checker
    for a field onnxruntime does without)."""

    @property
    def batchnorms_folded(self) -> int:
        """BatchNormalization nodes folded away (decomposed Mul/Add affines not counted, nor a BN
        folded only partly: it is still in the graph, and listed as left)."""
        return sum(fold.kind == "BatchNormalization" and not fold.partial for fold in self.folds)

    @property
    def batchnorms_total(self) -> int:
        """BatchNormalization nodes the model had, subgraphs and functions included."""
        return self.batchnorms_folded + len(self.left)

    @property
    def affines_folded(self) -> int:
        """Decomposed BN forms (per-channel Mul/Add chains) folded away."""
        return sum(fold.kind != "BatchNormalization" and not fold.partial for fold in self.folds)

    @property
    def status(self) -> str:
        if self.problem or (self.verification and not self.verification.passed):
            return "not-equivalent"
        return "equivalent" if self.verification else "unverified"

    @property
    def exit_code(self) -> int:
        return EXIT_NOT_EQUIVALENT if self.status == "not-equivalent" else EXIT_OK

    @property
    def passed(self) -> bool:
        """Equivalent, or not verified because the run was asked not to (exit code 0)."""
        return self.exit_code == EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        """The ``bnfold.fold/1`` document (what ``--json`` writes; schema in the README)."""
        return report_document(FOLD_SCHEMA, self)


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._start = self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Time since the last lap, added to ``name`` (a step may come back after another one)."""
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self._last
        self._last = now

    def total(self) -> dict[str, float]:
        self.timings["total"] = time.perf_counter() - self._start
        return self.timings


def _trials(loaded: LoadedModel, options: VerifyOptions) -> tuple[list[Trial], list[GuessedSize]]:
    """The trials a verification runs (their size checked before anything is generated),
    then the provider, which loads onnxruntime: a refused option costs neither; and the
    sizes that were guessed.

    A model whose symbolic sizes beyond the batch were set to 1 is also verified with them at
    32 (:func:`~bnfold.inputs.wider_trials`) when it runs there, and only at 32 when it cannot
    run at 1 (unpadded kernels shrink the input below nothing); neither: the trials at 1, whose
    failure then says what was guessed.
    """
    trials = prepare_trials(loaded.model, options)
    check_provider(options.provider)
    guessed = guessed_shapes(loaded.model, options)
    wider = wider_trials(loaded.model, options)
    if not wider:
        return trials, guessed
    wider_runs, base_runs = runs_on(loaded.path, [wider[0], trials[0]], options.provider)
    if not wider_runs:
        return trials, guessed
    if base_runs:
        return [*trials, *wider], guessed
    return wider, [widened_guess(guess) if guess.reason == SET_TO_ONE and guess.beyond_batch else guess
                   for guess in guessed]


def _require_known_outputs(loaded: LoadedModel, options: VerifyOptions) -> None:
    """Refuse ``--tol NAME:...`` for a NAME the model does not output: silently applying
    the default tolerance instead would hide the typo in a CI gate."""
    outputs = [value.name for value in loaded.model.graph.output]
    unknown = [name for name in options.tolerances.per_output if name not in outputs]
    if unknown:
        raise InputError(
            f"{loaded.path}: --tol {unknown[0]}: the model has no output of that name "
            f"(its outputs: {', '.join(outputs) or 'none'})"
        )


def _file_size(path: Path) -> int | None:
    """Bytes on disk, for the progress display; None for what load_model will refuse anyway."""
    try:
        return path.stat().st_size if path.is_file() else None
    except OSError:
        return None


def _readable(loaded: LoadedModel, which: str) -> list[str]:
    """The warnings of a model the checker rejects but onnxruntime loads (a graph output
    declared without a shape, say): bnfold works on what onnxruntime can run. ``which``
    names the model in the warning ("the input").

    Raises:
        InputError: the checker rejects the model and onnxruntime cannot load it either.
    """
    if loaded.checker_complaint is None:
        return []
    if not loads_in_onnxruntime(loaded.path):
        raise InputError(f"{loaded.path}: fails onnx.checker ({loaded.checker_complaint}); "
                         "onnxruntime cannot load it either")
    return [f"{which} fails onnx.checker ({loaded.checker_complaint}); onnxruntime loads it"]


def fold_file(input_path: Path, options: FoldOptions, *, progress: Progress | None = None) -> FoldReport:
    """Fold one model file. Raises :class:`~bnfold.errors.BnfoldError` for unusable input."""
    progress = progress or _no_progress
    clock = _Stopwatch()
    check_option_values(options.verify_options)
    progress("load", _file_size(input_path))
    loaded = load_model(input_path)
    warnings = _readable(loaded, "the input")
    _require_known_outputs(loaded, options.verify_options)
    output = options.output or default_output_path(loaded.path)
    files = RunFiles()
    files.read_model(loaded.path, loaded.external_data_files)
    files.read_inputs(files_read_by_inputs(options.verify_options.inputs))
    if not options.dry_run:
        validate_output_path(output, external_data=bool(loaded.external_data_files))
        files.write_output(loaded.path, output, in_place=options.in_place)
    if options.report is not None:
        files.write_report(options.report)
    files.check()
    if not options.dry_run:
        refuse_foreign_data_file(output, external_data=bool(loaded.external_data_files))
    model = loaded.model
    before = model_stats(model, loaded.file_bytes)
    vo = options.verify_options
    trials, guessed = _trials(loaded, vo) if options.verify else ([], guessed_shapes(model, vo))
    clock.lap("load")

    rules = options.rule_set()
    layout = BodyLayout(model) if options.verify else None  # read before folding changes the model
    progress("fold", loaded.file_bytes)
    outcome = fold_batchnorms(model, rules, store=loaded.store, selection=options.selection)
    options.selection.require_matches(outcome.selectable, str(loaded.path))
    bodies = None
    if layout is not None and layout.bodies_holding(_rewrite_labels(outcome)):
        clock.lap("fold")
        progress("bodies", None)
        with explaining_guessed_shapes(guessed):
            loaded, outcome, bodies = _withhold_unverifiable_bodies(loaded, layout, outcome, trials, rules,
                                                                    options.selection, vo)
        model = loaded.model
        clock.lap("bodies")
    after = model_stats(model, None)
    clock.lap("fold")

    staging_target = Path(tempfile.gettempdir()) / output.name if options.dry_run else output
    verification = None
    progress("save", None)
    with stage(model, staging_target, loaded.store, external_data=bool(loaded.external_data_files)) as staged:
        outcome.complete_measurements()  # writing computed the products still to be measured
        # Checked after writing, on the message the writer just serialized: the staged file
        # byte for byte, every tensor with the fields it was written with (before, a folded
        # weight was a stand-in the checker could not see). Reading the file back would
        # parse every weight of a self-contained model again (0.12 s per 100 MB).
        # An input the checker rejects gives the same complaint after folding: only a new one
        # is the fold's. (The checker stops at its first complaint, so there onnxruntime's
        # verification is what proves the folded model.)
        problem = None
        complaint = checker_complaint(model, full_check=loaded.passes_full_check)
        if complaint is not None and complaint != loaded.checker_complaint:
            problem = f"the folded model fails onnx.checker ({complaint})"
        del model
        loaded.release_model()  # before onnxruntime loads two copies of the weights
        after = ModelStats(after.op_counts, after.nodes, after.parameters, staged.file_bytes)
        clock.lap("save")
        if options.verify and problem is None:
            progress("verify", staged.file_bytes)
            with explaining_guessed_shapes(guessed):
                verification = verify_equivalence(
                    loaded.path, staged.staged_path, trials, tolerances=vo.tolerances, provider=vo.provider,
                )
                if bodies is not None:
                    bodies.add_to(verification, staged.staged_path, tolerances=vo.tolerances, provider=vo.provider)
            verification.guessed_sizes = guessed
            clock.lap("verify")
        attribution = None
        if verification is not None and not verification.passed and (outcome.folds or outcome.merges):
            # Before anything is committed: the search reloads the input, which --in-place
            # would otherwise have replaced, and a model found not deterministic
            # (NotDeterministic) must leave nothing behind, --keep-failed or not.
            progress("attribution", None)
            from bnfold.attribution import attribute_failure  # only a failed verification needs it

            attribution = attribute_failure(load_model(loaded.path), outcome.folds, verification, trials,
                                            tolerances=vo.tolerances, provider=vo.provider, rules=rules,
                                            merges=outcome.merges, bodies=bodies, progress=progress)
            clock.lap("attribution")
        equivalent = problem is None and (verification is None or verification.passed)
        report = FoldReport(
            input=loaded.path,
            output=None if options.dry_run else output,
            written=not options.dry_run and (equivalent or options.keep_failed),
            dry_run=options.dry_run,
            before=before,
            after=after,
            folds=outcome.folds,
            left=outcome.left,
            merges=outcome.merges,
            removed_initializers=outcome.removed_initializers,
            overridable_inputs_removed=outcome.overridable_inputs_removed,
            inlined_functions=outcome.inlined_functions,
            verification=verification,
            problem=problem,
            attribution=attribution,
            timings=clock.total(),
            verification_skipped=None if verification else ("--no-verify" if not options.verify else problem),
            warnings=warnings,
        )
        if options.before_commit is not None:
            options.before_commit(report)
        if report.written:
            staged.commit()
    return report


def _rewrite_labels(outcome: FoldOutcome) -> list[str]:
    """The labels of every rewrite a fold run made: folded BNs and merged branches."""
    return [fold.batchnorm for fold in outcome.folds] + [merge.merged for merge in outcome.merges]


def _except(labels: set[str]) -> Callable[[str], bool]:
    """A ``may_fold`` that allows every label but ``labels``."""
    return lambda label: label not in labels


def _withhold_unverifiable_bodies(
    loaded: LoadedModel, layout: BodyLayout, outcome: FoldOutcome, trials: list[Trial], rules: RuleSet,
    selection: Selection, options: VerifyOptions,
) -> tuple[LoadedModel, FoldOutcome, BodyChecks]:
    """Prepare the checks of every body holding a fold (or a branch merge); when some body cannot
    be verified on its own, fold the model again from the file without that body's rewrites.

    Returns the model to write (``loaded`` itself when nothing was withheld), its fold outcome
    (the withheld BNs listed as left, with the reason) and the checks. Folding again never adds a
    rewrite in a body not yet prepared (a body's folds depend only on it and the constants around
    it), but the loop makes sure of it rather than assume it.
    """
    original = load_model(loaded.path)
    checks = BodyChecks()
    kinds: dict[str, str] = {}
    while True:
        found = prepare_body_checks(original, layout, _rewrite_labels(outcome), trials,
                                    tolerances=options.tolerances, provider=options.provider, skip=checks.prepared)
        checks.merge(found)
        if not found.unverified:
            return loaded, outcome, checks
        kinds.update((fold.batchnorm, fold.kind) for fold in outcome.folds)
        withheld = checks.withheld
        loaded = load_model(loaded.path)
        outcome = fold_batchnorms(loaded.model, rules, may_fold=_except(set(withheld)), store=loaded.store,
                                  selection=selection)
        outcome.left += [LeftRecord(label, reason) for label, reason in withheld.items()
                         if kinds.get(label) == "BatchNormalization"]


@dataclass
class CheckReport:
    """``bnfold check``: two existing models compared."""

    original: Path | None
    """The original model file (None for a model the Python API was given in memory)."""
    folded: Path | None
    before: ModelStats
    after: ModelStats
    verification: Verification
    timings: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    """As :attr:`FoldReport.warnings`, for either model."""

    @property
    def status(self) -> str:
        return "equivalent" if self.verification.passed else "not-equivalent"

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.verification.passed else EXIT_NOT_EQUIVALENT

    @property
    def passed(self) -> bool:
        return self.verification.passed

    def to_dict(self) -> dict[str, Any]:
        """The ``bnfold.check/1`` document (what ``bnfold check --json`` writes)."""
        return report_document(CHECK_SCHEMA, self)


def _input_names(loaded: LoadedModel) -> list[str]:
    return [value.name for value in runtime_inputs(loaded.model)]


def _require_same_inputs(original: LoadedModel, folded: LoadedModel) -> None:
    """Both models are fed the same inputs: different input names mean they are not
    two versions of one model, which is a usage error rather than a numeric mismatch."""
    if sorted(_input_names(original)) != sorted(_input_names(folded)):
        raise InputError(
            f"{folded.path}: its inputs ({', '.join(_input_names(folded)) or 'none'}) are not those of "
            f"{original.path} ({', '.join(_input_names(original)) or 'none'})"
        )
    declared = {value.name: value.type for value in runtime_inputs(original.model)}
    for value in runtime_inputs(folded.model):
        ours, theirs = _declared_type(value.type), _declared_type(declared[value.name])
        if ours and theirs and not _compatible(ours, theirs):
            raise InputError(f"{folded.path}: its input '{value.name}' is {_type_text(*ours)}, "
                             f"where {original.path} takes {_type_text(*theirs)}")


Declared = tuple[int, tuple[int | None, ...] | None]
"""An input's element type, and its dims (None where symbolic; None for no shape)."""


def _declared_type(declared: onnx.TypeProto) -> Declared | None:
    if not declared.HasField("tensor_type"):
        return None
    tensor = declared.tensor_type
    dims = tuple(fixed_size(dim) for dim in tensor.shape.dim)
    return tensor.elem_type, dims if tensor.HasField("shape") else None


def _compatible(first: Declared, second: Declared) -> bool:
    """The same element type, and no dim that both fix at different sizes."""
    (first_type, first_dims), (second_type, second_dims) = first, second
    if first_type != second_type:
        return False
    if first_dims is None or second_dims is None:
        return True
    return len(first_dims) == len(second_dims) and all(
        a is None or b is None or a == b for a, b in zip(first_dims, second_dims))


def _type_text(element_type: int, dims: tuple[int | None, ...] | None) -> str:
    name = onnx.helper.tensor_dtype_to_np_dtype(element_type).name if element_type else "untyped"
    shape = "" if dims is None else "[" + ", ".join("?" if dim is None else str(dim) for dim in dims) + "]"
    return name + shape


def check_files(
    original: Path, folded: Path, options: VerifyOptions, *, report: Path | None = None,
    progress: Progress | None = None,
) -> CheckReport:
    """Compare two model files; writes nothing but the caller's ``report`` (the ``--json``
    file), which is checked first against every file the comparison reads."""
    progress = progress or _no_progress
    clock = _Stopwatch()
    check_option_values(options)
    progress("load", _file_size(original))
    original_model = load_model(original)
    folded_model = load_model(folded)
    files = RunFiles()
    for loaded in (original_model, folded_model):
        files.read_model(loaded.path, loaded.external_data_files)
    files.read_inputs(files_read_by_inputs(options.inputs))
    if report is not None:
        files.write_report(report)
    files.check()
    warnings = _readable(original_model, "the original") + _readable(folded_model, "the folded model")
    _require_same_inputs(original_model, folded_model)
    _require_known_outputs(original_model, options)
    trials, guessed = _trials(original_model, options)
    clock.lap("load")
    progress("verify", original_model.file_bytes + folded_model.file_bytes)
    with explaining_guessed_shapes(guessed):
        verification = verify_equivalence(
            original_model.path, folded_model.path, trials,
            tolerances=options.tolerances, provider=options.provider, folded_is_input=True,
        )
    verification.guessed_sizes = guessed
    clock.lap("verify")
    return CheckReport(
        original=original_model.path,
        folded=folded_model.path,
        before=model_stats(original_model.model, original_model.file_bytes),
        after=model_stats(folded_model.model, folded_model.file_bytes),
        verification=verification,
        timings=clock.total(),
        warnings=warnings,
    )
