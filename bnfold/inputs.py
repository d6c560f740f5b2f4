"""Where the verification inputs come from: generated from a seed, or real data from disk.

A verification runs one or more *trials*; each trial is one set of input values
fed to both models. Generated trials use seeds ``seed, seed+1, ...``. Real trials
come from

* an ``.npz`` file whose keys are the model's input names (one trial), or
* a folder in the ONNX test layout: ``test_data_set_*/input_*.pb`` (each data set
  is one trial; a folder holding ``input_*.pb`` itself is one data set). Tensors
  are matched to inputs by their TensorProto name, or by position when the name
  is empty (as in most of ONNX's own backend test data). ``output_*.pb`` files,
  when present, are the outputs the model is expected to produce; the folded
  model is checked against them as well.

Real inputs are validated against the model before anything runs, so a missing,
misnamed or misshaped input is one clear error line (exit 2), not an onnxruntime
traceback. Generated inputs take each input's declared shape, with symbolic dims from
``--input-shape`` or ``--batch``, else guessed: the sizes the model hints at for an image's
spatial axes (:mod:`bnfold.size_hints`), else 1. The report and the error messages say which
sizes were guessed and why.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import helper, numpy_helper

from bnfold.errors import InputError, RuntimeFailure, first_line
from bnfold.options import VerifyOptions
from bnfold.size_hints import spatial_hint

_NUMBERED_PB = re.compile(r"^(input|output)_(\d+)\.pb$")


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


def runtime_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that must be fed: initializers listed as inputs have defaults."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _require_at_least(option: str, value: int | None, minimum: int) -> None:
    if value is not None and value < minimum:
        raise InputError(f"{option} must be at least {minimum}, got {value}")


def check_option_values(options: VerifyOptions) -> None:
    """Refuse impossible ``--seed``, ``--trials`` and ``--batch`` values before any work (also
    with ``--no-verify``: a bad option is a usage error whatever the run would do)."""
    _require_at_least("--seed", options.seed, 0)
    _require_at_least("--trials", options.trials, 1)
    _require_at_least("--batch", options.batch, 1)


def machine_memory() -> int | None:
    """Bytes of physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if count < 1024 or unit == "PiB":
            return f"{count:.4g} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def check_generated_size(specs: list[InputSpec], trials: int, limit: int | None) -> None:
    """Refuse generated inputs that could not fit in memory, before anything is allocated.

    Every trial's inputs are held at once (elements × item size over all inputs and trials);
    the model's own activations come on top and cannot be known, so only what the inputs
    alone need is compared with ``limit`` (the machine's memory). Without this a request
    like ``--batch 1000000000000`` ends in numpy's MemoryError or the kernel's OOM killer.
    """
    per_input = [(spec, math.prod(spec.shape) * np.dtype(spec.dtype).itemsize) for spec in specs]
    needed = trials * sum(size for _, size in per_input)
    if limit is None or needed <= limit:
        return
    largest, size = max(per_input, key=lambda item: item[1])
    shape = ",".join(map(str, largest.shape))
    raise InputError(
        f"the generated inputs would need {_size(needed)} ({trials} trial{'s' * (trials != 1)}; input '{largest.name}' "
        f"{largest.dtype}[{shape}] alone is {_size(size)}), more than this machine's {_size(limit)} of memory; "
        "give smaller --batch / --input-shape or fewer --trials"
    )


SET_TO_ONE = "symbolic dims set to 1"


@dataclass(frozen=True)
class GuessedSize:
    """The shape generated for an input whose symbolic dims the user did not give, and why."""

    input: str
    shape: tuple[int, ...]
    axes: tuple[int, ...]
    """The symbolic axes whose sizes were guessed."""
    reason: str
    """``symbolic dims set to 1``, or the model's hint (:mod:`bnfold.size_hints`)."""

    @property
    def beyond_batch(self) -> bool:
        """Whether a dim other than the first (the batch, which 1 rarely gets wrong) was guessed."""
        return any(axis > 0 for axis in self.axes)


