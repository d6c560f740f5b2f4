"""Conv/Gemm folds on the shapes real models come in: dtypes, old opsets, constant
subexpressions, IR < 4, shared weights and quantized (QDQ) weights.

Every fold is proven in onnxruntime with graph optimizations off (tests.support).
Where onnxruntime has no CPU kernel for the original (bfloat16 Conv, BatchNormalization-15
with mixed parameter types), onnx's reference evaluator runs the original instead and
onnxruntime runs the folded model whenever it can.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bnfold import fold_math
from bnfold.inputs import generate_inputs, input_specs
from bnfold.options import default_tolerance
from bnfold.rules import build_rules
from sample_models.modelkit import GraphBuilder
from tests.hostile_support import fold_copy
from tests.support import fold_and_compare, op_count, run_onnxruntime

BN = "BatchNormalization"


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def _conv_bn(dtype: type, *, opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    b = GraphBuilder(seed=4, dtype=dtype)
    x = b.input("x", [2, 3, 8, 8])
    b.output(b.batchnorm(b.conv(x, 3, 6, bias=False), 6))
    return b.model(opset=opset, ir_version=ir_version)


def _gemm_bn(dtype: type, *, opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    b = GraphBuilder(seed=5, dtype=dtype)
    x = b.input("x", [4, 10])
    b.output(b.batchnorm(b.gemm(x, 10, 5, trans_b=0, alpha=0.5, beta=2.0), 5))
    return b.model(opset=opset, ir_version=ir_version)


# -- dtypes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [_conv_bn, _gemm_bn])
def test_float16_folds_keep_float16_weights_and_match(build: Callable[[type], onnx.ModelProto]) -> None:
    check = fold_and_compare(build(np.float16))
    assert op_count(check.folded, BN) == 0 and len(check.outcome.folds) == 1
    assert all(t.data_type == TensorProto.FLOAT16 for t in check.folded.graph.initializer)


def test_float64_gemm_folds_to_float64_precision() -> None:
    # onnxruntime's CPU provider has a float64 Gemm but no float64 Conv.
    check = fold_and_compare(_gemm_bn(np.float64))
    assert op_count(check.folded, BN) == 0
    assert check.max_abs_error < 1e-12
    assert default_tolerance(np.dtype(np.float64)) == (1e-9, 1e-7)


def test_float16_fold_is_more_accurate_than_float16_arithmetic() -> None:
    """Math in float64 and one cast: the folded weight is the correctly rounded product."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 3, 3, 3)).astype(np.float16)
    s = rng.uniform(0.1, 10.0, 64)
    exact = weight.astype(np.float64) * s.reshape(-1, 1, 1, 1)
    folded, _, _ = fold_math.scale_with_effect(weight, fold_math.axis_factor(s, weight.ndim, 0), "weight")
    assert np.array_equal(folded, exact.astype(np.float16))
    naive = weight * s.astype(np.float16).reshape(-1, 1, 1, 1)
    assert np.abs(folded - exact).max() <= np.abs(naive - exact).max()


def test_bfloat16_conv_fold_checked_with_reference_evaluator() -> None:
    """onnxruntime has no bfloat16 Conv on CPU: the checker and onnx.reference prove this fold."""
    model = _conv_bn(ml_dtypes.bfloat16, opset=22, ir_version=10)
    folded, outcome = fold_copy(model)
    assert op_count(folded, BN) == 0 and len(outcome.folds) == 1
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.BFLOAT16}
    feeds = generate_inputs(input_specs(model, {}), seed=0)
    assert feeds["x"].dtype == ml_dtypes.bfloat16
    (expected,) = ReferenceEvaluator(model).run(None, feeds)
    (actual,) = ReferenceEvaluator(folded).run(None, feeds)
    atol, rtol = default_tolerance(expected.dtype)
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), atol=atol, rtol=rtol)


def test_bfloat16_tensors_round_trip_through_numpy_helper() -> None:
    values = np.array([1.5, -2.25, 3.0e38, 1e-38], dtype=ml_dtypes.bfloat16)
    tensor = numpy_helper.from_array(values, "w")
    assert tensor.data_type == TensorProto.BFLOAT16
    back = numpy_helper.to_array(tensor)
    assert back.dtype == ml_dtypes.bfloat16 and np.array_equal(back, values)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_verify_generates_half_precision_inputs(dtype: type) -> None:
    b = GraphBuilder(dtype=dtype)
    b.output(b.node("Relu", [b.input("x", [2, 5])]))
    specs = input_specs(b.model(opset=22, ir_version=10), {})
    feeds = generate_inputs(specs, seed=3)
    assert feeds["x"].dtype == np.dtype(dtype) and feeds["x"].shape == (2, 5)
    assert np.all(np.isfinite(feeds["x"].astype(np.float64))) and feeds["x"].astype(np.float64).std() > 0.1


