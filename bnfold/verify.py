"""Proving two models compute the same function with onnxruntime.

Both sessions run with graph optimizations *disabled*: onnxruntime fuses
Conv+BatchNormalization itself at load time, which would make a broken fold look
correct (or a correct one look different). Each output is compared in float64
with ``|folded - original| <= atol + rtol * |original|`` element-wise (numpy's
``allclose`` rule), tolerances chosen per dtype unless given. NaN or Inf on one
side only is always a mismatch; string outputs must be equal.

One generated input can miss a difference (a ReLU hiding it, a branch not
taken), so a verification runs *trials*: several seeds, or every data set of
real inputs (:mod:`bnfold.inputs`). Per output the worst trial is kept and named.
Real inputs may ship expected outputs; the folded model is checked against them too.

A body of an If/Loop/Scan that holds a fold is also compared on its own
(:mod:`bnfold.bodies`); its results are part of the same :class:`Verification`
and count for ``passed`` like the model's outputs.
"""

from __future__ import annotations

import mmap
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from bnfold.errors import InputError, NotDeterministic, RuntimeFailure, onnxruntime_message
from bnfold.inputs import GuessedSize, InputSpec, Trial
from bnfold.io.protostream import MAPPED_LOCATION, split_raw_initializers
from bnfold.io.store import (
    SMALL_TENSOR_BYTES,
    all_tensors,
    external_entries,
    uses_external_data,
)
from bnfold.options import Tolerances

if TYPE_CHECKING:
    import onnxruntime as ort

@dataclass(frozen=True)
class OutputComparison:
    """How one output of the folded model differs from the original's."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    atol: float
    rtol: float
    max_abs_error: float
    max_rel_error: float
    """Largest ``|Δ| / |original|`` over elements where the original is non-zero."""
    worst_index: tuple[int, ...]
    mismatches: int
    """Elements outside tolerance (NaN/Inf on one side only included)."""
    elements: int
    nonfinite_mismatch: bool
    problem: str | None = None
    """Set when the outputs cannot be compared at all (shape or dtype differ)."""
    trial: str = ""
    """The trial these figures come from (the worst one when several ran)."""

    @property
    def passed(self) -> bool:
        return self.problem is None and self.mismatches == 0


@dataclass(frozen=True)
class TrialInputs:
    """What one trial fed the models, as the report states it."""

    label: str
    seed: int | None
    inputs: list[InputSpec]


@dataclass(frozen=True)
class BodyInput:
    """One input of a body verified on its own, as the report states it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    source: str
    """Where its values come from, e.g. ``computed by the model`` or ``Loop 'l' iteration 0``."""


@dataclass
class BodyVerification:
    """A subgraph body compared on its own: the extracted original body against the folded one."""

    label: str
    """Where the body is, as fold labels start: ``If 'branch' then_branch``."""
    inputs: list[BodyInput]
    """The standalone body's inputs (shapes of the first trial)."""
    outputs: list[OutputComparison]
    """Per body output, the worst trial (trials are the model's)."""

    @property
    def passed(self) -> bool:
        return all(output.passed for output in self.outputs)


@dataclass(frozen=True)
class UnverifiedBody:
    """A body that holds foldable BNs but cannot be run on its own: its folds are not applied."""

    label: str
    reason: str
    withheld: tuple[str, ...]
    """The folds left out because of it (BNs, which are also reported as left, and decomposed forms)."""


@dataclass
class Verification:
    provider: str
    trials: list[TrialInputs]
    outputs: list[OutputComparison] = field(default_factory=list)
    """Folded vs original, per output: the worst trial."""
    expected: list[OutputComparison] = field(default_factory=list)
    """Folded vs the expected outputs shipped with real inputs, per trial and output."""
    guessed_sizes: list[GuessedSize] = field(default_factory=list)
    """Generated inputs whose symbolic dims bnfold guessed, and why (given by the caller)."""
    bodies: list[BodyVerification] = field(default_factory=list)
    """Bodies holding folds, each compared on its own (a trial may not execute them)."""
    unverified_bodies: list[UnverifiedBody] = field(default_factory=list)
    """Bodies that could not be compared on their own; their folds were not applied."""

    def comparisons(self) -> list[tuple[str, OutputComparison]]:
        """Every comparison that decides ``passed``, each with the prefix that places its
        output (``""`` for the model's, ``"If 'b' then_branch / "`` for a body's)."""
        found = [("", comparison) for comparison in (*self.outputs, *self.expected)]
        found += [(f"{body.label} / ", comparison) for body in self.bodies for comparison in body.outputs]
        return found

    @property
    def passed(self) -> bool:
        return all(comparison.passed for _, comparison in self.comparisons())

    @property
    def max_abs_error(self) -> float | None:
        """The largest max |Δ| over the outputs of the model and of the bodies verified on
        their own (folded vs original); None with no outputs."""
        errors = [output.max_abs_error for output in self.outputs]
        errors += [output.max_abs_error for body in self.bodies for output in body.outputs]
        return max(errors, default=None)