def fixed_size(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """A declared dimension's size, or None when it is symbolic or unset. A size may be 0 (an
    empty tensor): only the field's presence tells it from an unset one; a negative one
    (paddle2onnx writes -1 for a dynamic size) is no size."""
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value >= 0 else None


def guess_sizes(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], batch: int | None) -> list[GuessedSize]:
    """A shape for every runtime input with a symbolic dim that ``--input-shape`` does not give
    (``--batch`` gives only the first dim): the model's hint for its spatial axes where it has
    one, else 1 for every symbolic dim. These are the first suspects when a model cannot run."""
    guessed = []
    for value in runtime_inputs(model):
        if value.name in shapes or not value.type.tensor_type.HasField("shape"):
            continue
        dims = [fixed_size(dim) for dim in value.type.tensor_type.shape.dim]
        symbolic = [axis for axis, size in enumerate(dims) if size is None and not (axis == 0 and batch)]
        if not symbolic:
            continue
        shape = [size if size is not None else (batch if axis == 0 and batch else 1) for axis, size in enumerate(dims)]
        hint = spatial_hint(model, value.name, len(dims)) if any(axis >= 2 for axis in symbolic) else None
        if hint is not None:
            shape[2:] = [size if size is not None else hinted for size, hinted in zip(dims[2:], hint.sizes)]
        reason = SET_TO_ONE if hint is None else hint.reason
        guessed.append(GuessedSize(value.name, tuple(shape), tuple(symbolic), reason))
    return guessed


def input_specs(
    model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], batch: int | None = None
) -> list[InputSpec]:
    """Concrete shapes for every runtime input: fixed dims kept, symbolic ones from
    ``shapes`` (the user's ``--input-shape``), else ``batch`` for a symbolic first
    dim (``--batch``), else guessed (:func:`guess_sizes`)."""
    unknown = set(shapes) - {value.name for value in runtime_inputs(model)}
    if unknown:
        raise InputError(f"--input-shape names no model input: {', '.join(sorted(unknown))}")
    _require_at_least("--batch", batch, 1)
    guessed = {guess.input: guess.shape for guess in guess_sizes(model, shapes, batch)}
    specs = []
    for value in runtime_inputs(model):
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise InputError(f"input '{value.name}' is not a tensor; bnfold cannot generate it (pass --inputs)")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        if value.name in shapes:
            shape = shapes[value.name]
            if tensor_type.HasField("shape") and len(shape) != len(tensor_type.shape.dim):
                raise InputError(
                    f"--input-shape {value.name}: rank {len(shape)} but the model declares "
                    f"rank {len(tensor_type.shape.dim)}"
                )
            for axis, (size, dim) in enumerate(zip(shape, tensor_type.shape.dim)):
                if fixed_size(dim) is not None and size != dim.dim_value:
                    raise InputError(f"--input-shape {value.name}: dim {axis} is {size} but the model "
                                     f"fixes it at {dim.dim_value}")
        elif not tensor_type.HasField("shape"):
            raise InputError(f"input '{value.name}' has no declared shape; pass --input-shape {value.name}:DIMS")
        else:  # every symbolic dim is guessed, unless it is the first one and --batch gives it
            shape = guessed.get(value.name) or tuple(
                fixed if (fixed := fixed_size(dim)) is not None else (batch or 1) for dim in tensor_type.shape.dim
            )
        specs.append(InputSpec(value.name, tuple(shape), dtype.name))
    return specs