def test_batchnorm15_mixed_parameter_types_fold_into_float16_conv() -> None:
    """BN-15: X float16, scale/bias (T1) float32, mean/var (T2) float64. onnxruntime has
    no kernel for the mixed original, so the reference evaluator runs it."""
    b = GraphBuilder(seed=6, dtype=np.float16)
    x = b.input("x", [2, 3, 6, 6])
    conv = b.conv(x, 3, 4)
    rng = np.random.default_rng(6)
    scale, bias = (b.const(n, rng.uniform(0.5, 1.5, 4).astype(np.float32)) for n in ("g", "b"))
    mean, var = (b.const(n, rng.uniform(0.5, 1.5, 4).astype(np.float64)) for n in ("m", "v"))
    b.output(b.node(BN, [conv, scale, bias, mean, var]))
    model = b.model(opset=15)
    folded, outcome = fold_copy(model)
    assert op_count(folded, BN) == 0 and len(outcome.folds) == 1
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.FLOAT16}
    feeds = generate_inputs(input_specs(model, {}), seed=1)
    (expected,) = ReferenceEvaluator(model).run(None, feeds)
    (actual,) = run_onnxruntime(folded, feeds)
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64), atol=1e-2, rtol=1e-2)


# -- opsets 7 and 8: the spatial attribute --------------------------------------------------


def _per_element_bn(b: GraphBuilder, x: str, shape: tuple[int, ...], *, vary: bool) -> str:
    """A spatial=0 BN with parameters shaped ``shape`` = [C, D1, ...]; constant within
    each channel unless ``vary``."""
    rng = np.random.default_rng(7)
    channels = shape[0]

    def parameter(low: float, high: float) -> np.ndarray:
        per_channel = rng.uniform(low, high, (channels,) + (1,) * (len(shape) - 1))
        values = np.broadcast_to(per_channel, shape).copy()
        if vary:
            values += rng.uniform(0.0, 0.1, shape)
        return values.astype(np.float32)

    names = [b.const(n, parameter(lo, hi)) for n, lo, hi in (("g", 0.5, 1.5), ("b", -1, 1), ("m", -1, 1), ("v", 0.5, 2))]
    return b.node(BN, [x, *names], spatial=0)


@pytest.mark.parametrize("opset", [7, 8])
def test_opset7_8_spatial0_after_gemm_is_per_channel_and_folds(opset: int) -> None:
    b = GraphBuilder(seed=8)
    x = b.input("x", [3, 6])
    y = _per_element_bn(b, b.gemm(x, 6, 4), (4,), vary=False)
    b.output(y, [3, 4])
    check = fold_and_compare(b.model(opset=opset, ir_version=3))
    assert op_count(check.folded, BN) == 0 and len(check.outcome.folds) == 1


def test_opset8_spatial0_constant_within_channel_folds_into_conv() -> None:
    b = GraphBuilder(seed=9)
    x = b.input("x", [2, 3, 5, 5])
    y = _per_element_bn(b, b.conv(x, 3, 4), (4, 5, 5), vary=False)
    b.output(y, [2, 4, 5, 5])
    check = fold_and_compare(b.model(opset=8, ir_version=3))
    assert op_count(check.folded, BN) == 0 and op_count(check.folded, "Conv") == 1


def test_opset8_spatial0_varying_statistics_are_refused() -> None:
    b = GraphBuilder(seed=9)
    x = b.input("x", [2, 3, 5, 5])
    y = _per_element_bn(b, b.conv(x, 3, 4), (4, 5, 5), vary=True)
    b.output(y, [2, 4, 5, 5])
    check = fold_and_compare(b.model(opset=8, ir_version=3))
    assert op_count(check.folded, BN) == 1 and not check.outcome.folds
    (left,) = check.outcome.left
    assert "spatial=0 has statistics that vary within a channel (parameters shaped [4, 5, 5])" in left.reason


def test_opset7_spatial1_conv_folds() -> None:
    b = GraphBuilder(seed=10)
    x = b.input("x", [1, 3, 6, 6])
    b.output(b.batchnorm(b.conv(x, 3, 4), 4, spatial=1), [1, 4, 6, 6])
    check = fold_and_compare(b.model(opset=7, ir_version=3))
    assert op_count(check.folded, BN) == 0


@settings(deadline=None, max_examples=40)
@given(
    channels=st.integers(1, 5),
    positions=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    perturb=st.booleans(),
)
def test_per_channel_affine_reduces_exactly_when_constant_within_channels(
    channels: int, positions: int, seed: int, perturb: bool
) -> None:
    rng = np.random.default_rng(seed)
    s_column, t_column = rng.uniform(0.1, 3.0, channels), rng.normal(size=channels)
    s = np.repeat(s_column[:, None], positions, axis=1)
    t = np.repeat(t_column[:, None], positions, axis=1)
    if perturb and positions > 1:
        s[rng.integers(channels), rng.integers(1, positions)] *= 1.0 + 1e-12
        assert fold_math.per_channel_affine(s, t) is None
    else:
        reduced_s, reduced_t = fold_math.per_channel_affine(s, t)
        assert np.array_equal(reduced_s, s_column) and np.array_equal(reduced_t, t_column)


# -- constants behind nodes -----------------------------------------------------------------


