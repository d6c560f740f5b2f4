"""Protobuf's wire format where onnx's own reader and writer cost a copy of every weight.

Writing: a ModelProto whose weights come straight from arrays, in one sequential pass.
Reading: the sizes of the initializers' ``raw_data``, from the bytes of the file, where
protobuf's Python API would copy each weight just to say how long it is.

``onnx.save`` serializes the whole model into one bytes object before writing it, so
every weight is copied at least once more than the file needs: a weight computed
as a numpy array must first be copied into the protobuf (``raw_data``), which
``SerializeToString`` then copies again. :func:`write_model` instead asks, for each
top-level initializer, for the buffer that holds its data and writes that buffer
to the file itself, framed as the tensor's ``raw_data`` field; everything else
(nodes, small tensors, subgraphs, functions) is serialized by protobuf.

This works because protobuf writes a message's fields in field-number order, each
as a tag, for messages a varint length, then the bytes, with fields it could not
parse ("unknown fields", e.g. from a newer onnx) last. So the file is:

    ModelProto fields numbered below graph (7)
    graph: tag, length
        GraphProto fields numbered below initializer (5)      (nodes, name)
        for each initializer: tag, length
            TensorProto fields numbered below raw_data (9)    (dims, data_type, name…)
            raw_data: tag, length, the payload's bytes        (written from the buffer)
            TensorProto fields above raw_data, unknown fields
        GraphProto fields above initializer, unknown fields
    ModelProto fields above graph, unknown fields

Every length is a varint that precedes what it measures, so the sizes of the graph
and of each tensor are computed first (skeleton parts serialized, payload sizes
added), then the file is written front to back with no seek.

The result is byte for byte what ``SerializeToString`` gives for a copy of the model
in which each tensor that got a payload has ``raw_data`` set to it and its other
data fields (typed ``*_data``, ``external_data``, ``data_location``) cleared; with
no payload at all it is ``model.SerializeToString()``. One exception: unknown fields
of the model, the main graph and its initializers are written from their parsed
values in protobuf's canonical encoding (the Python API does not hand out their
original bytes), so a file that spelled them with over-long varints gets them back
canonical, which is the same message. Unknown fields anywhere else are copied by
protobuf as they are.

Protobuf cannot parse a message of 2 GiB or more, so a model that would exceed
that is refused before anything is written: weights that large belong in an
external data file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, TypeGuard

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet


@dataclass(frozen=True)
class FileRange:
    """``length`` bytes at ``offset`` of the file at ``path``: a payload copied from file to
    file (``os.copy_file_range``), never through this process's memory."""

    path: Path
    offset: int
    length: int


Buffer = np.ndarray | bytes | bytearray | memoryview
"""What a payload may be: a numpy array of any dtype (bfloat16 too), or any other
object with the buffer protocol that holds one contiguous block."""


class StreamedArray(Protocol):
    """An array whose values are computed as they are written (a folded weight kept as a
    recipe, :class:`bnfold.fold_math.ScaledWeight`): its size is known up front, its bytes
    come in consecutive pieces, each written before the next is asked for; ``numpy.asarray``
    gives the whole array."""

    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int

    def pieces(self) -> Iterator[np.ndarray]: ...

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray: ...


def is_streamed(value: object) -> TypeGuard[StreamedArray]:
    """Whether ``value`` is a :class:`StreamedArray` (an attribute look-up: a runtime-checked
    protocol costs more than the rest of writing a small tensor)."""
    return hasattr(type(value), "pieces")


Payload = Buffer | FileRange | StreamedArray
_BUFFER_TYPES = (np.ndarray, np.generic, bytes, bytearray, memoryview)

# Protobuf's parsers refuse a message of 2 GiB or more (its sizes are signed 32-bit).
PROTOBUF_LIMIT = 2**31 - 1