def _onnxruntime():  # noqa: ANN202 - the onnxruntime module
    """onnxruntime, imported on first use: a run without verification never loads it."""
    import onnxruntime

    return onnxruntime


def check_provider(provider: str) -> None:
    """Refuse an execution provider this onnxruntime build does not have (before any work)."""
    available = _onnxruntime().get_available_providers()
    if provider not in available:
        raise InputError(f"--provider {provider} is not available; this onnxruntime offers {', '.join(available)}")


def open_session(model: Path | bytes, label: str, provider: str) -> ort.InferenceSession:
    """An onnxruntime session with every graph optimization disabled, for a model file or a
    serialized model (a body extracted in memory)."""
    ort = _onnxruntime()
    try:
        if isinstance(model, bytes):
            return ort.InferenceSession(model, sess_options=_session_options(), providers=[provider])
        mapped = _mapped_session(model, provider)
        if mapped is not None:
            return mapped
        with _path_for_onnxruntime(model) as readable:
            return ort.InferenceSession(readable, sess_options=_session_options(), providers=[provider])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises many unrelated types
        raise RuntimeFailure(f"onnxruntime cannot load the {label} model: {onnxruntime_message(error)}") from None


def _session_options() -> ort.SessionOptions:
    """Every graph optimization disabled, errors through the exception only, no prepacking."""
    options = _onnxruntime().SessionOptions()
    options.graph_optimization_level = _onnxruntime().GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # errors reach the user through the exception, once
    # Prepacking re-lays weights out for faster repeated runs; a verification runs a model a
    # few times, and prepacking was a third of creating a session (vgg11_bn: 1.09 s → 0.71 s).
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


# Element types onnxruntime takes from a numpy array as it is (no conversion, no copy).
_MAPPABLE_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BOOL,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
})


def _mapped_session(path: Path, provider: str) -> ort.InferenceSession | None:
    """A session of a self-contained model file whose large weights onnxruntime reads where
    they lie in the file (mapped into memory), not from its own parse of the file.

    Creating a session parses the whole protobuf and copies every weight out of it: a third
    of a second per 100 MB (vgg11_bn: 1.2 s). Here onnxruntime gets the file's own bytes with
    each large raw initializer cut out (:func:`~bnfold.io.protostream.split_raw_initializers`)
    and those initializers as arrays over the file's bytes at their offsets
    (``add_initializer``, which neither copies nor reads them until a run needs them): the
    same graph and the same values, byte for byte, in 0.01 s, holding no copy of the
    weights. The mapping lives as long as the session. None (the ordinary path) for a model
    with external data, whose files onnxruntime must find beside it, one laid out otherwise,
    and one onnxruntime takes whole but not so (it cannot replace a weight that only a
    subgraph reads): the ordinary path then has the last word on the model.
    """
    ort = _onnxruntime()
    with open(path, "rb") as file:
        try:
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            return None
    view = memoryview(mapping)
    try:
        split = split_raw_initializers(view, SMALL_TENSOR_BYTES, lambda tensor: tensor.data_type in _MAPPABLE_TYPES)
        structure = onnx.ModelProto()
        if split is not None:
            structure.ParseFromString(split[0])
        if split is None or not split[1] or any(
            uses_external_data(tensor) and external_entries(tensor).get("location") != MAPPED_LOCATION
            for tensor in all_tensors(structure)
        ):
            view.release()
            mapping.close()
            return None
    except ValueError:  # not well-formed: onnxruntime's own reader says why
        view.release()
        mapping.close()
        return None
    arrays = [
        np.frombuffer(view, dtype=helper.tensor_dtype_to_np_dtype(raw.data_type), offset=raw.offset,
                      count=raw.length // helper.tensor_dtype_to_np_dtype(raw.data_type).itemsize).reshape(raw.dims)
        for raw in split[1]
    ]
    values = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays]
    options = _session_options()
    # add_initializer uses the buffers as they are; add_external_initializers copies every
    # weight (conv_bn_141mb: +146 MB of copies and 0.10 s; vgg11_bn: 0.32 s -> 0.01 s).
    for raw, value in zip(split[1], values):
        options.add_initializer(raw.name, value)
    try:
        session = ort.InferenceSession(split[0], sess_options=options, providers=[provider])
    except Exception:  # noqa: BLE001 - any refusal: the file as it is gets the last word
        del arrays, values, options
        with suppress(BufferError):  # else the mapping closes when collected
            view.release()
            mapping.close()
        return None
    session.bnfold_mapped_weights = (mapping, view, arrays, values, options)  # alive with the session
    return session