def generate_inputs(specs: list[InputSpec], seed: int) -> dict[str, np.ndarray]:
    """Seeded inputs: floats ~ N(0, 1), integers in [0, 4), booleans fair coins."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f" or dtype.name == "bfloat16":
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, 4, spec.shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = np.asarray(rng.random(spec.shape) < 0.5)  # a 0-d array, not np.bool, for shape ()
        else:
            raise InputError(f"input '{spec.name}' has dtype {spec.dtype}; bnfold cannot generate it")
    return feeds




@dataclass
class Trial:
    """One set of inputs fed to both models, and the outputs expected from it, if known."""

    label: str
    """How the report names the trial: ``seed 3`` or the data set folder."""
    feeds: dict[str, np.ndarray]
    seed: int | None = None
    expected: dict[str, np.ndarray] = field(default_factory=dict)
    """Reference outputs shipped with real inputs (``output_*.pb``), by output name."""

    @property
    def specs(self) -> list[InputSpec]:
        return [InputSpec(name, tuple(value.shape), value.dtype.name) for name, value in self.feeds.items()]


def prepare_trials(model: onnx.ModelProto, options: VerifyOptions) -> list[Trial]:
    """The inputs every verification of ``model`` runs, checked before any folding work."""
    check_option_values(options)
    if options.inputs is None:
        specs = input_specs(model, options.shapes, options.batch)
        check_generated_size(specs, options.trials, machine_memory())
        return generated_trials(specs, options.seed, options.trials)
    generation_options = [
        flag for flag, used in (("--input-shape", options.shapes), ("--batch", options.batch is not None),
                                ("--trials", options.trials != 1)) if used
    ]
    if generation_options:
        raise InputError(f"{generation_options[0]} shapes generated inputs; it cannot be combined with --inputs")
    return load_trials(options.inputs, model)


WIDER_SIZE = 32
"""The size of the symbolic dims (beyond the batch) in the wider trial: large enough that a
3×3 kernel has borders and an interior, pools and resizes act, and a multiple of the strides
of most networks (a U-Net's skip connections need one)."""


def wider_trials(model: onnx.ModelProto, options: VerifyOptions) -> list[Trial]:
    """The trials again, for a model whose symbolic sizes beyond the batch were set to 1 for
    want of a hint, with every such dim at ``WIDER_SIZE`` (seeds after the others').

    At 1×1 a padded kernel reads only its centre tap and a pool or resize hardly acts: a
    fold that broke borders or padding would pass; and a model that shrinks its input with
    unpadded kernels cannot run at 1 at all. Empty when nothing was set to 1, with real
    ``--inputs``, or when the inputs would not fit in memory; the caller keeps them only if
    the original model runs on them (a model may need sizes of its own).
    """
    if options.inputs is not None:
        return []
    widened = {guess.input: widened_guess(guess).shape for guess in guess_sizes(model, options.shapes, options.batch)
               if guess.reason == SET_TO_ONE and guess.beyond_batch}
    if not widened:
        return []
    specs = [InputSpec(spec.name, widened.get(spec.name, spec.shape), spec.dtype)
             for spec in input_specs(model, options.shapes, options.batch)]
    try:
        check_generated_size(specs, 2 * options.trials, machine_memory())
    except InputError:
        return []
    return [Trial(f"seed {seed}, symbolic sizes {WIDER_SIZE}", generate_inputs(specs, seed), seed=seed)
            for seed in range(options.seed + options.trials, options.seed + 2 * options.trials)]


def widened_guess(guess: GuessedSize) -> GuessedSize:
    """``guess`` with the dims it set to 1 (beyond the batch) at ``WIDER_SIZE``."""
    shape = tuple(WIDER_SIZE if axis in guess.axes and axis > 0 else size for axis, size in enumerate(guess.shape))
    return GuessedSize(guess.input, shape, guess.axes, f"symbolic dims set to {WIDER_SIZE} (the model cannot run at 1)")


def guessed_shapes(model: onnx.ModelProto, options: VerifyOptions) -> list[GuessedSize]:
    """The generated shapes that contain a guess, and why (none with real ``--inputs``)."""
    return [] if options.inputs is not None else guess_sizes(model, options.shapes, options.batch)


@contextlib.contextmanager
def explaining_guessed_shapes(guessed: list[GuessedSize]) -> Iterator[None]:
    """Add to onnxruntime's complaint which inputs had guessed sizes: a model that needs real
    sizes (pooling, a fixed reshape) most often fails for that."""
    try:
        yield
    except RuntimeFailure as failure:
        if not guessed:
            raise
        ones = [guess.input for guess in guessed if guess.reason == SET_TO_ONE]
        hinted = [f"{guess.input} was {','.join(map(str, guess.shape))} ({guess.reason})"
                  for guess in guessed if guess.reason != SET_TO_ONE]
        said = ([f"symbolic dims of {', '.join(ones)} were set to 1"] if ones else []) + hinted
        raise RuntimeFailure(
            f"{failure} ({'; '.join(said)}; give real sizes with --input-shape NAME:D1,D2,...)"
        ) from None


def generated_trials(specs: list[InputSpec], seed: int, count: int) -> list[Trial]:
    """``count`` trials of generated inputs with seeds ``seed .. seed + count - 1``."""
    _require_at_least("--trials", count, 1)
    try:
        return [Trial(f"seed {s}", generate_inputs(specs, s), seed=s) for s in range(seed, seed + count)]
    except MemoryError:  # within the machine's memory (checked first) but not free now
        needed = count * sum(math.prod(spec.shape) * np.dtype(spec.dtype).itemsize for spec in specs)
        raise InputError(f"not enough free memory for the generated inputs ({_size(needed)})") from None


def load_trials(path: Path, model: onnx.ModelProto) -> list[Trial]:
    """Real inputs from an ``.npz`` file or an ONNX test-data folder, checked against ``model``."""
    if not path.exists():
        raise InputError(f"--inputs {path}: no such file or folder")
    trials = _load_test_data(path, model) if path.is_dir() else [_load_npz(path)]
    for trial in trials:
        _check_feeds(trial, model, path)
    return trials


def _load_npz(path: Path) -> Trial:
    try:
        with np.load(path, allow_pickle=False) as archive:
            feeds = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise InputError(f"--inputs {path}: not a readable .npz file ({first_line(error)})") from None
    return Trial(path.name, feeds)


def _numbered(folder: Path, kind: str) -> list[Path]:
    """``input_0.pb, input_1.pb, ..., input_10.pb`` in numeric order."""
    found = [(int(m.group(2)), p) for p in folder.iterdir() if (m := _NUMBERED_PB.match(p.name)) and m.group(1) == kind]
    return [p for _, p in sorted(found)]


def _read_tensor(path: Path) -> onnx.TensorProto:
    try:
        return onnx.load_tensor(str(path))
    except (DecodeError, OSError, ValueError) as error:
        raise InputError(f"--inputs {path}: not a TensorProto ({first_line(error)})") from None


def _by_name(paths: list[Path], names: list[str], kind: str) -> dict[str, np.ndarray]:
    """Tensors keyed by their own name, or by the model's ``kind`` name at the same position."""
    values: dict[str, np.ndarray] = {}
    for position, path in enumerate(paths):
        tensor = _read_tensor(path)
        name = tensor.name
        if not name:
            if position >= len(names):
                raise InputError(f"--inputs {path}: the model has only {len(names)} {kind}s")
            name = names[position]
        values[name] = numpy_helper.to_array(tensor)
    return values


def _data_sets(folder: Path) -> list[Path]:
    """The data set folders of an ONNX test-data folder (the folder itself when it holds
    ``input_*.pb``), in name order."""
    data_sets = sorted(p for p in folder.glob("test_data_set_*") if p.is_dir())
    if not data_sets and _numbered(folder, "input"):
        data_sets = [folder]
    return data_sets


def files_read_by_inputs(path: Path | None) -> list[Path]:
    """Every file ``--inputs PATH`` reads (the .npz, or each data set's ``input_*.pb`` and
    ``output_*.pb``), so that no output of the run may overwrite one."""
    if path is None or not path.exists():
        return []
    if not path.is_dir():
        return [path]
    return [file for data_set in _data_sets(path) for kind in ("input", "output") for file in _numbered(data_set, kind)]


def _load_test_data(folder: Path, model: onnx.ModelProto) -> list[Trial]:
    data_sets = _data_sets(folder)
    if not data_sets:
        raise InputError(f"--inputs {folder}: no test_data_set_* folders or input_*.pb files")
    input_names = [value.name for value in runtime_inputs(model)]
    output_names = [value.name for value in model.graph.output]
    trials = []
    for data_set in data_sets:
        feeds = _by_name(_numbered(data_set, "input"), input_names, "input")
        expected = _by_name(_numbered(data_set, "output"), output_names, "output")
        unknown = sorted(set(expected) - set(output_names))
        if unknown:
            raise InputError(f"--inputs {data_set}: expected output '{unknown[0]}' names no model output")
        trials.append(Trial(data_set.name, feeds, expected=expected))
    return trials


def _check_feeds(trial: Trial, model: onnx.ModelProto, source: Path) -> None:
    """Every runtime input present, nothing extra, dtype and fixed dims as declared."""
    declared = {value.name: value for value in runtime_inputs(model)}
    missing = [name for name in declared if name not in trial.feeds]
    if missing:
        raise InputError(f"--inputs {source}: no value for model input '{missing[0]}' (in {trial.label})")
    extra = sorted(set(trial.feeds) - set(declared))
    if extra:
        raise InputError(
            f"--inputs {source}: '{extra[0]}' names no model input (model inputs: {', '.join(declared)})"
        )
    for name, value in declared.items():
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            continue  # sequences and maps: onnxruntime checks them itself
        given = trial.feeds[name]
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        if given.dtype != dtype:
            raise InputError(f"--inputs {source}: input '{name}' is {given.dtype.name}, the model expects {dtype.name}")
        if not tensor_type.HasField("shape"):
            continue
        dims = [dim.dim_value if dim.HasField("dim_value") else None for dim in tensor_type.shape.dim]
        if len(dims) != given.ndim or any(d is not None and d != g for d, g in zip(dims, given.shape)):
            wanted = ",".join("?" if d is None else str(d) for d in dims)
            raise InputError(
                f"--inputs {source}: input '{name}' has shape [{','.join(map(str, given.shape))}], "
                f"the model expects [{wanted}]"
            )
