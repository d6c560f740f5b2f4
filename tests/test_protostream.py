"""bnfold.protostream writes exactly what protobuf would, with payloads streamed from buffers.

The reference for every property is protobuf's own serialization of a copy of the
model in which each tensor given a payload has ``raw_data`` set to the payload's bytes
and its other data fields cleared. Models are random: initializers of many dtypes in
raw, typed or external form, nodes with tensor and subgraph attributes, value_info,
functions, training info, metadata, and unknown fields (as a newer onnx would leave
them) on the model, the graph, initializers and nodes.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnfold.io.protostream import PROTOBUF_LIMIT, write_model

# Where a TensorProto can keep its values: what a payload replaces.
DATA_FIELD_NAMES = ("float_data", "int32_data", "string_data", "int64_data", "raw_data",
                    "double_data", "uint64_data", "external_data", "data_location")

NUMERIC_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE,
                 TensorProto.INT8, TensorProto.UINT8, TensorProto.INT32, TensorProto.INT64,
                 TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL)

names = st.text(alphabet="abcxyz_0123456789é/", min_size=1, max_size=8)
small_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3)


@st.composite
def unknown_fields(draw: st.DrawFn, depth: int = 0) -> bytes:
    """Fields numbered far above anything onnx defines, of every wire type, canonically encoded."""
    out = bytearray()
    for _ in range(draw(st.integers(1, 3))):
        number = draw(st.integers(1000, 3000))
        wire_type = draw(st.sampled_from([0, 1, 2, 5] + ([3] if depth < 2 else [])))
        out += encode_varint(number << 3 | wire_type)
        if wire_type == 0:
            out += encode_varint(draw(st.integers(0, 2**64 - 1)))
        elif wire_type == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif wire_type == 5:
            out += draw(st.binary(min_size=4, max_size=4))
        elif wire_type == 2:
            data = draw(st.binary(max_size=20))
            out += encode_varint(len(data)) + data
        else:
            out += draw(unknown_fields(depth + 1)) + encode_varint(number << 3 | 4)
    return bytes(out)


def encode_varint(value: int) -> bytes:
    """Protobuf's varint, written out here from the wire-format spec."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


Message = onnx.ModelProto | onnx.GraphProto | onnx.TensorProto | onnx.NodeProto


def maybe_unknown(draw: st.DrawFn, message: Message) -> None:
    """Sometimes give ``message`` fields its schema does not know, as parsing a newer file would."""
    if draw(st.booleans()):
        message.MergeFromString(draw(unknown_fields()))


