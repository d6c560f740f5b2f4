"""Where the values of a model's tensors live, and the one way to read, replace and write them.

A weight may sit in three places: in the protobuf (``raw_data`` or a typed field such as
``float_data``), in an external data file beside the model (read when needed, never all at
once), or, once a fold has replaced it, in a numpy array held by the store until the output is
written. Rules, the rewrite and the writers ask the store and never read or set those fields
themselves, so a weight folded twice, a tensor in a data file and a model of several GB are all
the same to them, and a rewritten tensor never keeps a stale field next to its new data.

A held tensor keeps its name, type and shape in the protobuf, which is all that the checker and
shape inference see of a large weight (:func:`bnfold.io.load.weightless_copy`); its data fields
are replaced by an external-data entry whose location only this store knows.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnfold.io.protostream import MAPPED_LOCATION, FileRange, StreamedArray, is_streamed

SMALL_TENSOR_BYTES = 1024
"""Tensors below this size always live in the protobuf: shape inference may need their values
(a Reshape's shape, Squeeze axes), and moving them elsewhere would save nothing."""

MAP_AT_LEAST = 1 << 16
"""Tensors in a file from this size on are read as a map of the file (:meth:`TensorStore.read`);
smaller ones are read into memory, where a map would cost more than it saves."""

_HELD = "bnfold-held:"
"""Location prefix of a tensor whose values the store holds as an array."""

# Every field of a TensorProto that carries values (besides the external-data entry).
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_TYPED_FIELDS = _DATA_FIELDS[1:]
_KNOWN_TYPES = frozenset(helper.get_all_tensor_dtypes())

# 4-bit types pack two values per byte.
PACKED_TYPES = frozenset(
    getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, name)
)


@dataclass(frozen=True)
class ExternalLocation:
    """Where an external tensor's bytes are: ``length`` bytes at ``offset`` of ``location``."""

    location: str
    offset: int
    length: int


