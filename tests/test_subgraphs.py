"""Folding inside If/Loop/Scan bodies and model-local functions, proven in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from bnfold.inputs import generate_inputs, input_specs
from sample_models.modelkit import DEFAULT_IR_VERSION, GraphBuilder
from tests.hostile_support import count_ops
from tests.support import fold_and_compare

BN = "BatchNormalization"


def _value(name: str, shape: list[int | str] | None, elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def _if_model(*, else_reads_conv_output: bool = False) -> onnx.ModelProto:
    """then: Conv→BN with the body's own weight; else: Conv→BN reading a weight and
    BN parameters that are initializers of the top-level graph."""
    b = GraphBuilder(seed=20)
    x = b.input("x", [1, 3, 6, 6])
    cond = b.input("cond", [], TensorProto.BOOL)
    outer_weight = b.random("W_outer", [4, 3, 3, 3])
    outer_bn = b.batchnorm_parameters(4)
    top = b.conv(x, 3, 4)
    with b.collecting() as (then_nodes, then_initializers):
        then_out = b.batchnorm(b.conv(top, 4, 4), 4)
    then_branch = helper.make_graph(then_nodes, "then", [], [_value(then_out, [1, 4, 6, 6])], then_initializers)
    with b.collecting() as (else_nodes, else_initializers):
        else_conv = b.node("Conv", [x, outer_weight], pads=[1, 1, 1, 1])
        else_out = b.node(BN, [else_conv, *outer_bn])
        if else_reads_conv_output:
            else_out = b.node("Add", [else_out, b.node("Relu", [else_conv])])
    else_branch = helper.make_graph(else_nodes, "else", [], [_value(else_out, [1, 4, 6, 6])], else_initializers)
    b.nodes.append(helper.make_node("If", [cond], ["y"], name="branch", then_branch=then_branch, else_branch=else_branch))
    b.output("y", [1, 4, 6, 6])
    return b.model()


def test_if_branches_fold_with_their_own_and_outer_scope_weights() -> None:
    model = _if_model()
    seen_conditions = set()
    for seed in range(4):
        seen_conditions.add(bool(generate_inputs(input_specs(model, {}), seed)["cond"]))
        check = fold_and_compare(model, seed=seed)
    assert seen_conditions == {True, False}  # both branches ran in onnxruntime
    assert count_ops(check.folded, BN) == 0
    assert sorted(fold.batchnorm for fold in check.outcome.folds) == [
        "If 'branch' else_branch / batchnormalization1",
        "If 'branch' then_branch / batchnormalization0",
    ]
    top_initializers = {tensor.name for tensor in check.folded.graph.initializer}
    # Only the else branch read W_outer and the outer BN parameters: they are gone.
    assert not top_initializers & {"W_outer0", "gamma0", "beta0", "mean0", "var0"}
    assert top_initializers == {"W0", "b0"}


def test_bn_left_in_a_branch_is_labelled_with_its_place() -> None:
    check = fold_and_compare(_if_model(else_reads_conv_output=True))
    assert count_ops(check.folded, BN) == 1
    (left,) = check.outcome.left
    assert left.batchnorm == "If 'branch' else_branch / batchnormalization1"
    assert left.reason == "Conv 'conv2' output also feeds Relu 'relu0'"
    assert "W_outer0" in {tensor.name for tensor in check.folded.graph.initializer}


def test_value_read_inside_a_body_counts_as_a_use() -> None:
    b = GraphBuilder(seed=21)
    x = b.input("x", [1, 3, 5, 5])
    cond = b.input("cond", [], TensorProto.BOOL)
    conv = b.conv(x, 3, 4)
    y = b.batchnorm(conv, 4)
    with b.collecting() as (then_nodes, _):
        then_out = b.node("Relu", [conv])
    with b.collecting() as (else_nodes, _):
        else_out = b.node("Neg", [y])
    b.nodes.append(helper.make_node(
        "If", [cond], ["z"], name="branch",
        then_branch=helper.make_graph(then_nodes, "then", [], [_value(then_out, [1, 4, 5, 5])]),
        else_branch=helper.make_graph(else_nodes, "else", [], [_value(else_out, [1, 4, 5, 5])]),
    ))
    b.output("z", [1, 4, 5, 5])
    check = fold_and_compare(b.model())
    (left,) = check.outcome.left
    assert left.reason == "Conv 'conv0' output also feeds If 'branch'"


def test_loop_body_conv_bn_folds() -> None:
    b = GraphBuilder(seed=22)
    x = b.input("x", [1, 4, 5, 5])
    trips = b.const("trips", np.array(3, dtype=np.int64))
    keep_going = b.const("keep_going", np.array(True))
    with b.collecting() as (nodes, initializers):
        carried = b.node("Relu", [b.batchnorm(b.conv("x_in", 4, 4), 4)])
        cond_out = b.node("Identity", ["cond_in"])
    body = helper.make_graph(
        nodes, "body",
        [_value("i", [], TensorProto.INT64), _value("cond_in", [], TensorProto.BOOL), _value("x_in", [1, 4, 5, 5])],
        [_value(cond_out, [], TensorProto.BOOL), _value(carried, [1, 4, 5, 5])],
        initializers,
    )
    b.nodes.append(helper.make_node("Loop", [trips, keep_going, x], ["y"], name="repeat", body=body))
    b.output("y", [1, 4, 5, 5])
    check = fold_and_compare(b.model())
    assert count_ops(check.folded, BN) == 0
    (fold,) = check.outcome.folds
    assert fold.batchnorm == "Loop 'repeat' body / batchnormalization0" and fold.target == "Conv 'conv0'"


def test_scan_body_gemm_bn_folds() -> None:
    b = GraphBuilder(seed=23)
    sequence = b.input("sequence", [3, 2, 6])
    with b.collecting() as (nodes, initializers):
        step = b.batchnorm(b.gemm("item", 6, 5), 5)
    body = helper.make_graph(nodes, "body", [_value("item", [2, 6])], [_value(step, [2, 5])], initializers)
    b.nodes.append(helper.make_node("Scan", [sequence], ["steps"], name="scan", body=body, num_scan_inputs=1))
    b.output("steps", [3, 2, 5])
    check = fold_and_compare(b.model())
    assert count_ops(check.folded, BN) == 0
    (fold,) = check.outcome.folds
    assert fold.batchnorm == "Scan 'scan' body / batchnormalization0"


def _function_model() -> onnx.ModelProto:
    """Function 'Block': Conv→BN with Constant-node weights (folds) and Conv→BN with
    the weight passed in by the caller (a function input: refused)."""
    b = GraphBuilder(seed=24)
    with b.collecting() as (nodes, _):
        own = b.batchnorm(b.node("Conv", ["inp", b.random("Wf", [4, 4, 1, 1], as_node=True)]), 4, constant_nodes=True)
        passed = b.batchnorm(b.node("Conv", [own, "weight"]), 4, constant_nodes=True)
    block = helper.make_function(
        "local", "Block", ["inp", "weight"], [passed], nodes,
        opset_imports=[helper.make_opsetid("", 17)],
    )
    x = b.input("x", [1, 4, 5, 5])
    weight = b.random("W", [4, 4, 1, 1])
    b.nodes.append(helper.make_node("Block", [x, weight], ["y"], name="call", domain="local"))
    graph = helper.make_graph(b.nodes, "main", b.inputs, [_value("y", [1, 4, 5, 5])], b.initializers)
    model = helper.make_model(
        graph, functions=[block], ir_version=DEFAULT_IR_VERSION,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def test_model_local_function_with_a_weight_passed_in_is_inlined_and_every_bn_folds() -> None:
    """The second Conv takes its weight from the call: inside the function its BN cannot fold,
    so the function is inlined, and both BNs fold in the main graph."""
    check = fold_and_compare(_function_model())
    assert not check.folded.functions and check.outcome.inlined_functions == ["Block"]
    assert [node.op_type for node in check.folded.graph.node].count("Conv") == 2
    assert count_ops(check.folded, BN) == 0 and not check.outcome.left
    assert len(check.outcome.folds) == 2


def test_model_local_function_with_constant_weights_folds_inside_and_stays() -> None:
    model = _function_model()
    (block,) = model.functions
    first, second = (node for node in block.node if node.op_type == "Conv")
    second.input[1] = first.input[1]  # both Convs read the function's own constant
    check = fold_and_compare(model)
    assert not check.outcome.inlined_functions
    (function,) = check.folded.functions
    ops = [node.op_type for node in function.node]
    assert ops.count(BN) == 0 and ops.count("Conv") == 2
    assert [fold.batchnorm for fold in check.outcome.folds] == [
        "function 'Block' / batchnormalization0", "function 'Block' / batchnormalization1"]


def test_outer_weight_shared_by_a_body_a_top_level_fold_and_a_plain_user_keeps_its_values() -> None:
    b = GraphBuilder(seed=25)
    x = b.input("x", [1, 4, 5, 5])
    cond = b.input("cond", [], TensorProto.BOOL)
    weight = b.random("W", [4, 4, 3, 3])
    top = b.batchnorm(b.node("Conv", [x, weight], pads=[1, 1, 1, 1]), 4)
    plain = b.node("Conv", [x, weight], pads=[1, 1, 1, 1])
    with b.collecting() as (then_nodes, then_initializers):
        then_out = b.batchnorm(b.node("Conv", [top, weight], pads=[1, 1, 1, 1]), 4)
    with b.collecting() as (else_nodes, _):
        else_out = b.node("Neg", [top])
    b.nodes.append(helper.make_node(
        "If", [cond], ["z"], name="branch",
        then_branch=helper.make_graph(then_nodes, "then", [], [_value(then_out, [1, 4, 5, 5])], then_initializers),
        else_branch=helper.make_graph(else_nodes, "else", [], [_value(else_out, [1, 4, 5, 5])]),
    ))
    b.output(b.node("Add", ["z", plain]), [1, 4, 5, 5])
    model = b.model()
    for seed in range(4):
        check = fold_and_compare(model, seed=seed)
    assert count_ops(check.folded, BN) == 0 and len(check.outcome.folds) == 2
    original = {t.name: t for t in model.graph.initializer}[weight]
    kept = {t.name: t for t in check.folded.graph.initializer}[weight]
    assert kept == original  # the plain Conv still reads the untouched weight
    top_conv = next(n for n in check.folded.graph.node if n.op_type == "Conv" and n.output[0] == top)
    assert top_conv.input[1] != weight
