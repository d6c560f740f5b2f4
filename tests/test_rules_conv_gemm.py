"""Conv → BN and Gemm → BN folds, checked through onnxruntime, and every refusal reason."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bnfold.fold import fold_batchnorms
from bnfold.rules import RULES, RuleSet, build_rules
from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare, op_count


def conv_bn_model(
    *, spatial: int = 2, c_in: int = 4, c_out: int = 6, group: int = 1, bias: bool = True,
    opset: int = 17, ir_version: int = 8, seed: int = 0, **bn_attributes: object,
) -> onnx.ModelProto:
    b = GraphBuilder(seed=seed)
    x = b.input("x", [2, c_in, *([7] * spatial)])
    y = b.conv(x, c_in, c_out, kernel=(3,) * spatial, group=group, bias=bias)
    b.output(b.batchnorm(y, c_out, **bn_attributes))
    return b.model(opset=opset, ir_version=ir_version)


# -- Conv → BN -------------------------------------------------------------------------------


@settings(max_examples=20)
@given(
    spatial=st.integers(1, 3),
    channels_per_group=st.integers(1, 4),
    inputs_per_group=st.integers(1, 3),
    group=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_conv_bn_folds_exactly_for_random_shapes_and_groups(spatial, channels_per_group, inputs_per_group, group, bias, seed) -> None:
    model = conv_bn_model(spatial=spatial, c_in=inputs_per_group * group, c_out=channels_per_group * group,
                          group=group, bias=bias, seed=seed)
    check = fold_and_compare(model)
    assert op_count(check.folded, "BatchNormalization") == 0
    assert op_count(check.folded, "Conv") == 1
    conv = check.folded.graph.node[0]
    assert len(conv.input) == 3 and conv.input[2], "a Conv without bias gets one"


def test_depthwise_conv_bn_folds() -> None:
    check = fold_and_compare(conv_bn_model(c_in=8, c_out=8, group=8, bias=False))
    assert [n.op_type for n in check.folded.graph.node] == ["Conv"]


@pytest.mark.parametrize("opset,ir_version", [(9, 4), (11, 6), (13, 7), (14, 7), (15, 8), (17, 8), (21, 10), (23, 10)])
def test_conv_bn_folds_at_every_supported_opset(opset, ir_version) -> None:
    check = fold_and_compare(conv_bn_model(opset=opset, ir_version=ir_version))
    assert op_count(check.folded, "BatchNormalization") == 0


def test_batchnorm_parameters_as_constant_nodes_fold_and_the_constants_go() -> None:
    b = GraphBuilder(seed=3)
    x = b.input("x", [1, 3, 5, 5])
    b.output(b.batchnorm(b.conv(x, 3, 4), 4, constant_nodes=True))
    check = fold_and_compare(b.model())
    assert [n.op_type for n in check.folded.graph.node] == ["Conv"]


# -- Gemm → BN -------------------------------------------------------------------------------


@settings(max_examples=25)
@given(
    trans_a=st.booleans(),
    trans_b=st.booleans(),
    alpha=st.sampled_from([1.0, 0.5, -1.5]),
    beta=st.sampled_from([1.0, 0.0, 2.0]),
    bias_shape=st.sampled_from(["absent", "scalar", "n", "1n", "mn"]),
    seed=st.integers(0, 1000),
)
def test_gemm_bn_folds_for_every_attribute_and_bias_shape(trans_a, trans_b, alpha, beta, bias_shape, seed) -> None:
    m, k, n = 3, 5, 4
    b = GraphBuilder(seed=seed)
    x = b.input("x", [k, m] if trans_a else [m, k])
    weight = b.random("B", [n, k] if trans_b else [k, n])
    inputs = [x, weight]
    c_shape = {"absent": None, "scalar": [], "n": [n], "1n": [1, n], "mn": [m, n]}[bias_shape]
    if c_shape is not None:
        inputs.append(b.random("C", c_shape))
    y = b.node("Gemm", inputs, transA=int(trans_a), transB=int(trans_b), alpha=alpha, beta=beta)
    b.output(b.batchnorm(y, n))
    check = fold_and_compare(b.model())
    assert [node.op_type for node in check.folded.graph.node] == ["Gemm"]


# -- refusals --------------------------------------------------------------------------------


def only_left_reason(model: onnx.ModelProto, rules: RuleSet = RULES) -> str:
    outcome = fold_batchnorms(model, rules)
    assert not outcome.folds
    assert len(outcome.left) == 1
    return outcome.left[0].reason


def test_training_mode_is_refused() -> None:
    b = GraphBuilder(seed=1)
    x = b.input("x", [2, 3, 4, 4])
    y = b.node("BatchNormalization", [b.conv(x, 3, 3), *b.batchnorm_parameters(3)], n_outputs=3, training_mode=1)
    b.output(y)
    assert only_left_reason(b.model(opset=15)) == "BN in training mode (training_mode=1)"


def test_legacy_is_test_zero_is_refused() -> None:
    model = conv_bn_model(opset=9)
    model.opset_import[0].version = 6
    model.graph.node[-1].attribute.append(helper.make_attribute("is_test", 0))
    assert only_left_reason(model) == "BN in training mode (is_test=0)"


def test_spatial_zero_is_refused_when_statistics_are_per_element() -> None:
    b = GraphBuilder(seed=1)
    x = b.input("x", [1, 2, 3, 3])
    conv = b.conv(x, 2, 2)
    stats = [b.random(name, [2, 3, 3]) for name in ("g", "b", "m")] + [b.const("v", np.full([2, 3, 3], 1.0, np.float32))]
    b.node("BatchNormalization", [conv, *stats], spatial=0)
    model = helper.make_model(
        helper.make_graph(b.nodes, "g", b.inputs, [helper.make_tensor_value_info(b.nodes[-1].output[0], 1, [1, 2, 3, 3])],
                          b.initializers),
        opset_imports=[helper.make_opsetid("", 7)], ir_version=3,
    )
    assert "spatial=0" in only_left_reason(model)


def test_batchnorm_parameter_fed_at_run_time_is_refused() -> None:
    b = GraphBuilder(seed=2)
    x = b.input("x", [1, 3, 4, 4])
    scale = b.input("scale", [3])
    parameters = b.batchnorm_parameters(3)
    b.output(b.node("BatchNormalization", [b.conv(x, 3, 3), scale, *parameters[1:]]))
    assert only_left_reason(b.model()) == (
        "BatchNormalization 'batchnormalization0' scale 'scale' is not a constant (a graph input)"
    )


def test_conv_weight_fed_at_run_time_is_refused() -> None:
    b = GraphBuilder(seed=2)
    x = b.input("x", [1, 3, 4, 4])
    weight = b.input("weight", [3, 3, 1, 1])
    b.output(b.batchnorm(b.node("Conv", [x, weight]), 3))
    assert only_left_reason(b.model()) == "Conv 'conv0' weight 'weight' is not a constant (a graph input)"


def test_overridable_initializer_weight_kept_overridable_is_not_a_constant() -> None:
    """From IR 4 on, an initializer also listed as a graph input can be overridden at run time;
    with keep_overridable (--keep-overridable) it is not folded."""
    model = conv_bn_model()
    weight = next(t for t in model.graph.initializer if t.name == model.graph.node[0].input[1])
    model.graph.input.append(helper.make_tensor_value_info(weight.name, weight.data_type, list(weight.dims)))
    reason = only_left_reason(model, build_rules(keep_overridable=True))
    assert f"weight '{weight.name}' is not a constant" in reason and "--keep-overridable" in reason


def test_producer_output_used_elsewhere_is_refused() -> None:
    b = GraphBuilder(seed=5)
    x = b.input("x", [1, 3, 4, 4])
    conv = b.conv(x, 3, 3)
    b.output(b.node("Add", [b.batchnorm(conv, 3), b.node("Relu", [conv])]))
    assert only_left_reason(b.model()) == "Conv 'conv0' output also feeds Relu 'relu0'"


def test_producer_output_that_is_a_graph_output_is_refused() -> None:
    b = GraphBuilder(seed=5)
    x = b.input("x", [1, 3, 4, 4])
    conv = b.conv(x, 3, 3)
    b.output(b.batchnorm(conv, 3))
    b.output(conv)
    assert only_left_reason(b.model()) == "Conv 'conv0' output also feeds a graph output"


def set_parameter(model: onnx.ModelProto, prefix: str, values: np.ndarray) -> None:
    tensor = next(t for t in model.graph.initializer if t.name.startswith(prefix))
    tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))


def test_nonpositive_variance_plus_epsilon_is_refused() -> None:
    model = conv_bn_model(c_out=3)
    set_parameter(model, "var", np.array([1.0, -1.0, 1.0]))
    assert only_left_reason(model) == "BN var + epsilon <= 0 at channel 1"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_parameters_are_refused(bad) -> None:
    model = conv_bn_model(c_out=3)
    set_parameter(model, "mean", np.array([0.0, bad, 0.0]))
    assert only_left_reason(model) == "BN mean contains NaN or Inf"


def test_mismatched_parameter_lengths_are_refused() -> None:
    model = conv_bn_model(c_out=3)
    set_parameter(model, "beta", np.zeros(2))
    assert only_left_reason(model) == "BN parameters are not vectors of one length (scale [3], bias [2], mean [3], var [3])"


def test_channel_count_mismatch_is_refused_not_asserted() -> None:
    model = conv_bn_model(c_out=3)
    for prefix in ("gamma", "beta", "mean", "var"):
        set_parameter(model, prefix, np.ones(2))
    assert only_left_reason(model) == "Conv 'conv0' weight shape [3, 4, 3, 3] does not match the BN's 2 channels"


def test_fold_that_would_overflow_float16_is_refused() -> None:
    b = GraphBuilder(seed=6, dtype=np.float16)
    x = b.input("x", [1, 2, 4, 4])
    y = b.conv(x, 2, 2)
    b.output(b.batchnorm(y, 2))
    model = b.model()
    var = next(t for t in model.graph.initializer if t.name.startswith("var"))
    var.CopyFrom(numpy_helper.from_array(np.array([1e-8, 1.0], np.float16), var.name))
    eps = next(a for a in model.graph.node[-1].attribute if a.name == "epsilon")
    eps.f = 1e-12
    reason = only_left_reason(model)
    assert reason.startswith("Conv 'conv0': folded weight would overflow float16 (largest magnitude")


def test_integer_gemm_is_refused() -> None:
    b = GraphBuilder(seed=7)
    x = b.input("x", [2, 3], elem_type=TensorProto.INT32)
    weight = b.const("B", np.ones((3, 2), np.int32))
    y = b.node("Gemm", [x, weight])
    parameters = b.batchnorm_parameters(2)
    b.outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, None))
    b.nodes.append(helper.make_node("BatchNormalization", [y, *parameters], ["y"], name="bn"))
    model = helper.make_model(helper.make_graph(b.nodes, "g", b.inputs, b.outputs, b.initializers),
                              opset_imports=[helper.make_opsetid("", 17)])
    assert only_left_reason(model) == "Gemm 'gemm0' B is int32; only float weights can absorb a scale"
