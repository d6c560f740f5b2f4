"""The graph index (bnfold.graph): what is constant, what a value's shape is, who reads it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfold.graph import AttributeReference, GraphIndex, attribute, attributes, is_standard
from sample_models.modelkit import GraphBuilder


def test_constant_subexpressions_evaluate_and_runtime_values_do_not() -> None:
    b = GraphBuilder(seed=1)
    x = b.input("x", [2, 3])
    weight = b.random("W", [3, 4])
    cast = b.node("Cast", [b.node("Identity", [weight])], to=TensorProto.FLOAT16)
    b.output(b.node("MatMul", [x, b.node("Cast", [cast], to=TensorProto.FLOAT)]))
    b.output(b.node("Relu", [x]))
    graph = GraphIndex(b.model())
    expected = graph.constant_value(weight).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(graph.constant_value(graph.nodes[2].output[0]), expected)
    assert graph.constant_value(x) is None
    assert graph.constant_value(graph.nodes[3].output[0]) is None  # MatMul of a runtime input


@pytest.mark.parametrize(("ir_version", "keep_overridable", "constant"),
                         [(3, False, True), (3, True, True), (8, False, True), (8, True, False)])
def test_an_initializer_listed_as_an_input_is_overridable_only_from_ir4(
        ir_version: int, keep_overridable: bool, constant: bool) -> None:
    """Before IR 4 every initializer is listed and constant; from IR 4 it is a default a caller may
    override, which counts as a constant unless the user keeps it overridable."""
    b = GraphBuilder(seed=2)
    x = b.input("x", [2, 3])
    weight = b.random("W", [3, 4])
    b.output(b.node("MatMul", [x, weight]))
    model = b.model(opset=9, ir_version=3)
    if ir_version >= 4:
        model.ir_version = ir_version
    assert any(value.name == weight for value in model.graph.input)
    graph = GraphIndex(model, keep_overridable=keep_overridable)
    assert (graph.constant_value(weight) is not None) == constant
    assert graph.is_runtime_input(weight) != constant
    assert graph.is_overridable(weight) == (ir_version >= 4)


def test_random_ops_are_never_constants() -> None:
    b = GraphBuilder(seed=3)
    noise = b.node("RandomNormal", [], shape=[2, 2], dtype=TensorProto.FLOAT)
    b.output(b.node("Add", [noise, b.random("c", [2, 2])]))
    graph = GraphIndex(b.model())
    assert graph.constant_value(noise) is None and graph.constant_value(graph.nodes[1].output[0]) is None


def test_castlike_reads_only_the_type_of_its_second_input() -> None:
    b = GraphBuilder(seed=4)
    x = b.input("x", [1, 3])
    zero = b.node("CastLike", [b.const("zero", np.array(0.0, np.float32)), x])
    b.output(b.node("Add", [x, zero]))
    graph = GraphIndex(b.model())
    np.testing.assert_array_equal(graph.constant_value(zero), np.array(0.0, np.float32))


def test_shapes_come_from_declarations_and_inference() -> None:
    b = GraphBuilder(seed=5)
    x = b.input("x", ["batch", 3, 8, 8])
    y = b.conv(x, 3, 4, kernel=(3, 3), pads=[0, 0, 0, 0])
    b.output(b.node("Relu", [y]))
    graph = GraphIndex(b.model())
    assert graph.static_shape(x) == (None, 3, 8, 8)
    assert graph.static_shape(y) == (None, 4, 6, 6)
    assert graph.rank_of(y) == 4 and graph.static_shape("nothing") is None


def test_a_value_read_inside_a_body_counts_as_used_by_its_node() -> None:
    b = GraphBuilder(seed=6)
    x = b.input("x", [2])
    cond = b.input("cond", [], TensorProto.BOOL)
    outer = b.node("Relu", [x])
    then_graph = helper.make_graph([helper.make_node("Neg", [outer], ["t"])], "then", [],
                                   [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_graph = helper.make_graph([helper.make_node("Abs", [outer], ["e"])], "else", [],
                                   [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    b.nodes.append(helper.make_node("If", [cond], ["z"], name="branch", then_branch=then_graph,
                                    else_branch=else_graph))
    b.output("z", [2])
    graph = GraphIndex(b.model())
    assert [node.name for node in graph.consumers_of(outer)] == ["branch"]
    assert graph.use_count(outer) == 1


def test_attributes_read_as_values_and_a_function_reference_is_refused() -> None:
    node = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=0.001)
    assert attribute(node, "epsilon") == pytest.approx(0.001) and attribute(node, "momentum", 0.9) == 0.9
    assert attributes(node) == {"epsilon": pytest.approx(0.001)}
    reference = onnx.AttributeProto(name="epsilon", ref_attr_name="eps", type=onnx.AttributeProto.FLOAT)
    node.attribute[0].CopyFrom(reference)
    with pytest.raises(AttributeReference, match="function attribute 'eps'"):
        attribute(node, "epsilon")
    assert is_standard(node) and not is_standard(helper.make_node("Conv", [], [], domain="com.example"))