_GRAPH = onnx.ModelProto.GRAPH_FIELD_NUMBER
_INITIALIZER = onnx.GraphProto.INITIALIZER_FIELD_NUMBER
_RAW_DATA = onnx.TensorProto.RAW_DATA_FIELD_NUMBER
# A payload replaces every place a tensor can keep its values.
_DATA_FIELDS = frozenset(
    onnx.TensorProto.DESCRIPTOR.fields_by_name[name].number
    for name in ("float_data", "int32_data", "string_data", "int64_data", "raw_data",
                 "double_data", "uint64_data", "external_data", "data_location")
)

_VARINT, _FIXED64, _LENGTH_DELIMITED, _START_GROUP, _END_GROUP, _FIXED32 = range(6)


def write_model(
    model: onnx.ModelProto, file: BinaryIO, payload: Callable[[onnx.TensorProto], Payload | None]
) -> int:
    """Write ``model`` to ``file``, each top-level initializer's data from ``payload``.

    ``payload(tensor)`` is called once per initializer of ``model.graph``, in order,
    before anything is written; a buffer it returns becomes that tensor's
    ``raw_data`` (little-endian values, as ONNX stores them) and the tensor's other
    data fields are not written; ``None`` writes the tensor as it is. Buffers must
    stay unchanged until this returns; they are written without being copied.
    The model itself is not modified.

    Returns:
        The number of bytes written.

    Raises:
        ValueError: the model would reach protobuf's 2 GiB limit, or a buffer is not
            one contiguous block of little-endian bytes. Nothing is written then.
    """
    chunks = _model_chunks(model, payload)
    total = sum(_length(chunk) for chunk in chunks)
    if total > PROTOBUF_LIMIT:
        raise ValueError(
            f"the model would be {total:,} bytes, above protobuf's limit of {PROTOBUF_LIMIT:,}: "
            "onnx cannot read it back; save its weights as external data"
        )
    for chunk in chunks:
        write_payload(file, chunk)
    return total


def write_payload(file: BinaryIO, payload: Payload) -> None:
    """Append one payload's bytes to ``file``: copied from its file, written from memory, or
    computed piece by piece."""
    if isinstance(payload, FileRange):
        copy_range(payload, file)
    elif isinstance(payload, _BUFFER_TYPES):
        write_buffer(file, payload)
    else:
        for piece in payload.pieces():
            write_buffer(file, piece)


def payload_length(payload: Payload) -> int:
    """The bytes ``payload`` writes."""
    if isinstance(payload, FileRange):
        return payload.length
    if isinstance(payload, _BUFFER_TYPES):
        return len(_byte_view(payload))
    return payload.nbytes


_Chunk = bytes | memoryview | FileRange | StreamedArray


def _model_chunks(
    model: onnx.ModelProto, payload: Callable[[onnx.TensorProto], Payload | None]
) -> list[_Chunk]:
    """The file's bytes in order, as small serialized pieces and the payloads' views."""
    if not model.HasField("graph"):
        return [model.SerializeToString()]
    graph = model.graph
    graph_chunks: list[_Chunk] = [*_fields_below(graph, _INITIALIZER)]
    for tensor in graph.initializer:
        buffer = payload(tensor)
        if buffer is None:
            serialized = tensor.SerializeToString()
            graph_chunks += [_length_delimited_header(_INITIALIZER, len(serialized)), serialized]
        else:
            data = _byte_view(buffer) if isinstance(buffer, _BUFFER_TYPES) else buffer
            head = _fields_below(tensor, _RAW_DATA, skip=_DATA_FIELDS)
            head.append(_length_delimited_header(_RAW_DATA, _length(data)))
            tail = _fields_above(tensor, _RAW_DATA, skip=_DATA_FIELDS)
            size = sum(map(len, head)) + _length(data) + sum(map(len, tail))
            graph_chunks += [_length_delimited_header(_INITIALIZER, size), *head, data, *tail]
    graph_chunks += _fields_above(graph, _INITIALIZER)
    graph_size = sum(_length(chunk) for chunk in graph_chunks)
    return [
        *_fields_below(model, _GRAPH),
        _length_delimited_header(_GRAPH, graph_size),
        *graph_chunks,
        *_fields_above(model, _GRAPH),
    ]


