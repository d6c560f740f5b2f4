"""Which files a run reads and writes, checked against each other before any work.

A run reads input models, their external data files and ``--inputs`` files; it writes
folded models, their data files (``<output>.data``), staging folders beside them and the
``--json`` report. Any written path that is also a read one destroys the user's data
(an output named like the input's data file overwrites the weights the input still
points at), and two writes to one path lose one result while the run exits 0. Such runs
are refused here, before any model is folded, by every command (one model, a batch,
``bnfold check``, the pre-commit hook), so a clash can never be found half-way through.

Two paths are the same file when they resolve to the same path (symbolic links followed)
or are the same file on disk (a hard link, a bind mount): a report written through a
link would truncate the file behind it. ``--in-place`` is the one way to replace an input:
it allows a model's output to be that model's own file, and then that output's data file
to replace that model's own data file, nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bnfold.errors import InputError
from bnfold.io.load import external_data_locations
from bnfold.io.save import output_data_location

_MODEL, _DATA, _INPUTS, _OUTPUT, _OUTPUT_DATA, _REPORT = (
    "model", "data", "inputs", "output", "output data", "report",
)


@dataclass(frozen=True)
class _FileUse:
    """One file the run reads or writes, and how a message names it."""

    path: Path
    kind: str
    what: str
    """How the message names the file's role, e.g. ``the output of m.onnx``."""
    model: Path | None = None
    """The input model the file belongs to (its data file, its output)."""
    replaces_input: bool = False
    """An output that may replace its own input model and data file (``--in-place``)."""
    output: Path | None = None
    """For an output's data file, the output model it belongs to."""

    @property
    def identity(self) -> tuple[Path, tuple[int, int] | None]:
        """The resolved path, and (device, inode) when the file exists."""
        try:
            status = os.stat(self.path)
        except (OSError, ValueError):
            return resolved(self.path), None
        return resolved(self.path), (status.st_dev, status.st_ino)


def resolved(path: Path) -> Path:
    """``path`` with symbolic links followed; as written (made absolute) where it cannot be
    (a symlink loop, a name too long): such a file fails later, with its own message."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError):
        return path.absolute()


def _same_file(first: _FileUse, second: _FileUse) -> bool:
    (path_a, inode_a), (path_b, inode_b) = first.identity, second.identity
    return path_a == path_b or (inode_a is not None and inode_a == inode_b)


def _same_model(first: Path | None, second: Path | None) -> bool:
    return first is not None and second is not None and resolved(first) == resolved(second)


class PathClash(InputError):
    """A file the run would write is one it reads, another one it writes, or cannot be
    written at all: refused before any work, and never written. The report of that failure
    is written only when the ``--json`` file is not part of the clash
    (``report_involved``): every clash of the report is looked for first."""

    def __init__(self, message: str, *, report_involved: bool) -> None:
        super().__init__(message)
        self.report_involved = report_involved


class RunFiles:
    """Every file one run reads and writes; :meth:`check` refuses any clash among them."""

    def __init__(self) -> None:
        self.reads: list[_FileUse] = []
        self.writes: list[_FileUse] = []
        self._report: Path | None = None

    def read_model(self, model: Path, data_locations: Iterable[str]) -> None:
        """An input model and its external data files (locations relative to its folder)."""
        self.reads.append(_FileUse(model, _MODEL, f"the input model {model}", model))
        for location in data_locations:
            self.reads.append(
                _FileUse(model.parent / location, _DATA, f"the external data file '{location}' of {model}", model)
            )

    def read_inputs(self, files: Iterable[Path]) -> None:
        """Files read for ``--inputs`` (an .npz, or every ``input_*.pb``/``output_*.pb``)."""
        self.reads.extend(_FileUse(path, _INPUTS, f"the --inputs file {path}") for path in files)

    def write_output(self, model: Path, output: Path, *, in_place: bool) -> None:
        """The folded ``model`` written to ``output`` and, when it keeps external data, to
        ``<output>.data`` beside it (counted whether or not it will be written: a path the
        run might write must not be one it reads)."""
        replaces = in_place and _same_file(_FileUse(output, _OUTPUT, ""), _FileUse(model, _MODEL, ""))
        self.writes.append(_FileUse(output, _OUTPUT, f"the output of {model}", model, replaces))
        data = output.parent / output_data_location(output)
        self.writes.append(
            _FileUse(data, _OUTPUT_DATA, f"the data file of the output of {model}", model, replaces, output)
        )

    def write_report(self, path: Path) -> None:
        """The ``--json`` report file."""
        self._report = path
        self.writes.append(_FileUse(path, _REPORT, "the JSON report"))

    def check(self) -> None:
        """Refuse, with one line, a report that cannot be written and any written path that
        is a read one or another written one.

        Raises:
            PathClash: naming the path and both roles.
        """
        if self._report is not None:
            try:
                validate_report_path(self._report)
            except InputError as error:
                raise PathClash(str(error), report_involved=True) from None
        for report_pass in (True, False):  # the report's clashes first: see PathClash
            for index, write in enumerate(self.writes):
                for read in self.reads:
                    if (write.kind == _REPORT) == report_pass and _same_file(write, read) \
                            and not _allowed_in_place(write, read):
                        raise PathClash(_overwrite_message(write, read), report_involved=report_pass)
                for other in self.writes[index + 1 :]:
                    if (_REPORT in (write.kind, other.kind)) == report_pass and _same_file(write, other):
                        raise PathClash(_clash_message(write, other), report_involved=report_pass)


def _allowed_in_place(write: _FileUse, read: _FileUse) -> bool:
    """``--in-place`` replaces a model's file and its own data file, as one output."""
    return write.replaces_input and read.kind in (_MODEL, _DATA) and _same_model(write.model, read.model)