def loads_in_onnxruntime(path: Path) -> bool:
    """Whether onnxruntime (CPU) can load the model at ``path``."""
    try:
        open_session(path, "input", "CPUExecutionProvider")
    except RuntimeFailure:
        return False
    return True


@contextmanager
def _path_for_onnxruntime(path: Path) -> Iterator[str]:
    """``path`` as onnxruntime can take it: a UTF-8 string.

    A POSIX file name in another encoding reaches Python as a str with surrogate escapes,
    which onnxruntime refuses. Such a model is reached through a scratch folder of symbolic
    links with UTF-8 names: one to the model, and one to every UTF-8-named entry of its folder,
    where external data lives (the model names its data files in UTF-8, relative to itself, and
    onnxruntime resolves them beside the path it is given). The links are needed only while the
    session loads.
    """
    text = str(path)
    if _is_utf8(text):
        yield text
        return
    folder = path.absolute().parent
    with tempfile.TemporaryDirectory(prefix="bnfold-path-") as scratch:
        for entry in os.listdir(folder):
            if _is_utf8(entry):
                os.symlink(folder / entry, Path(scratch, entry))
        alias = Path(scratch, f".bnfold-{uuid.uuid4().hex}.onnx")  # no entry of the folder has this name
        os.symlink(path.absolute(), alias)
        yield str(alias)


def _is_utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (surrogate escapes in Python)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def runs_on(model: Path, trials: Sequence[Trial], provider: str) -> list[bool]:
    """For each trial, whether onnxruntime runs ``model`` on its inputs (one session for all;
    all False when it cannot load the model): trials the caller may do without are screened
    with this."""
    try:
        session = open_session(model, "original", provider)
    except RuntimeFailure:
        return [False] * len(trials)
    runs = []
    for trial in trials:
        try:
            run_session(session, trial.feeds, "original")
        except RuntimeFailure:
            runs.append(False)
        else:
            runs.append(True)
    return runs


def run_session(session: ort.InferenceSession, feeds: dict[str, np.ndarray], label: str) -> list[np.ndarray]:
    try:
        return session.run(None, feeds)
    except Exception as error:  # noqa: BLE001
        raise RuntimeFailure(f"onnxruntime cannot run the {label} model: {onnxruntime_message(error)}") from None


def compare_output(
    name: str, original: np.ndarray, folded: np.ndarray, tolerance: tuple[float, float]
) -> OutputComparison:
    """Element-wise comparison of one output, with polygraphy-style statistics."""
    atol, rtol = tolerance
    common = partial(
        OutputComparison, name=name, dtype=original.dtype.name, shape=tuple(original.shape), atol=atol, rtol=rtol
    )
    if original.shape != folded.shape or original.dtype != folded.dtype:
        return common(
            max_abs_error=float("inf"), max_rel_error=float("inf"), worst_index=(),
            mismatches=original.size, elements=original.size, nonfinite_mismatch=False,
            problem=f"folded output is {folded.dtype.name}{list(folded.shape)}, "
            f"original is {original.dtype.name}{list(original.shape)}",
        )
    if original.dtype.kind in "OSU":
        return _compare_exactly(common, original, folded)
    reference = original.astype(np.float64)
    candidate = folded.astype(np.float64)
    same_nonfinite = (np.isnan(reference) & np.isnan(candidate)) | (
        np.isinf(reference) & (reference == candidate)
    )
    one_sided = (~np.isfinite(reference) | ~np.isfinite(candidate)) & ~same_nonfinite
    with np.errstate(invalid="ignore", over="ignore"):
        difference = np.where(same_nonfinite, 0.0, np.abs(candidate - reference))
        difference = np.where(one_sided, np.inf, difference)
        magnitude = np.abs(reference)
        outside = one_sided | (difference > atol + rtol * np.where(np.isfinite(magnitude), magnitude, 0.0))
        relative = np.divide(difference, magnitude, out=np.zeros_like(difference), where=magnitude > 0)
    worst = np.unravel_index(int(np.argmax(difference)), difference.shape) if difference.size else ()
    return common(
        max_abs_error=float(difference.max()) if difference.size else 0.0,
        max_rel_error=float(relative.max()) if relative.size else 0.0,
        worst_index=tuple(int(i) for i in worst),
        mismatches=int(outside.sum()),
        elements=int(original.size),
        nonfinite_mismatch=bool(one_sided.any()),
    )