def _length(chunk: _Chunk) -> int:
    return len(chunk) if isinstance(chunk, (bytes, memoryview)) else payload_length(chunk)


def copy_range(source: FileRange, file: BinaryIO) -> None:
    """Append ``source``'s bytes to ``file`` (flushed first) from file to file in the kernel,
    or in pieces through memory where the system cannot (another file system, no support)."""
    file.flush()
    target = file.fileno()
    with open(source.path, "rb", buffering=0) as original:
        offset, left = source.offset, source.length
        while left:
            try:
                copied = os.copy_file_range(original.fileno(), target, min(left, 1 << 30), offset)
            except OSError:
                copied = 0
            if copied == 0:  # not supported here, or the file ends early: read it
                piece = os.pread(original.fileno(), min(left, 1 << 24), offset)
                if not piece:
                    raise OSError(f"{source.path} ends {left} bytes short of its tensor's data")
                copied = os.write(target, piece)
            offset += copied
            left -= copied


def _byte_view(buffer: Buffer) -> memoryview:
    """``buffer``'s bytes as a flat memoryview over the same memory (no copy).

    A numpy array is viewed as bytes whatever its dtype (the buffer protocol knows
    no bfloat16 or float8); it must be C-contiguous and little-endian, the layout
    of ``raw_data``, since converting it would be the copy this module avoids.
    """
    if isinstance(buffer, np.generic):
        buffer = np.asarray(buffer)  # a numpy scalar: one value, as a 0-d array
    if isinstance(buffer, np.ndarray):
        byte_order = buffer.dtype.byteorder
        if byte_order == ">" or (byte_order == "=" and sys.byteorder == "big"):
            raise ValueError(f"payload array is big-endian ({buffer.dtype}); raw_data is little-endian")
        if not buffer.flags.c_contiguous:
            raise ValueError("payload array is not C-contiguous; raw_data is one contiguous block")
        return buffer.reshape(-1).view(np.uint8).data
    try:
        return memoryview(buffer).cast("B")
    except TypeError as error:
        raise ValueError(f"payload is not one contiguous block of bytes ({error})") from None


# Pieces written per call. Writing a large numpy array (memory numpy backs with huge
# pages) in one call ran at 0.6 GB/s in the kernel's copy into the page cache, in pieces
# of 1 MiB at 3.9 GB/s (1.0 GB: 1.76 s -> 0.26 s; 4 MiB pieces were already 0.7-1.1 s).
_WRITE_PIECE = 1 << 20


def write_buffer(file: BinaryIO, buffer: Buffer) -> None:
    """Write every byte of ``buffer`` (bytes, or a numpy array as :func:`_byte_view` reads
    it) to ``file`` in pieces of ``_WRITE_PIECE``; an unbuffered file may accept less."""
    view = _byte_view(buffer)
    for start in range(0, len(view), _WRITE_PIECE):
        piece = view[start : start + _WRITE_PIECE]
        while piece:
            written = file.write(piece)
            if written is None or written >= len(piece):
                break
            piece = piece[written:]


# -- protobuf wire format ---------------------------------------------------------------------