def data_bytes(tensor: onnx.TensorProto) -> int | None:
    """The bytes a tensor's values take in raw form (dims × element size), or None for strings."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    count = math.prod(tensor.dims)
    if tensor.data_type in PACKED_TYPES:
        return (count + 1) // 2
    return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def external_location(tensor: onnx.TensorProto) -> ExternalLocation:
    """The tensor's place in its data file. ``length`` is optional in the spec: when it is
    absent the tensor takes dims × element size bytes from ``offset``.

    Raises:
        ValueError: for an offset or length that is not a non-negative integer, or a tensor
            whose size cannot be known (strings).
    """
    entries = external_entries(tensor)
    offset_text, length_text = entries.get("offset", "0"), entries.get("length")
    if not offset_text.isdigit() or (length_text is not None and not length_text.isdigit()):
        raise ValueError(f"offset '{offset_text}' / length '{length_text}' are not non-negative integers")
    size = data_bytes(tensor)
    if length_text is None and size is None:
        raise ValueError("a string tensor in external data needs a length")
    length = int(length_text) if length_text is not None else size
    return ExternalLocation(entries.get("location", ""), int(offset_text), int(length or 0))


def clear_data(tensor: onnx.TensorProto) -> None:
    """Remove every field that holds values, so a new value can never sit beside a stale one."""
    for name in _DATA_FIELDS:
        tensor.ClearField(name)
    del tensor.external_data[:]
    tensor.ClearField("data_location")


def has_conflicting_data(tensor: onnx.TensorProto) -> bool:
    """Whether values are stored in more than one place (raw_data, a typed field, a data file)."""
    places = tensor.HasField("raw_data") + uses_external_data(tensor)
    places += sum(len(getattr(tensor, name)) > 0 for name in _TYPED_FIELDS)
    return places > 1


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What tells a file apart from a rewritten one: its inode, device, size and modification time."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_ino, status.st_dev, status.st_size, status.st_mtime_ns


def leaves_raw_data_alone(header: onnx.TensorProto) -> bool:
    """Whether a tensor, its ``raw_data`` left out, has nothing else that holds or qualifies its
    values (typed fields, external data, a segment) and a size its shape gives: only then may
    its raw bytes stay in the file while the rest of the model is parsed. Anything unusual is
    parsed whole, so the checks of the loader see it as it is."""
    return (
        not header.HasField("data_location") and not header.external_data and not header.HasField("segment")
        and not any(len(getattr(header, name)) for name in _TYPED_FIELDS)
        and header.data_type in _KNOWN_TYPES and data_bytes(header) is not None
    )


def _array_from_bytes(tensor: onnx.TensorProto, data: bytes | memoryview) -> np.ndarray:
    """The values of ``tensor`` given its raw little-endian bytes."""
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    if tensor.data_type not in PACKED_TYPES and sys.byteorder == "little":
        return np.frombuffer(data, dtype=dtype).reshape(tuple(tensor.dims))
    # Packed 4-bit types and big-endian hosts: let onnx unpack a copy that holds the bytes.
    stand_in = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims, raw_data=bytes(data))
    return numpy_helper.to_array(stand_in)


def _bytes_at(tensor: onnx.TensorProto, place: FileRange) -> bytes:
    """The ``place.length`` bytes of ``tensor`` at ``place``, read whole or refused."""
    with open(place.path, "rb") as data:
        data.seek(place.offset)
        content = data.read(place.length)
    if len(content) != place.length:
        raise OSError(f"external data of '{tensor.name}' ends after {len(content)} of {place.length} bytes")
    return content


class TensorStore:
    """The values of one model's tensors: read wherever they live, replaced as arrays, written once.

    ``base_dir`` is the folder of the model file, where its external data files are (None for a
    model that only exists in memory); ``source`` the model file itself, where the loader left
    its large weights (:data:`~bnfold.io.protostream.MAPPED_LOCATION`: read when a fold needs
    them, copied file to file when the output is written, never parsed into the protobuf).
    """

    def __init__(self, base_dir: Path | None = None, source: Path | None = None) -> None:
        self.base_dir = base_dir
        self.source = source
        self._source_stamp = _stamp(source) if source is not None else None
        self._held: dict[str, np.ndarray | StreamedArray] = {}
        self._issued = 0
        self._read_stamps: dict[Path, tuple[int, int, int, int] | None] = {}
        """Each external data file tensors were read (or mapped) from, as it was when first read."""

    def unchanged_copy(self) -> TensorStore:
        """A store for another fold of the same loaded model: the same files (and the same
        checks that they are still the ones read), none of this store's new values."""
        copy = TensorStore(self.base_dir)
        copy.source, copy._source_stamp = self.source, self._source_stamp
        copy._read_stamps = dict(self._read_stamps)
        return copy

    def check_unchanged(self) -> None:
        """Refuse to go on when the model file, or a data file that tensors were read from,
        changed since: the output would mix two versions of the model, and values computed
        from a map of a file cut short would end the process (SIGBUS).

        Raises:
            OSError: naming the file.
        """
        stamps = dict(self._read_stamps)
        if self.source is not None:
            stamps[self.source] = self._source_stamp
        for path, stamp in stamps.items():
            if _stamp(path) != stamp:
                raise OSError(f"{path} changed on disk while it was being folded")

    # -- reading -------------------------------------------------------------------------------

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        """The tensor's values (read-only when they are the store's own array)."""
        key = self._key_of(tensor)
        if key is not None:
            held = self._held[key]
            if not isinstance(held, np.ndarray):  # a recipe: computed once, then held as values
                held = self._held[key] = np.asarray(held)
            view = held.view()
            view.flags.writeable = False
            return view
        if uses_external_data(tensor):
            place = self.file_range(tensor)
            mapped = self._mapped(tensor, place)
            return mapped if mapped is not None else _array_from_bytes(tensor, _bytes_at(tensor, place))
        return numpy_helper.to_array(tensor)

    def _mapped(self, tensor: onnx.TensorProto, place: FileRange) -> np.memmap | None:
        """A large tensor's values as a read-only map of its file, or None for one read instead.

        Mapped, a weight costs no memory of its own (the pages are the file's, in the page
        cache), and a fold of it can stay a recipe until it is written
        (:class:`bnfold.fold_math.ScaledWeight`) instead of a copy of every folded weight.
        """
        if tensor.data_type in PACKED_TYPES or sys.byteorder != "little":
            return None
        if place.length < MAP_AT_LEAST or place.length != data_bytes(tensor):
            return None
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        try:
            return np.memmap(place.path, dtype=dtype, mode="r", offset=place.offset, shape=tuple(tensor.dims))
        except ValueError:  # the file is shorter now than when it was loaded
            raise OSError(f"external data of '{tensor.name}' ends before its {place.length} bytes") from None
        except OSError:  # a file system that cannot map files: read it instead
            return None

    def read_sparse(self, sparse: onnx.SparseTensorProto) -> np.ndarray:
        """A sparse initializer's values as the dense array it stands for (zeros elsewhere).

        Its indices are either linear (``[NNZ]``, into the flattened tensor) or coordinates
        (``[NNZ, rank]``); the checker has verified them when the model was loaded.
        """
        values = np.asarray(self.read(sparse.values)).reshape(-1)
        dense = np.zeros(tuple(sparse.dims), dtype=values.dtype)
        indices = np.asarray(self.read(sparse.indices)).astype(np.int64)
        if indices.ndim == 1:
            dense.reshape(-1)[indices] = values
        else:
            dense[tuple(indices.T)] = values
        return dense

    def held_array(self, tensor: onnx.TensorProto) -> np.ndarray | StreamedArray | None:
        """The array a fold gave this tensor (or its recipe), if the store holds it."""
        key = self._key_of(tensor)
        return None if key is None else self._held[key]

    def external_bytes(self, tensor: onnx.TensorProto) -> bytes:
        """The bytes of a tensor kept in a file: the input's external data, or the model file."""
        return _bytes_at(tensor, self.file_range(tensor))

    def file_range(self, tensor: onnx.TensorProto) -> FileRange:
        """Where a tensor that is not held lies on disk (it uses external data)."""
        place = external_location(tensor)
        if place.location == MAPPED_LOCATION:
            if self.source is None:
                raise OSError(f"tensor '{tensor.name}' lies in a model file this store does not know")
            if _stamp(self.source) != self._source_stamp:
                raise OSError(f"{self.source} changed on disk while it was being folded")
            return FileRange(self.source, place.offset, place.length)
        path = (self.base_dir or Path(".")) / place.location
        self._read_stamps.setdefault(path, _stamp(path))
        return FileRange(path, place.offset, place.length)

    # -- replacing -----------------------------------------------------------------------------

    def replace(self, tensor: onnx.TensorProto, values: np.ndarray | StreamedArray) -> None:
        """Give ``tensor`` new values (its name stays; type and shape become the array's).

        A small tensor, or one whose type numpy cannot hand over as raw bytes, goes into the
        protobuf; a large one is held as the array itself (or the recipe that computes it), to
        be written straight from it.
        """
        key = self._key_of(tensor)
        if key is not None:
            del self._held[key]  # a weight folded twice: its first array is dropped
        if not is_streamed(values):
            values = np.asarray(values)
        same_type = tensor.data_type == helper.np_dtype_to_tensor_dtype(values.dtype)
        if same_type and values.nbytes >= SMALL_TENSOR_BYTES and sys.byteorder == "little":
            location = f"{_HELD}{self._issued}"
            self._issued += 1
            self._held[location] = values if is_streamed(values) else np.ascontiguousarray(values)
            del tensor.dims[:]
            tensor.dims.extend(values.shape)
            clear_data(tensor)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value=location)
            return
        name = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(np.asarray(values), name))

    def create(self, name: str, values: np.ndarray | StreamedArray) -> onnx.TensorProto:
        """A new initializer named ``name`` with ``values``, held like a replaced one."""
        dtype = values.dtype if is_streamed(values) else np.asarray(values).dtype
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype))
        self.replace(tensor, values)
        return tensor

    def embed(self, model: onnx.ModelProto) -> None:
        """Put every held array back into its tensor's ``raw_data``: the model then holds all
        its new values itself, as a model handed back in memory must."""
        for tensor in all_tensors(model):
            held = self.take(tensor)
            if held is not None:
                clear_data(tensor)
                tensor.raw_data = np.asarray(held).tobytes()
        self.drop_unclaimed()

    def materialize(self, tensor: onnx.TensorProto) -> onnx.TensorProto:
        """A self-contained copy of ``tensor`` with its values in the protobuf (for a Constant
        node, or a model handed back in memory)."""
        if not uses_external_data(tensor):
            return tensor
        copy = numpy_helper.from_array(np.asarray(self.read(tensor)), tensor.name)
        copy.doc_string = tensor.doc_string
        return copy

    def _key_of(self, tensor: onnx.TensorProto) -> str | None:
        if not uses_external_data(tensor):
            return None
        location = external_entries(tensor).get("location", "")
        return location if location in self._held else None

    # -- writing -------------------------------------------------------------------------------

    def take(self, tensor: onnx.TensorProto) -> np.ndarray | StreamedArray | None:
        """Hand a held tensor's array (or recipe) over to a writer, which owns it from then on."""
        key = self._key_of(tensor)
        return None if key is None else self._held.pop(key)

    def drop_unclaimed(self) -> None:
        """Forget arrays no tensor claimed while the model was written (tensors folds removed)."""
        self._held.clear()


def all_tensors(model: onnx.ModelProto, *, top_level: bool = True) -> Iterator[onnx.TensorProto]:
    """Every tensor of the model that can hold weights: initializers of every graph and
    subgraph, and tensor attributes (Constant nodes) in graphs and functions; without the
    main graph's initializers when ``top_level`` is False."""
    pending: list[onnx.GraphProto] = [model.graph]
    node_lists = [function.node for function in model.functions]
    main_graph = True  # popped first
    while pending:
        graph = pending.pop()
        if top_level or not main_graph:
            yield from graph.initializer
        main_graph = False
        node_lists.append(graph.node)
        while node_lists:
            for node in node_lists.pop():
                for attribute in node.attribute:
                    if attribute.type == onnx.AttributeProto.TENSOR:
                        yield attribute.t
                    elif attribute.type == onnx.AttributeProto.TENSORS:
                        yield from attribute.tensors
                    elif attribute.type == onnx.AttributeProto.GRAPH:
                        pending.append(attribute.g)
                    elif attribute.type == onnx.AttributeProto.GRAPHS:
                        pending.extend(attribute.graphs)