@st.composite
def tensors(draw: st.DrawFn, name: str) -> onnx.TensorProto:
    """One tensor with its values in raw_data, in a typed field, as strings, or external."""
    form = draw(st.sampled_from(["raw", "typed", "string", "external"]))
    shape = draw(small_shapes)
    if form == "string":
        values = draw(st.lists(st.binary(max_size=5), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        tensor = helper.make_tensor(name, TensorProto.STRING, shape, values)
    else:
        data_type = draw(st.sampled_from(NUMERIC_TYPES))
        dtype = helper.tensor_dtype_to_np_dtype(data_type)
        seed = draw(st.integers(0, 2**16))
        array = (np.random.default_rng(seed).standard_normal(shape) * 10).astype(dtype)
        if form == "raw":
            tensor = numpy_helper.from_array(array, name)
        elif form == "typed":
            tensor = helper.make_tensor(name, data_type, shape, array.astype(np.float64).ravel().tolist()
                                        if data_type in (TensorProto.FLOAT, TensorProto.DOUBLE)
                                        else array.ravel(), raw=False)
        else:
            tensor = TensorProto(name=name, data_type=data_type, dims=shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", draw(names)), ("offset", "4096"), ("length", str(array.nbytes))):
                tensor.external_data.add(key=key, value=value)
    if draw(st.booleans()):
        tensor.doc_string = draw(st.text(max_size=10))
    if draw(st.booleans()):
        tensor.metadata_props.add(key=draw(names), value=draw(names))
    if draw(st.booleans()):
        tensor.segment.begin, tensor.segment.end = 0, 1
    maybe_unknown(draw, tensor)
    return tensor


@st.composite
def nodes(draw: st.DrawFn, index: int, depth: int = 0) -> onnx.NodeProto:
    """A node with scalar, list, tensor and (not too deep) subgraph attributes."""
    attributes: dict[str, object] = {}
    if draw(st.booleans()):
        attributes["alpha"] = draw(st.floats(allow_nan=False, width=32))
    if draw(st.booleans()):
        attributes["pads"] = draw(st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=4))
    if draw(st.booleans()):
        attributes["mode"] = draw(st.text(max_size=6))
    if draw(st.booleans()):
        attributes["value"] = draw(tensors(f"attr{index}"))
    if depth < 1 and draw(st.booleans()):
        attributes["body"] = draw(graphs(f"body{index}", depth + 1))
    node = helper.make_node(draw(st.sampled_from(["Conv", "Relu", "If", "Custom"])), [f"v{index}"],
                            [f"v{index + 1}"], name=f"n{index}", domain=draw(st.sampled_from(["", "my.domain"])),
                            **attributes)
    maybe_unknown(draw, node)
    return node


@st.composite
def graphs(draw: st.DrawFn, name: str, depth: int = 0) -> onnx.GraphProto:
    count = draw(st.integers(0, 3))
    graph = helper.make_graph(
        [draw(nodes(i, depth)) for i in range(draw(st.integers(0, 3)))],
        name,
        [helper.make_tensor_value_info("v0", TensorProto.FLOAT, draw(small_shapes))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializer=[draw(tensors(f"{name}_w{i}")) for i in range(count)],
        value_info=[helper.make_tensor_value_info(f"v{i}", TensorProto.FLOAT, ["N", 3])
                    for i in range(draw(st.integers(0, 2)))],
        doc_string=draw(st.text(max_size=8)),
    )
    if draw(st.booleans()):
        graph.sparse_initializer.add().values.CopyFrom(draw(tensors(f"{name}_sparse")))
    if draw(st.booleans()):
        graph.metadata_props.add(key="k", value=draw(names))
    if draw(st.booleans()):
        graph.quantization_annotation.add(tensor_name="v0")
    maybe_unknown(draw, graph)
    return graph


@st.composite
def models(draw: st.DrawFn) -> onnx.ModelProto:
    graph = draw(graphs("main"))
    for i in range(draw(st.integers(0, 5))):  # more top-level initializers, the ones payloads replace
        graph.initializer.append(draw(tensors(f"w{i}")))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", draw(st.integers(7, 21)))])
    model.ir_version = draw(st.integers(3, 11))
    if draw(st.booleans()):
        model.producer_name, model.producer_version = draw(names), draw(names)
    if draw(st.booleans()):
        model.domain, model.model_version, model.doc_string = draw(names), draw(st.integers(0, 9)), draw(names)
    if draw(st.booleans()):
        helper.set_model_props(model, {draw(names): draw(names)})
    if draw(st.booleans()):
        model.functions.append(helper.make_function(
            "my.domain", "Fn", ["a"], ["b"], [draw(nodes(0))], [helper.make_opsetid("", 17)]))
    if draw(st.booleans()):
        model.training_info.add().initialization.CopyFrom(draw(graphs("init", 1)))
    if "configuration" in onnx.ModelProto.DESCRIPTOR.fields_by_name and draw(st.booleans()):
        model.configuration.add(name=draw(names), num_devices=2)
    maybe_unknown(draw, model)
    return model


@st.composite
def payloads(draw: st.DrawFn) -> np.ndarray | bytes | bytearray | memoryview | None:
    """None, or a buffer of some kind and dtype, empty and 0-d included."""
    kind = draw(st.sampled_from(["none", "none", "array", "bytes", "bytearray", "memoryview"]))
    if kind == "none":
        return None
    if kind == "array":
        dtype = helper.tensor_dtype_to_np_dtype(draw(st.sampled_from(NUMERIC_TYPES)))
        values = np.random.default_rng(draw(st.integers(0, 99))).standard_normal(draw(small_shapes)) * 5
        return np.asarray(values).astype(dtype)  # a 0-d array stays an array
    data = draw(st.binary(max_size=300))
    return {"bytes": data, "bytearray": bytearray(data), "memoryview": memoryview(data)}[kind]


def reference(model: onnx.ModelProto, chosen: list[object]) -> onnx.ModelProto:
    """What protobuf itself writes: a copy whose tensors got their payload as raw_data."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor, buffer in zip(copy.graph.initializer, chosen):
        if buffer is None:
            continue
        for field in DATA_FIELD_NAMES:
            tensor.ClearField(field)
        tensor.raw_data = buffer.tobytes() if isinstance(buffer, np.ndarray) else bytes(buffer)
    return copy


def written(model: onnx.ModelProto, chosen: list[object]) -> bytes:
    by_name = {tensor.name: buffer for tensor, buffer in zip(model.graph.initializer, chosen)}
    out = io.BytesIO()
    size = write_model(model, out, lambda tensor: by_name[tensor.name])
    assert size == len(out.getvalue())
    return out.getvalue()


def unique_names(model: onnx.ModelProto) -> bool:
    return len({tensor.name for tensor in model.graph.initializer}) == len(model.graph.initializer)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(models())
def test_without_payloads_the_output_is_protobufs_serialization(model: onnx.ModelProto) -> None:
    out = io.BytesIO()
    assert write_model(model, out, lambda tensor: None) == model.ByteSize()
    assert out.getvalue() == model.SerializeToString()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_payloads_are_written_as_raw_data_byte_for_byte(data: st.DataObject) -> None:
    model = data.draw(models().filter(unique_names))
    original = model.SerializeToString()
    chosen = [data.draw(payloads()) for _ in model.graph.initializer]
    expected = reference(model, chosen)

    output = written(model, chosen)

    assert output == expected.SerializeToString()
    assert onnx.load(io.BytesIO(output), load_external_data=False) == expected
    assert model.SerializeToString() == original  # the model given is left as it was


def test_a_written_file_loads_and_checks(tmp_path) -> None:  # noqa: ANN001 - pytest fixture
    weight = np.arange(2 * 3 * 3 * 3, dtype=np.float32).reshape(2, 3, 3, 3)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 3, 3])],
        initializer=[helper.make_tensor("w", TensorProto.FLOAT, weight.shape, np.zeros(weight.size).tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "model.onnx"
    with open(path, "wb") as file:
        write_model(model, file, lambda tensor: weight * 2)

    loaded = onnx.load(path)
    onnx.checker.check_model(loaded, full_check=True)
    assert not loaded.graph.initializer[0].float_data
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weight * 2)


class RecordingFile(io.BytesIO):
    """A file that keeps every object it was asked to write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[object] = []

    def write(self, data) -> int:  # noqa: ANN001 - any buffer
        self.writes.append(data)
        return super().write(data)


def test_an_array_payload_is_written_from_its_own_memory() -> None:
    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float16)
    initializer = numpy_helper.from_array(np.zeros((64, 32), np.float16), "w")
    model = helper.make_model(helper.make_graph([], "g", [], [], initializer=[initializer]))
    out = RecordingFile()
    write_model(model, out, lambda tensor: weight)
    assert any(isinstance(chunk, memoryview) and np.shares_memory(np.frombuffer(chunk, np.uint8), weight)
               for chunk in out.writes)


def test_payload_is_asked_for_top_level_initializers_only_once_each_in_order() -> None:
    body = helper.make_graph([], "body", [], [], initializer=[numpy_helper.from_array(np.ones(3, np.float32), "inner")])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)], "g", [], [],
        initializer=[numpy_helper.from_array(np.ones(2, np.float32), name) for name in ("a", "b", "c")],
    )
    asked: list[str] = []
    write_model(helper.make_model(graph), io.BytesIO(), lambda tensor: asked.append(tensor.name))
    assert asked == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (np.ones(4, dtype=">f4"), "big-endian"),
        (np.ones((4, 4), np.float32)[:, ::2], "not C-contiguous"),
        (memoryview(bytes(16))[::2], "not one contiguous block"),
    ],
)
def test_a_buffer_that_is_not_raw_data_as_it_is_is_refused_before_writing(payload: object, fragment: str) -> None:
    graph = helper.make_graph([], "g", [], [], initializer=[numpy_helper.from_array(np.zeros(8, np.float32), "w")])
    out = io.BytesIO()
    with pytest.raises(ValueError, match=fragment):
        write_model(helper.make_model(graph), out, lambda tensor: payload)
    assert out.getvalue() == b""


def test_a_model_past_protobufs_2_gib_limit_is_refused_before_writing() -> None:
    # Below the limit alone, above it with the tensor's and graph's framing. np.zeros maps
    # untouched pages: 2 GiB of address space, no memory used.
    huge = np.zeros(PROTOBUF_LIMIT - 16, np.uint8)
    graph = helper.make_graph([], "g", [], [], initializer=[numpy_helper.from_array(np.zeros(1, np.uint8), "w")])
    out = io.BytesIO()
    with pytest.raises(ValueError, match="external data"):
        write_model(helper.make_model(graph), out, lambda tensor: huge)
    assert out.getvalue() == b""