def _overwrite_message(write: _FileUse, read: _FileUse) -> str:
    own_input = _same_model(write.model, read.model)
    if write.kind == _OUTPUT and read.kind == _MODEL and own_input:
        return f"{write.path}: output path is the input file; pass --in-place to overwrite it"
    if write.kind == _OUTPUT_DATA and read.kind == _DATA and own_input:
        return (
            f"{write.output}: its data file '{write.path.name}' is the input's external data; "
            "choose another output name"
        )
    remedy = "choose another --json path" if write.kind == _REPORT else "choose another output path"
    return f"{write.path}: {write.what} would overwrite {read.what}; {remedy}"


def _clash_message(first: _FileUse, second: _FileUse) -> str:
    if first.kind == second.kind == _OUTPUT:
        return (
            f"{first.model} and {second.model} would both be written to {first.path}; "
            "rename one or fold them in separate runs"
        )
    return f"{first.path}: {first.what} and {second.what} would both be written to this file"


def validate_report_path(path: Path) -> None:
    """A ``--json`` file can be written: its folder exists and it is not a folder itself.

    Raises:
        InputError: before any work, so that a run never ends with its report unwritable.
    """
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"{path}: cannot write JSON report (it is a directory)")
    if not folder.is_dir():
        raise InputError(f"{path}: cannot write JSON report (folder {folder} does not exist)")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{path}: cannot write JSON report (permission denied)")


def refuse_foreign_data_file(output: Path, *, external_data: bool) -> None:
    """Refuse to replace a data file at the output's data path that the model at the output
    path does not name (after :meth:`RunFiles.check`, whose messages are more precise).

    Replacing an output replaces its data file with it; a data file that no model at the
    output path names may hold another model's weights (a folded model moved or renamed
    after it was written keeps reading ``<old name>.data``).
    """
    data = output.parent / output_data_location(output)
    if external_data and data.is_file() and output_data_location(output) not in (external_data_locations(output) or ()):
        raise InputError(f"{output}: its data file {data} exists and is not the data file of {output}; "
                         "move it away or choose another output path")


def validate_output_path(output: Path, *, external_data: bool) -> None:
    """Refuse an output path that cannot be written: a symbolic link, a folder, a missing or
    read-only folder, or (for a model with external data) a folder where its data file goes."""
    if output.is_symlink():
        raise InputError(f"{output}: output path is a symbolic link; refusing to write through it")
    if output.is_dir():
        raise InputError(f"{output}: output path is a directory")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{output}: output folder does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{output}: output folder is not writable")
    data = folder / output_data_location(output)
    if external_data and data.is_dir():
        raise InputError(f"{output}: its data file {data} would replace a directory of that name")