def test_weights_and_parameters_behind_constant_nodes_fold_and_the_nodes_go() -> None:
    """Identity'd weight, Constant-node BN parameters, a weight Transpose'd, Cast and
    Reshape'd from initializers, a bias from ConstantOfShape, a weight through
    Unsqueeze/Squeeze and a BN variance through two Casts."""
    b = GraphBuilder(seed=11)
    x = b.input("x", [2, 3, 6, 6])
    raw = b.const("raw", b.rng.standard_normal((3, 4, 3, 3)).astype(np.float64))  # [C, M, k, k]
    transposed = b.node("Transpose", [raw], perm=[1, 0, 2, 3])
    weight = b.node("Cast", [b.node("Reshape", [transposed, b.const("shape", np.array([4, 3, 3, 3]))])], to=TensorProto.FLOAT)
    y = b.node("Conv", [x, b.node("Identity", [weight])], pads=[1, 1, 1, 1])
    y = b.batchnorm(y, 4, constant_nodes=True)
    y = b.node("Relu", [y])
    zeros = b.node("ConstantOfShape", [b.const("bias_shape", np.array([5]), as_node=True)], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25]))
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [y])])
    gemm_weight = b.node("Unsqueeze", [b.random("w", [5, 4]), b.const("axis", np.array([0]))])
    gemm_weight = b.node("Squeeze", [gemm_weight, b.const("axis", np.array([0]))])
    gamma, beta, mean, var = b.batchnorm_parameters(5)
    var = b.node("Cast", [b.node("Cast", [var], to=TensorProto.DOUBLE)], to=TensorProto.FLOAT)
    b.output(b.node(BN, [b.node("Gemm", [flat, gemm_weight, zeros], transB=1), gamma, beta, mean, var]))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, BN) == 0 and len(check.outcome.folds) == 2
    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    assert len(check.folded.graph.initializer) == 4  # Conv W, b; Gemm B, C


def test_dynamo_style_zero_bias_expand_castlike_shape_folds() -> None:
    """torch.onnx (dynamo, optimize=False) writes a missing Conv bias as
    Expand(CastLike(0, x), Shape(W, end=1)); it is constant and folds away."""
    b = GraphBuilder(seed=12)
    x = b.input("x", [1, 3, 6, 6])
    weight = b.random("W", [4, 3, 3, 3])
    zero = b.node("CastLike", [b.const("zero", np.array(0.0, dtype=np.float64), as_node=True), weight])
    bias = b.node("Expand", [zero, b.node("Shape", [weight], start=0, end=1)])
    b.output(b.batchnorm(b.node("Conv", [x, weight, bias], pads=[1, 1, 1, 1]), 4))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, BN) == 0
    (conv,) = check.folded.graph.node
    assert conv.op_type == "Conv" and len(check.folded.graph.initializer) == 2
    # Its only other readers were the removed bias nodes: the weight keeps its name, no "shared" note.
    assert conv.input[1] == weight and check.outcome.folds[0].notes == ()
    assert weight not in check.outcome.removed_initializers


@pytest.mark.parametrize("ir_version", [8, 3])
def test_weight_fed_at_run_time_is_refused(ir_version: int) -> None:
    """A weight that is a real graph input (IR 3: not an initializer; IR 8: an
    initializer also listed as input, i.e. an overridable default, kept so) is not constant."""
    b = GraphBuilder(seed=13)
    x = b.input("x", [1, 3, 5, 5])
    weight = b.random("W", [4, 3, 3, 3])
    y = b.batchnorm(b.node("Conv", [x, weight], pads=[1, 1, 1, 1]), 4)
    b.output(y, [1, 4, 5, 5])
    if ir_version == 3:
        b.initializers = [t for t in b.initializers if t.name != weight]
    b.input(weight, [4, 3, 3, 3])
    check = fold_and_compare(b.model(opset=9, ir_version=ir_version), rules=build_rules(keep_overridable=True))
    assert op_count(check.folded, BN) == 1
    (left,) = check.outcome.left
    assert "Conv 'conv0' weight 'W0' is not a constant" in left.reason
    assert ("--keep-overridable" in left.reason) == (ir_version >= 4)


# -- quantized (QDQ) weights ----------------------------------------------------------------


def test_dequantized_weight_is_refused_and_model_left_unchanged() -> None:
    b = GraphBuilder(seed=16)
    x = b.input("x", [1, 3, 5, 5])
    quantized = b.const("Wq", b.rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8))
    b.nodes.append(helper.make_node("DequantizeLinear", [quantized, b.const("scale", np.float32(0.02))], ["W"], name="dq_w"))
    b.output(b.batchnorm(b.node("Conv", [x, "W"], pads=[1, 1, 1, 1]), 4))
    model = b.model()
    check = fold_and_compare(model)
    assert check.folded.SerializeToString() == model.SerializeToString()
    (left,) = check.outcome.left
    assert left.reason == (
        "Conv 'conv0' weight is dequantized by DequantizeLinear 'dq_w'; folding would drop quantization"
    )