def _as_text(values: np.ndarray) -> np.ndarray:
    """String tensors come back as str from onnxruntime and as bytes from a TensorProto."""
    decode = np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v), otypes=[object])
    return decode(values) if values.size else values


def _compare_exactly(
    common: Callable[..., OutputComparison], original: np.ndarray, folded: np.ndarray
) -> OutputComparison:
    """String outputs have no distance: any difference is infinitely wrong."""
    different = _as_text(original) != _as_text(folded)
    mismatches = int(np.sum(different))
    worst = np.unravel_index(int(np.argmax(different)), different.shape) if mismatches else ()
    error = float("inf") if mismatches else 0.0
    return common(
        max_abs_error=error, max_rel_error=error, worst_index=tuple(int(i) for i in worst),
        mismatches=mismatches, elements=int(original.size), nonfinite_mismatch=False,
    )


def _severity(comparison: OutputComparison) -> tuple[bool, float, int]:
    """Orders comparisons so the worst trial of an output is the maximum."""
    return (not comparison.passed, comparison.max_abs_error, comparison.mismatches)


def verify_equivalence(
    original: Path,
    folded: Path,
    trials: Sequence[Trial],
    *,
    tolerances: Tolerances = Tolerances(),
    provider: str = "CPUExecutionProvider",
    folded_is_input: bool = False,
    reference: Reference | None = None,
) -> Verification:
    """Run both models on every trial's inputs and compare every output; keep the worst trial.

    When a trial ships expected outputs, the folded model is also compared with them.
    ``reference`` is what the original computed on these trials, when a caller that verifies
    several folded versions of one model (error attribution) has it already.

    Raises:
        RuntimeFailure: onnxruntime cannot load or run the *original* model (or the
            folded one when ``folded_is_input``: ``bnfold check`` was given it).
    A folded model written by the fold that onnxruntime rejects is a failed
    verification, not an error: the original ran, so the fold broke it.
    """
    verification = Verification(
        provider=provider, trials=[TrialInputs(t.label, t.seed, t.specs) for t in trials]
    )
    # One session at a time: each holds a copy of the weights, so a multi-GB model
    # would otherwise need two in memory at once. The original's outputs are kept.
    if reference is None:
        reference = run_reference(original, trials, provider, "original", tolerances)
    verification.outputs, verification.expected = compare_to_reference(
        folded, reference, trials, tolerances=tolerances, provider=provider, folded_is_input=folded_is_input
    )
    if not verification.passed and len(trials) > 1:
        # A later trial may reach randomness the first did not (a branch only it takes).
        require_deterministic(open_session(original, "original", provider), trials[1:], reference.output_names,
                              tolerances)
    return verification


@dataclass(frozen=True)
class Reference:
    """What the original computed on each trial: the values a folded model must reproduce."""

    output_names: list[str]
    outputs: list[list[np.ndarray]]
    """Per trial, the outputs in ``output_names`` order."""


def run_reference(original: Path | bytes, trials: Sequence[Trial], provider: str, label: str,
                  tolerances: Tolerances, *, rerun: int = 1) -> Reference:
    """Run the original on every trial (one session, released before the folded one opens),
    and the first ``rerun`` trials once more: a model that disagrees with itself cannot be
    judged (see :func:`require_deterministic`). The model's verification reruns one trial (cheap:
    the session is loaded) and the others only if the comparison fails, before the failure is
    believed.

    Raises:
        RuntimeFailure: onnxruntime cannot load or run it (``label`` names it in the message), or
            an output is not a tensor, which no tolerance can compare.
        NotDeterministic: a rerun differs from the first run.
    """
    session = open_session(original, label, provider)
    output_names = [output.name for output in session.get_outputs()]
    outputs = [run_session(session, trial.feeds, label) for trial in trials]
    for name, value in zip(output_names, outputs[0] if outputs else []):
        if not isinstance(value, np.ndarray):
            raise RuntimeFailure(f"the {label} model's output '{name}' is not a tensor (a sequence, map or "
                                 "optional value); bnfold compares tensors only")
    require_deterministic(session, trials[:rerun], output_names, tolerances, outputs[:rerun])
    return Reference(output_names, outputs)


