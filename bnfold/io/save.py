"""Writing results: output names, models staged and moved into place.

Which paths a run may write is decided before any work by :mod:`bnfold.io.paths`.

Outputs are written to a hidden staging folder beside the target and moved into place only
when the caller commits (after verification), so an interrupted or failed run leaves neither
a half-written model nor a stray data file. Weights come from the model's
:class:`~bnfold.io.store.TensorStore`: arrays a fold produced and tensors still in the input's
data files are written straight to the output, never copied into the protobuf first.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import numpy as np
import onnx

from bnfold.errors import InputError, InterruptedAfterMove, first_line
from bnfold.io.load import PROTOBUF_LIMIT
from bnfold.io.protostream import (
    FileRange,
    Payload,
    StreamedArray,
    payload_length,
    write_model,
    write_payload,
)
from bnfold.io.store import (
    SMALL_TENSOR_BYTES,
    TensorStore,
    all_tensors,
    clear_data,
    data_bytes,
    uses_external_data,
)

_FOLDED = ".folded"
FOLDED_SUFFIX = f"{_FOLDED}.onnx"
"""What ``model.onnx`` becomes by default: ``model.folded.onnx`` beside it."""
STAGING_PREFIX = ".bnfold-"
"""Hidden folders where outputs are written before they are moved into place, named
``.bnfold-<process id>-<random>`` so that the folders of a process that died can be found."""

# Offsets in a data file written here are aligned so that onnxruntime can map the file.
_ALIGNMENT = 4096


def default_output_path(input_path: Path) -> Path:
    """``model.onnx`` → ``model.folded.onnx`` beside the input."""
    return input_path.with_name(f"{input_path.stem}{_FOLDED}{input_path.suffix or '.onnx'}")


@contextlib.contextmanager
def output_folder(folder: Path) -> Iterator[Path]:
    """``--output-dir``: the folder (and its parents) created for the run, like ``mkdir -p``.

    The folders this created are removed again if the run leaves them empty (every model
    failed, or Ctrl-C), so that a failed run writes nothing; a folder that existed before
    is never removed.

    Raises:
        InputError: the path is a file, or the folder cannot be created.
    """
    # Every prefix of the path as written, deepest first: ``a/b/../c`` creates ``a``, ``a/b``
    # and ``a/c`` (as ``mkdir -p`` does); a ``..`` step names no new folder.
    prefixes = [Path(*folder.parts[:length]) for length in range(len(folder.parts), 0, -1)]
    created = [path for path in prefixes if path.name not in ("", "..") and not path.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--output-dir {folder}: cannot create the folder ({first_line(error)})") from None
    try:
        yield folder
    finally:
        for path in created:  # deepest first; a folder with anything in it stays
            try:
                path.rmdir()
            except OSError:
                break


def output_data_location(output: Path) -> str:
    """Where a model saved with external data keeps it: ``<output name>.data`` beside it.

    The model names the file in UTF-8 (a protobuf string), so bytes of the output's name that
    are not UTF-8 are written as ``\\xe9`` in the data file's name, as bnfold shows them.
    """
    name = output.name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return f"{name}.data"


def move_into_place(model: Path, target: Path, data: tuple[Path, Path] | None) -> None:
    """Move a written ``model`` over ``target`` and, when ``data`` is ``(written, its place)``,
    its data file first, so that the model never lands before what it refers to.

    Two renames are not one, so the step is made whole by hand: a data file already at its
    place (the input's own with ``--in-place``, or an earlier output's) is first moved
    aside beside it (``<name>.bnfold-previous-…``), put back if the model's move then fails
    and deleted once it succeeded: the pair is either all old or all new (and if the process
    is killed in between, the old data is still there under that name).
    Ctrl-C (or SIGTERM) during the moves is held until they are done, then raised: after a
    finished move as :class:`~bnfold.errors.InterruptedAfterMove` (this output is written,
    nothing after it is done), after a failed one, once it is undone, as KeyboardInterrupt.

    Raises:
        OSError: a move was refused; everything moved was put back.
        KeyboardInterrupt: as above.
    """
    with _interrupts_held() as interrupted:
        set_aside: Path | None = None
        data_moved = False
        try:
            if data is not None:
                written, place = data
                if os.path.lexists(place) and not os.path.isdir(place):
                    # Beside it, not in a staging folder: if the process is killed right here, the
                    # next run's cleanup of staging folders must not delete the only copy.
                    set_aside = place.with_name(f"{place.name}.bnfold-previous-{uuid.uuid4().hex[:8]}")
                    os.replace(place, set_aside)
                os.replace(written, place)
                data_moved = True
            os.replace(model, target)
        except OSError:
            if data is not None:
                if data_moved:
                    os.replace(data[1], data[0])
                if set_aside is not None:
                    os.replace(set_aside, data[1])
            if interrupted:
                raise KeyboardInterrupt from None
            raise
        if set_aside is not None:  # done: the old data file is no one's now
            with contextlib.suppress(OSError):
                set_aside.unlink()
    if interrupted:
        raise InterruptedAfterMove


@contextlib.contextmanager
def _interrupts_held() -> Iterator[list[int]]:
    """Ctrl-C (SIGINT) and SIGTERM noted, not raised, inside the block (the list yielded gets
    the signals received). Python runs signal handlers in the main thread only, so this
    holds them whichever thread the system delivers them to; elsewhere it holds nothing."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, lambda number, _frame: received.append(number)) for number in held}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def write_text_whole(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that the file is either all old or all new.

    The text goes to a hidden file beside the real target (symbolic links followed), which
    then replaces it: a full disk or Ctrl-C leaves the old file, or none, never half a
    report. A target that exists and is not a regular file (``/dev/stdout``, a pipe) is
    written as it is: nothing may replace it.

    Raises:
        OSError: the file could not be written; nothing was left behind.
    """
    try:
        existing: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        existing = None  # a new file
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        path.write_text(text, encoding="utf-8")
        return
    target = path.resolve()
    scratch = target.with_name(f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.tmp")
    try:
        scratch.write_text(text, encoding="utf-8")
        if existing is not None:  # a private report stays private
            os.chmod(scratch, stat.S_IMODE(existing.st_mode))
        os.replace(scratch, target)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


class StagedOutput:
    """A model written to a hidden folder beside its target, waiting to be moved into place.

    Used as a context manager: leaving it removes the staging folder with whatever was not
    committed, even when an exception or Ctrl-C ends the block.
    """

    def __init__(self, staging: Path, target: Path, data_location: str | None) -> None:
        self.staging = staging
        self.staged_path = staging / target.name
        self.target = target
        self.data_location = data_location

    @property
    def file_bytes(self) -> int:
        total = self.staged_path.stat().st_size
        if self.data_location:
            total += (self.staging / self.data_location).stat().st_size
        return total

    def commit(self) -> None:
        """Move the data file (if any), then the model, into place, as one step
        (:func:`move_into_place`).

        Raises:
            InputError: when the file system refuses a move (the target changed since it
                was checked, e.g. a folder created at its place); nothing is changed then.
        """
        data = None if not self.data_location else (
            self.staging / self.data_location, self.target.parent / self.data_location)
        try:
            move_into_place(self.staged_path, self.target, data)
        except OSError as error:
            raise InputError(f"{self.target}: cannot move the folded model into place ({first_line(error)})") from None

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        remove_folder(self.staging)


def stage(model: onnx.ModelProto, target: Path, store: TensorStore, *, external_data: bool) -> StagedOutput:
    """Write ``model`` into a new hidden folder beside ``target`` and return it staged.

    With ``external_data`` (or a model too large for one protobuf), large tensors go to
    ``<target name>.data``, so the input's data file is never overwritten. Writing hands the
    store's arrays over to the file and moves tensors out of the model's protobuf: the model
    is spent afterwards.
    """
    folder = target.parent if str(target.parent) else Path(".")
    remove_abandoned_staging(folder)
    # The name is chosen before the folder exists, so that an interrupt landing anywhere
    # (even between mkdir and the return) still finds it to remove.
    # 128 random bits: never an existing folder.
    staging = folder / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    try:
        try:
            staging.mkdir(mode=0o700)
        except OSError as error:
            raise InputError(f"{target}: cannot write in {folder} ({first_line(error)})") from None
        # 64 MiB of headroom for everything that is not tensor data.
        use_external = external_data or _payload_bytes(model, store) > PROTOBUF_LIMIT - 2**26
        staged = StagedOutput(staging, target, output_data_location(target) if use_external else None)
        try:
            store.check_unchanged()  # what is mapped from the input files is read while writing
            if staged.data_location:
                _write_with_external_data(model, staged.staged_path, staged.data_location, store)
            else:
                _write_self_contained(model, staged.staged_path, store)
        except OSError as error:
            raise InputError(f"{target}: cannot write ({first_line(error)})") from None
        return staged
    except BaseException:
        remove_folder(staging)
        raise


def _payload_bytes(model: onnx.ModelProto, store: TensorStore) -> int:
    """Bytes of weight data in the top-level initializers, wherever they are."""
    total = 0
    for tensor in model.graph.initializer:
        held = store.held_array(tensor)
        if held is not None:
            total += held.nbytes
        elif tensor.HasField("raw_data") or uses_external_data(tensor):
            total += data_bytes(tensor) or 0  # checked against the data on loading
    return total


def _write_self_contained(model: onnx.ModelProto, path: Path, store: TensorStore) -> None:
    """One protobuf file, written in one sequential pass (:func:`protostream.write_model`):
    a top-level weight a fold replaced goes from its array straight into the file, never
    through the protobuf. Tensors below the top level (bodies, Constant nodes; small as a
    rule) are put into their messages first."""
    for tensor in all_tensors(model, top_level=False):
        held = store.take(tensor)
        if held is not None or uses_external_data(tensor):
            content = np.asarray(held).tobytes() if held is not None else store.external_bytes(tensor)
            clear_data(tensor)
            tensor.raw_data = content

    def payload(tensor: onnx.TensorProto) -> np.ndarray | StreamedArray | FileRange | None:
        held = store.take(tensor)
        if held is None and uses_external_data(tensor):
            return store.file_range(tensor)  # copied from the input file to the output
        return held

    with open(path, "wb") as file:
        write_model(model, file, payload)
    store.drop_unclaimed()


def _write_with_external_data(model: onnx.ModelProto, path: Path, location: str, store: TensorStore) -> None:
    """Save ``model`` with its large tensors in ``location`` beside ``path``.

    Tensors still in the input's files (its data files, or the model file for weights the
    loader left there) are copied file to file, held arrays are written straight from memory,
    and protobuf tensors are moved out, so memory never holds all weights at once (onnx's own
    writer needs every tensor loaded first).
    """
    offset = 0
    with open(path.parent / location, "wb") as data:
        for tensor in all_tensors(model):
            payload: Payload | None = store.take(tensor)
            if payload is None and uses_external_data(tensor):
                payload = store.file_range(tensor)
            elif payload is None and tensor.HasField("raw_data") and (data_bytes(tensor) or 0) >= SMALL_TENSOR_BYTES:
                payload = tensor.raw_data
            if payload is None:
                continue
            size = payload_length(payload)
            # Zeros written up to the boundary, not a seek past the end: the file stays one
            # sequential write (measured 7 % faster overall on a 1 GB model).
            padding = -offset % _ALIGNMENT
            data.write(bytes(padding))
            offset += padding
            write_payload(data, payload)
            clear_data(tensor)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", offset), ("length", size)):
                tensor.external_data.add(key=key, value=str(value))
            offset += size
    store.drop_unclaimed()
    onnx.save_model(model, os.fspath(path))


def remove_staging_of(process_id: int, folder: Path) -> None:
    """Remove the staging folders that process ``process_id`` left in ``folder``: a process
    killed hard (a crash in a native library, the out-of-memory killer) cleans up nothing."""
    for staging in folder.glob(f"{STAGING_PREFIX}{process_id}-*"):
        remove_folder(staging)


_STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"(\d+)-[0-9a-f]{32}")


def remove_abandoned_staging(folder: Path) -> None:
    """Remove the staging folders in ``folder`` of bnfold processes that no longer run.

    A run killed hard (a crash inside onnxruntime, the out-of-memory killer, SIGKILL) cannot
    clean up after itself; the next run writing into the same folder does. Only folders named
    exactly as :func:`stage` names them are touched, and only when their process is gone.
    """
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        found = _STAGING_NAME.fullmatch(entry.name)
        if found and entry.is_dir() and not entry.is_symlink() and not _running(int(found.group(1))):
            remove_folder(entry)


def _running(process_id: int) -> bool:
    """Whether a process with this id exists (a reused id counts: its folder then stays)."""
    try:
        os.kill(process_id, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but belongs to someone else
        return True
    return True


def remove_folder(folder: Path) -> None:
    """Remove ``folder`` even if an interrupt (Ctrl-C, a stopping worker) lands during the
    removal: finish removing it, then let the interrupt through."""
    interrupted: BaseException | None = None
    while True:
        try:
            shutil.rmtree(folder, ignore_errors=True)
            break
        except BaseException as error:  # noqa: BLE001 - re-raised once the folder is gone
            interrupted = error
    if interrupted is not None:
        raise interrupted
