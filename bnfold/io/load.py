"""Reading a model from disk and validating it, so that nothing later trips over a bad file.

Every way a file can be unusable (missing, a folder, empty, not protobuf, not a model, failing
the checker, external data missing, outside the model's folder or cut short) becomes an
:class:`~bnfold.errors.InputError` with a one-line message, so the CLI never shows a traceback.
Weights in external data files stay on disk: the model's :class:`~bnfold.io.store.TensorStore`
reads them when a fold needs them.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from bnfold.errors import InputError, first_line
from bnfold.io.protostream import (
    MAPPED_LOCATION,
    RawInitializer,
    initializer_data_lengths,
    split_raw_initializers,
)
from bnfold.io.store import (
    SMALL_TENSOR_BYTES,
    TensorStore,
    all_tensors,
    data_bytes,
    external_entries,
    external_location,
    has_conflicting_data,
    leaves_raw_data_alone,
    uses_external_data,
)

# Protobuf cannot serialize a message above 2 GiB; such models must use external data.
PROTOBUF_LIMIT = 2**31 - 1


@dataclass
class LoadedModel:
    """A model read from disk, with the store that knows where its weights are."""

    model: onnx.ModelProto
    path: Path
    file_bytes: int
    """Size on disk of the .onnx file plus its external data files."""
    external_data_files: tuple[str, ...]
    """Relative locations of external data files, empty for a self-contained model."""
    passes_full_check: bool
    """Whether the input passes the checker with ``full_check``; the output must then too."""
    checker_complaint: str | None = None
    """What the checker says against the input even without ``full_check`` (None: nothing).

    Such a model is not refused here: one that onnxruntime loads (a graph output declared
    without a shape, say) is folded, with the complaint shown as a warning. Whoever folds or
    compares it must find out whether onnxruntime can read it and refuse it if not."""
    store: TensorStore = field(default_factory=TensorStore)

    def release_model(self) -> None:
        """Drop the in-memory model once it has been written.

        Its weights live in one protobuf arena that is freed only with the whole message, so
        the message itself must go for the memory to be returned.
        """
        self.model = onnx.ModelProto()


def _check_external_data(model: onnx.ModelProto, path: Path) -> tuple[tuple[str, ...], int]:
    """Refuse external data outside the model's folder, missing, or shorter than a tensor
    needs; return the data files' relative locations and their total size."""
    folder = path.parent.resolve()
    sizes: dict[str, int] = {}
    for tensor in all_tensors(model):
        if not uses_external_data(tensor):
            continue
        try:
            place = external_location(tensor)
        except ValueError as error:
            raise InputError(f"{path}: tensor '{tensor.name}' has unusable external data ({error})") from None
        location = place.location
        if location == MAPPED_LOCATION:  # a weight the loader left in the model file itself
            continue
        if location not in sizes:
            try:
                data_path = (folder / location).resolve()
                if not location or os.path.isabs(location) or not data_path.is_relative_to(folder):
                    raise InputError(f"{path}: external data location '{location}' points outside the model's folder")
                if not data_path.is_file():
                    raise InputError(f"{path}: external data file '{location}' is missing")
                sizes[location] = data_path.stat().st_size
            except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte, a name too long
                raise InputError(f"{path}: external data location '{location}' is unusable ({first_line(error)})") from None
        expected = data_bytes(tensor)
        if expected is not None and place.length != expected:
            raise InputError(
                f"{path}: tensor '{tensor.name}' declares {place.length} bytes of external data "
                f"but its shape {list(tensor.dims)} needs {expected}"
            )
        if place.offset + place.length > sizes[location]:
            raise InputError(
                f"{path}: external data file '{location}' is cut short: tensor '{tensor.name}' needs bytes "
                f"{place.offset}..{place.offset + place.length} but the file has {sizes[location]}"
            )
    return tuple(sizes), sum(sizes.values())