def compare_to_reference(
    folded: Path | bytes,
    reference: Reference,
    trials: Sequence[Trial],
    *,
    tolerances: Tolerances,
    provider: str,
    folded_is_input: bool = False,
) -> tuple[list[OutputComparison], list[OutputComparison]]:
    """The folded model run on the same trials and compared with ``reference``, output by
    output (the worst trial of each), and with the trials' expected outputs.

    A folded model that onnxruntime cannot load or run fails every output (see
    :func:`verify_equivalence`), unless ``folded_is_input``, where that is an error.
    """
    try:
        folded_session = open_session(folded, "folded", provider)
    except RuntimeFailure as failure:
        if folded_is_input:
            raise
        return broken_outputs(reference, str(failure), tolerances), []
    folded_names = [output.name for output in folded_session.get_outputs()]
    worst: dict[str, OutputComparison] = {}
    expected: list[OutputComparison] = []
    for trial, original_outputs in zip(trials, reference.outputs):
        try:
            candidate = dict(zip(folded_names, run_session(folded_session, trial.feeds, "folded")))
        except RuntimeFailure as failure:
            if folded_is_input:
                raise
            candidate = {}
            missing = str(failure)
        else:
            missing = "output missing from the folded model"
        for name, value in zip(reference.output_names, original_outputs):
            if name in candidate:
                tolerance = tolerances.for_output(name, value.dtype)
                comparison = replace(compare_output(name, value, candidate[name], tolerance), trial=trial.label)
            else:
                comparison = replace(_broken_output(name, value, missing, tolerances), trial=trial.label)
            if name not in worst or _severity(comparison) > _severity(worst[name]):
                worst[name] = comparison
        for name, value in trial.expected.items():
            if name in candidate:
                tolerance = tolerances.for_output(name, value.dtype)
                comparison = compare_output(name, value, candidate[name], tolerance)
            else:
                comparison = _broken_output(name, value, missing, tolerances)
            expected.append(replace(comparison, trial=trial.label))
    return [worst[name] for name in reference.output_names if name in worst], expected


def broken_outputs(reference: Reference, problem: str, tolerances: Tolerances) -> list[OutputComparison]:
    """Every output of ``reference`` failed for ``problem`` (a folded model that could not
    even be built): each element counts as out of tolerance."""
    first = reference.outputs[0] if reference.outputs else []
    return [_broken_output(name, value, problem, tolerances) for name, value in zip(reference.output_names, first)]


def require_deterministic(
    session: ort.InferenceSession, trials: Sequence[Trial], names: Sequence[str], tolerances: Tolerances,
    first_runs: Sequence[Sequence[np.ndarray]] | None = None,
) -> None:
    """Run the original on each trial's inputs a second time (a first time too when
    ``first_runs`` is not given) in the same session, and refuse to judge it if it
    disagrees with itself beyond the tolerances.

    Random ops (RandomNormal, RandomUniform, their *Like forms, Bernoulli, Multinomial) and
    Dropout in training mode make the original differ from itself: compared with it, every
    fold would look wrong and a correct one would be blamed. It must be the same session:
    onnxruntime seeds an unseeded random op identically in every new session, so two
    sessions' first runs agree however random the op is.

    Raises:
        NotDeterministic: naming the first output that differs and by how much.
    """
    for index, trial in enumerate(trials):
        first = first_runs[index] if first_runs is not None else run_session(session, trial.feeds, "original")
        second = run_session(session, trial.feeds, "original")
        for name, once, again in zip(names, first, second):
            comparison = compare_output(name, once, again, tolerances.for_output(name, once.dtype))
            if comparison.passed:
                continue
            if comparison.problem:  # e.g. NonZero of random values: another shape each run
                how = f"in shape or type ({once.dtype.name}{list(once.shape)}, then {again.dtype.name}{list(again.shape)})"
            else:
                how = (f"by {comparison.max_abs_error:.3g} (max |Δ|; {comparison.mismatches} of "
                       f"{comparison.elements} elements beyond tolerance)")
            raise NotDeterministic(
                f"the original model is not deterministic: output {name} differs between two runs {how} "
                f"on the same inputs ({trial.label}); no fold can be checked against it (--no-verify folds anyway)"
            )


def _broken_output(name: str, original: np.ndarray, problem: str, tolerances: Tolerances) -> OutputComparison:
    """An output the folded model did not produce: every element counts as out of tolerance."""
    atol, rtol = tolerances.for_output(name, original.dtype)
    return OutputComparison(
        name=name, dtype=original.dtype.name, shape=tuple(original.shape), atol=atol, rtol=rtol,
        max_abs_error=float("inf"), max_rel_error=float("inf"), worst_index=(),
        mismatches=int(original.size), elements=int(original.size), nonfinite_mismatch=False, problem=problem,
    )
