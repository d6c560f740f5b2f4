"""Applying plans (bnfold.rewrite): tensors replaced under their own name or copied when
shared, names that collide with nothing, unused constants removed, IR < 4 inputs declared."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare, op_count

BN = "BatchNormalization"


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _conv_bn_model() -> onnx.ModelProto:
    b = GraphBuilder(seed=0)
    x = b.input("x", [2, 4, 7, 7])
    b.output(b.batchnorm(b.conv(x, 4, 6), 6))
    return b.model()


def test_unused_initializers_are_removed_and_names_kept() -> None:
    model = _conv_bn_model()
    weight_name = model.graph.node[0].input[1]
    check = fold_and_compare(model)
    names = {t.name for t in check.folded.graph.initializer}
    assert weight_name in names, "a weight read only by the Conv keeps its name"
    assert not any(name.startswith(("gamma", "beta", "mean", "var")) for name in names)
    assert check.folded.graph.output[0].name == model.graph.output[0].name
    assert check.folded.graph.node[0].output[0] == model.graph.node[-1].output[0]


def test_shared_weight_is_cloned_and_its_other_user_keeps_the_original() -> None:
    """Two Convs read one weight; only one feeds a BN. The other must be unchanged."""
    b = GraphBuilder(seed=4)
    x = b.input("x", [1, 4, 6, 6])
    weight = b.random("W", [4, 4, 3, 3])
    first = b.node("Conv", [x, weight], pads=[1, 1, 1, 1])
    second = b.node("Conv", [x, weight], pads=[1, 1, 1, 1])
    b.output(b.batchnorm(first, 4))
    b.output(second)
    model = b.model()
    original_weight = _initializer(model, weight)
    check = fold_and_compare(model)
    assert op_count(check.folded, BN) == 0
    convs = [n for n in check.folded.graph.node if n.op_type == "Conv"]
    assert convs[1].input[1] == weight
    np.testing.assert_array_equal(_initializer(check.folded, weight), original_weight)
    assert convs[0].input[1] != weight
    assert any(f"weight '{weight}' is shared" in note for note in check.outcome.folds[0].notes)


def test_weight_shared_by_two_folded_convs_and_a_third_user() -> None:
    b = GraphBuilder(seed=15)
    x = b.input("x", [1, 4, 6, 6])
    weight = b.random("W", [4, 4, 3, 3])
    a = b.batchnorm(b.node("Conv", [x, weight], pads=[1, 1, 1, 1]), 4)
    c = b.batchnorm(b.node("Conv", [a, weight], pads=[1, 1, 1, 1]), 4)
    b.output(b.node("Add", [c, b.node("Conv", [x, weight], pads=[1, 1, 1, 1])]))
    model = b.model()
    check = fold_and_compare(model)
    assert op_count(check.folded, BN) == 0 and len(check.outcome.folds) == 2
    convs = [n for n in check.folded.graph.node if n.op_type == "Conv"]
    weights = [conv.input[1] for conv in convs]
    assert weights[2] == weight and len(set(weights)) == 3
    np.testing.assert_array_equal(_initializer(check.folded, weight), _initializer(model, weight))
    for fold in check.outcome.folds:
        assert any(f"weight '{weight}' is shared" in note for note in fold.notes)


def test_ir3_fold_lists_created_bias_as_input_and_drops_released_ones() -> None:
    b = GraphBuilder(seed=14)
    x = b.input("x", [2, 3, 6, 6])
    y = b.node("Relu", [b.batchnorm(b.conv(x, 3, 4, bias=False), 4)])
    b.output(b.batchnorm(b.conv(y, 4, 4), 4), [2, 4, 6, 6])
    check = fold_and_compare(b.model(opset=9, ir_version=3))  # feeds only "x": every other input is an initializer
    assert op_count(check.folded, BN) == 0
    initializers = {t.name for t in check.folded.graph.initializer}
    assert len(initializers) == 4
    assert {v.name for v in check.folded.graph.input} == initializers | {"x"}
    assert not any(name.startswith(("gamma", "beta", "mean", "var")) for name in initializers)


def test_ir3_bias_given_to_a_matmul_is_declared_as_an_input() -> None:
    """MatMul has no bias input: a rank-2 one becomes a Gemm whose new C must be a graph input too."""
    b = GraphBuilder(seed=17)
    x = b.input("x", [3, 5])
    b.output(b.batchnorm(b.node("MatMul", [x, b.random("W", [5, 4])]), 4), [3, 4])
    check = fold_and_compare(b.model(opset=9, ir_version=3))
    assert [node.op_type for node in check.folded.graph.node] == ["Gemm"]
    declared = {v.name for v in check.folded.graph.input}
    assert {t.name for t in check.folded.graph.initializer} <= declared


def test_new_names_avoid_value_info_outputs_node_names_and_function_bodies() -> None:
    """The names a fold creates collide with nothing the model declares anywhere."""
    b = GraphBuilder(seed=18)
    x = b.input("x", [2, 3, 5])  # rank 3: the MatMul keeps an Add for the shift
    scaled = b.node("Mul", [b.node("MatMul", [x, b.random("W", [5, 4])]), b.random("s", [4])])
    b.output(b.node("Add", [scaled, b.random("t", [4])]), [2, 3, 4])
    b.output(b.node("Neg", [x]), [2, 3, 5])
    model = b.model()
    matmul, _, shift, neg = model.graph.node
    # The first names the rewrite would pick (bias tensor, Add node, the MatMul's new output),
    # declared where only a whole-model search finds them.
    taken = [f"{matmul.name}_bias_bnfold", f"{matmul.name}_add_bnfold", f"{shift.output[0]}_bnfold"]
    model.graph.value_info.append(helper.make_tensor_value_info(taken[0], TensorProto.FLOAT, [4]))
    neg.name = taken[1]
    model.functions.append(helper.make_function(
        "local", "Unused", [taken[2]], ["out"], [helper.make_node("Identity", [taken[2]], ["out"])],
        [helper.make_opsetid("", 17)]))
    model.opset_import.append(helper.make_opsetid("local", 1))
    check = fold_and_compare(model)
    before = {n for node in model.graph.node for n in (*node.input, *node.output, node.name)}
    after = {n for node in check.folded.graph.node for n in (*node.input, *node.output, node.name)}
    after |= {t.name for t in check.folded.graph.initializer}
    created = after - before - {t.name for t in model.graph.initializer}
    assert len(created) == 3 and not created & set(taken), created