def _check_data_sizes(model: onnx.ModelProto, path: Path, lengths: list[int | None] | None) -> None:
    """Every initializer's raw_data has exactly dims × itemsize bytes: the one thing the
    checker would verify about the weights that :func:`weightless_copy` leaves out, and what
    lets every later step take a tensor's size from its shape.

    A weight left in the file (:data:`MAPPED_LOCATION`) has its length in its entry; others
    are measured through protobuf (small ones, kept in the protobuf), or with ``lengths`` read
    from the file's framing (:func:`~bnfold.io.protostream.initializer_data_lengths`) when the
    whole model was parsed: asking protobuf for ``len(tensor.raw_data)`` copies the weight.
    """
    tensors = model.graph.initializer
    if lengths is None or len(lengths) != len(tensors):
        lengths = [
            external_location(tensor).length if uses_external_data(tensor) and _mapped_here(tensor)
            else len(tensor.raw_data) if tensor.HasField("raw_data") else None
            for tensor in tensors
        ]
    for tensor, held in zip(tensors, lengths, strict=True):
        expected = data_bytes(tensor)
        if held is not None and expected is not None and held != expected:
            raise InputError(
                f"{path}: initializer '{tensor.name}' holds {held} bytes but its shape {list(tensor.dims)} needs {expected}"
            )


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[memoryview | bytes]:
    """The file's bytes, mapped into memory rather than read into a copy when the system
    allows it: protobuf parses straight from the page cache (half the time of reading the
    file first, and one copy of the weights less at the peak). The parsed model holds its
    own copy, so the mapping ends with the block."""
    with open(path, "rb") as file:
        try:
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a pipe, a special file: read it instead
            yield file.read()
            return
        view = memoryview(mapping)
        try:
            yield view
        finally:
            view.release()
            mapping.close()


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Read and validate a model; external data stays on disk until it is needed.

    A model that fails the checker is returned with the complaint
    (:attr:`LoadedModel.checker_complaint`), not refused: only onnxruntime can tell whether
    it is readable after all.

    Raises:
        InputError: with a one-line reason for any unusable file.
    """
    path = Path(path)
    if not path.exists():
        leads_nowhere = " (a symbolic link that leads to no file)" if path.is_symlink() else ""
        raise InputError(f"{path}: no such file{leads_nowhere}")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an ONNX file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: file is empty")
    model = onnx.ModelProto()
    lengths: list[int | None] | None = None
    store = TensorStore(path.parent, source=path)  # before reading: it notes which file this is
    try:
        with _mapped(path) as serialized:
            # The structure only: large raw weights stay in the (mapped, re-readable) file,
            # marked with where they are.
            split = _split(serialized) if isinstance(serialized, memoryview) else None
            if split is not None:
                model.ParseFromString(split[0])
            else:  # a layout that cannot be split: parse it all
                model.ParseFromString(serialized)
                lengths = initializer_data_lengths(serialized)
    except OSError as error:
        raise InputError(f"{path}: cannot read ({first_line(error)})") from None
    except (DecodeError, RuntimeError, ValueError) as error:
        raise InputError(f"{path}: not an ONNX model ({first_line(error)})") from None
    if not model.HasField("graph") or model.ir_version <= 0:
        raise InputError(f"{path}: not an ONNX model (no graph or IR version)")
    _refuse_reserved_locations(model, path, len(split[1]) if split is not None else 0)
    locations, data_size = _check_external_data(model, path)
    _check_data_sizes(model, path, lengths)
    passes_full_check = checker_complaint(model, full_check=True) is None
    return LoadedModel(
        model=model,
        path=path,
        file_bytes=size + data_size,
        external_data_files=locations,
        passes_full_check=passes_full_check,
        checker_complaint=None if passes_full_check else checker_complaint(model, full_check=False),
        store=store,
    )


def _refuse_reserved_locations(model: onnx.ModelProto, path: Path, left_in_file: int) -> None:
    """Exactly the ``left_in_file`` weights the loader left in the file carry its marker
    location (:data:`MAPPED_LOCATION`); any other is the file's own declaration of a location
    no file can have, which would otherwise be read as a place in the model file."""
    marked = [tensor for tensor in all_tensors(model) if uses_external_data(tensor) and _mapped_here(tensor)]
    if len(marked) > left_in_file:
        raise InputError(f"{path}: an external data location names no file (it holds a NUL byte)")


def _split(serialized: memoryview) -> tuple[bytes, list[RawInitializer]] | None:
    """The model's structure with its large plain weights left in the file, or None to parse
    everything: for a layout the splitter does not take, and for bytes it finds malformed
    (protobuf's own parse then says what is wrong, as it would for any file)."""
    try:
        return split_raw_initializers(serialized, SMALL_TENSOR_BYTES, leaves_raw_data_alone)
    except ValueError:
        return None


def _mapped_here(tensor: onnx.TensorProto) -> bool:
    return external_entries(tensor).get("location") == MAPPED_LOCATION


def external_data_locations(path: Path) -> tuple[str, ...] | None:
    """The external data locations a model file names, without validating anything; None
    when the file is not a readable model (loading it will then fail on its own).

    A batch must know every file it will read before it writes its first output, which
    means parsing every model once up front: about 0.1 s per 100 MB of protobuf.
    """
    model = onnx.ModelProto()
    try:
        with _mapped(path) as serialized:
            split = _split(serialized) if isinstance(serialized, memoryview) else None
            model.ParseFromString(split[0] if split is not None else serialized)
    except Exception:  # noqa: BLE001 - any unreadable file: load_model reports it properly later
        return None
    locations = dict.fromkeys(
        entry.value
        for tensor in all_tensors(model)
        if uses_external_data(tensor) and not _mapped_here(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    )
    return tuple(locations)


_PLACEHOLDER = "bnfold-placeholder.bin"


def _copy_fields(source, target, skip: str) -> None:  # noqa: ANN001 - any protobuf message
    """Copy every set field of ``source`` except ``skip`` into ``target`` (no deep walk)."""
    for descriptor, value in source.ListFields():
        if descriptor.name == skip:
            continue
        if descriptor.is_repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def _needs_stand_in(tensor: onnx.TensorProto) -> bool:
    """Large or external tensors are replaced; a tensor with values in two places is kept, so
    that the checker sees (and rejects) it."""
    if has_conflicting_data(tensor):
        return False
    # The size comes from the shape: load_model checked it against the data.
    return uses_external_data(tensor) or (tensor.HasField("raw_data") and (data_bytes(tensor) or 0) > SMALL_TENSOR_BYTES)


def _stand_in(tensor: onnx.TensorProto) -> onnx.TensorProto:
    stand_in = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    stand_in.data_location = onnx.TensorProto.EXTERNAL
    stand_in.external_data.add(key="location", value=_PLACEHOLDER)
    return stand_in


def weightless_copy(model: onnx.ModelProto, *, dense_sparse: bool = False) -> onnx.ModelProto:
    """The model with each large or external tensor replaced by a stand-in of the same name,
    type and shape whose data lives in an (empty) placeholder file.

    The checker and shape inference only need structure, types and shapes, but handing them
    the model serializes every weight, which costs as much as saving it (and is impossible
    above protobuf's 2 GiB). Small tensors, which may be shapes that inference reads, are kept.
    Subgraph tensors are replaced too, so weights of If branches in external data check alike.
    With ``dense_sparse``, the main graph's sparse initializers become dense stand-ins too: shape
    inference types a sparse initializer as a sparse tensor, which no op takes, and gives up.
    """
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    for tensor in model.graph.initializer:
        skeleton.graph.initializer.append(_stand_in(tensor) if _needs_stand_in(tensor) else tensor)
    if dense_sparse:
        for sparse in skeleton.graph.sparse_initializer:
            values = sparse.values
            skeleton.graph.initializer.append(
                _stand_in(onnx.TensorProto(name=values.name, data_type=values.data_type, dims=sparse.dims)))
        skeleton.graph.ClearField("sparse_initializer")
    for node in skeleton.graph.node:
        for attribute in node.attribute:
            if attribute.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                _stand_in_subgraph_tensors(attribute)
    return skeleton


def _stand_in_subgraph_tensors(attribute: onnx.AttributeProto) -> None:
    graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
    for graph in graphs:
        for tensor in graph.initializer:
            if _needs_stand_in(tensor):
                tensor.CopyFrom(_stand_in(tensor))
        for node in graph.node:
            for inner in node.attribute:
                if inner.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                    _stand_in_subgraph_tensors(inner)


def checker_complaint(model: onnx.ModelProto, *, full_check: bool) -> str | None:
    """What ``onnx.checker`` (optionally with strict shape inference) says against a model's
    structure, in one line; None when it passes.

    Checks a weight-less copy from a scratch folder (see :func:`weightless_copy`), which also
    works above protobuf's 2 GiB limit. The weights' sizes, which the copy leaves out, are
    checked once, on loading: a fold writes its tensors from arrays of the right shape.
    """
    skeleton = weightless_copy(model)
    with tempfile.TemporaryDirectory(prefix="bnfold-check-") as scratch:
        Path(scratch, _PLACEHOLDER).touch()
        skeleton_path = Path(scratch, "model.onnx")
        onnx.save_model(skeleton, str(skeleton_path))
        try:
            onnx.checker.check_model(str(skeleton_path), full_check=full_check)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            return first_line(error)
    return None