def _varint(value: int) -> bytes:
    """Base-128 encoding, low group first, as protobuf writes tags and lengths."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _length_delimited_header(number: int, length: int) -> bytes:
    return _tag(number, _LENGTH_DELIMITED) + _varint(length)


def _fields_below(message: Message, number: int, skip: frozenset[int] = frozenset()) -> list[bytes]:
    """Serialized fields of ``message`` numbered below ``number`` (less ``skip``), in order."""
    chosen = (field for field in message.ListFields() if field[0].number < number and field[0].number not in skip)
    return _serialized_fields(message, chosen)


def _fields_above(message: Message, number: int, skip: frozenset[int] = frozenset()) -> list[bytes]:
    """Serialized fields of ``message`` numbered above ``number`` (less ``skip``),
    then its unknown fields, which protobuf writes after all known ones."""
    chosen = (field for field in message.ListFields() if field[0].number > number and field[0].number not in skip)
    unknown = _unknown_fields(UnknownFieldSet(message))
    return _serialized_fields(message, chosen) + ([unknown] if unknown else [])


def _serialized_fields(message: Message, fields: Iterable[tuple[FieldDescriptor, object]]) -> list[bytes]:
    """Each field as protobuf writes it: a message (or each element of a repeated one)
    framed around its own serialization, anything else through a one-field message of
    the same type, which gets packing, zigzag and presence right by construction."""
    chunks: list[bytes] = []
    for descriptor, value in sorted(fields, key=lambda field: field[0].number):
        if descriptor.type == FieldDescriptor.TYPE_MESSAGE:
            for element in value if descriptor.is_repeated else (value,):  # type: ignore[attr-defined]
                serialized = element.SerializeToString()
                chunks += [_length_delimited_header(descriptor.number, len(serialized)), serialized]
            continue
        single = type(message)()
        if descriptor.is_repeated:
            getattr(single, descriptor.name).extend(value)
        elif descriptor.type == FieldDescriptor.TYPE_GROUP:
            getattr(single, descriptor.name).CopyFrom(value)
        else:
            setattr(single, descriptor.name, value)
        chunks.append(single.SerializeToString())
    return chunks


def _unknown_fields(fields: UnknownFieldSet) -> bytes:
    """Unknown fields re-encoded from their parsed values, in the order they were read."""
    out = bytearray()
    for field in fields:
        number, wire_type, data = field.field_number, field.wire_type, field.data
        out += _tag(number, wire_type)
        if wire_type == _VARINT:
            out += _varint(data)
        elif wire_type == _FIXED64:
            out += data.to_bytes(8, "little")
        elif wire_type == _FIXED32:
            out += data.to_bytes(4, "little")
        elif wire_type == _LENGTH_DELIMITED:
            out += _varint(len(data)) + data
        elif wire_type == _START_GROUP:
            out += _unknown_fields(data) + _tag(number, _END_GROUP)
        else:
            raise ValueError(f"unknown field {number} has wire type {wire_type}, which protobuf does not define")
    return bytes(out)


# -- reading sizes ------------------------------------------------------------------------------


def _read_varint(data: bytes | memoryview, position: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it."""
    value, shift = 0, 0
    while True:
        if position >= len(data):
            raise ValueError("truncated varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _fields(data: bytes | memoryview, start: int, end: int) -> Iterable[tuple[int, int, int, int, int]]:
    """``(number, wire type, field start, start, end)`` of each field between ``start`` and
    ``end``: where its tag begins, and where its value does and ends (for a length-delimited
    field, start and end enclose its bytes)."""
    position = start
    while position < end:
        field_start = position
        key, position = _read_varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, after = _read_varint(data, position)
        elif wire_type == _FIXED64:
            after = position + 8
        elif wire_type == _FIXED32:
            after = position + 4
        elif wire_type == _LENGTH_DELIMITED:
            length, position = _read_varint(data, position)
            after = position + length
        else:  # groups do not occur in ONNX's messages
            raise ValueError(f"field {number} has wire type {wire_type}")
        if after > end:
            raise ValueError(f"field {number} runs past the end of its message")
        yield number, wire_type, field_start, position, after
        position = after


def initializer_data_lengths(serialized: bytes | memoryview) -> list[int | None]:
    """The length of ``raw_data`` of each initializer of a serialized ModelProto's graph, in
    order (None where a tensor has no raw_data), read from the wire format.

    The graph's initializers are parsed in the order their fields appear, so entry i is
    ``model.graph.initializer[i]`` of the parsed model. Only the framing is read: the cost
    is a few steps per field, none per byte of weight.

    Raises:
        ValueError: the bytes are not a well-formed message.
    """
    lengths: list[int | None] = []
    for number, wire_type, _, start, end in _fields(serialized, 0, len(serialized)):
        if number != _GRAPH or wire_type != _LENGTH_DELIMITED:
            continue
        for inner, inner_type, _, tensor_start, tensor_end in _fields(serialized, start, end):
            if inner != _INITIALIZER or inner_type != _LENGTH_DELIMITED:
                continue
            raw: int | None = None
            for field, field_type, _, data_start, data_end in _fields(serialized, tensor_start, tensor_end):
                if field == _RAW_DATA and field_type == _LENGTH_DELIMITED:
                    raw = data_end - data_start  # the last one wins, as in protobuf
            lengths.append(raw)
    return lengths


# -- a model's weights apart from its structure -------------------------------------------------


MAPPED_LOCATION = "\x00bnfold-mapped"
"""The external-data location of an initializer :func:`split_raw_initializers` took out: a
name no file can have (it starts with a NUL byte), so it never stands for a real data file,
and a model that declares it itself is refused on loading."""


@dataclass(frozen=True)
class RawInitializer:
    """A top-level initializer whose values are ``length`` raw bytes at ``offset`` of the file."""

    name: str
    data_type: int
    dims: tuple[int, ...]
    offset: int
    length: int


def split_raw_initializers(
    serialized: bytes | memoryview, min_bytes: int, keep: Callable[[onnx.TensorProto], bool]
) -> tuple[bytes, list[RawInitializer]] | None:
    """A serialized ModelProto cut in two: its structure (bytes of a model whose large raw
    initializers are stand-ins with external data at a placeholder location), and where each
    such initializer's bytes are in ``serialized``.

    An initializer is taken out when its ``raw_data`` has at least ``min_bytes`` and ``keep``
    (given its header, values left out) says so; the structure is the file's own bytes with
    only those tensors re-encoded, so whoever builds a model from it and the bytes at the
    returned offsets has exactly the file. None for a layout this does not handle (the graph
    split over several fields).

    Raises:
        ValueError: the bytes are not a well-formed message.
    """
    graphs = [(field_start, start, end) for number, wire_type, field_start, start, end
              in _fields(serialized, 0, len(serialized)) if number == _GRAPH and wire_type == _LENGTH_DELIMITED]
    if len(graphs) != 1:
        return None
    graph_field_start, graph_start, graph_end = graphs[0]
    pieces: list[bytes | memoryview] = []
    taken: list[RawInitializer] = []
    position = graph_start
    for number, wire_type, field_start, start, end in _fields(serialized, graph_start, graph_end):
        if number != _INITIALIZER or wire_type != _LENGTH_DELIMITED:
            continue
        raws = [(raw_start, data_start, data_end) for field, field_type, raw_start, data_start, data_end
                in _fields(serialized, start, end) if field == _RAW_DATA and field_type == _LENGTH_DELIMITED]
        if len(raws) != 1 or raws[0][2] - raws[0][1] < min_bytes:
            continue
        raw_start, data_start, data_end = raws[0]
        header = onnx.TensorProto()
        header.ParseFromString(bytes(serialized[start:raw_start]) + bytes(serialized[data_end:end]))
        if not keep(header):
            continue
        taken.append(RawInitializer(header.name, header.data_type, tuple(header.dims), data_start, data_end - data_start))
        header.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", MAPPED_LOCATION), ("offset", data_start), ("length", data_end - data_start)):
            header.external_data.add(key=key, value=str(value))
        stand_in = header.SerializeToString()
        pieces += [serialized[position:field_start], _length_delimited_header(_INITIALIZER, len(stand_in)), stand_in]
        position = end
    pieces.append(serialized[position:graph_end])
    graph = b"".join(bytes(piece) for piece in pieces)
    structure = b"".join((bytes(serialized[:graph_field_start]), _length_delimited_header(_GRAPH, len(graph)), graph,
                          bytes(serialized[graph_end:])))
    return structure, taken
