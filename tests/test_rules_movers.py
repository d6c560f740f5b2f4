"""The movers one by one, where the generated models do not reach: chains of movers, a
channel slice, the Resize modes and crops, outputs a mover does not carry, the axes a
reduction or a pad touches."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from bnfold.fold import fold_batchnorms
from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare, op_count


def _only_reason(model: onnx.ModelProto) -> str:
    check = fold_and_compare(model)
    (left,) = check.outcome.left
    return left.reason


def test_a_bn_crosses_a_chain_of_movers_into_the_conv() -> None:
    """Conv → MaxPool → Identity → BN: the affine crosses both, the Conv absorbs it."""
    b = GraphBuilder(seed=1)
    pooled = b.node("MaxPool", [b.conv(b.input("x", [2, 3, 8, 8]), 3, 4)], kernel_shape=[2, 2], strides=[2, 2])
    b.output(b.node("Relu", [b.batchnorm(b.node("Identity", [pooled]), 4)]))
    check = fold_and_compare(b.model())
    (fold,) = check.outcome.folds
    assert fold.rule == "conv-bn through MaxPool, Identity"
    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "MaxPool", "Identity", "Relu"]


def test_a_bn_before_a_pool_folds_forward_into_an_unpadded_conv() -> None:
    b = GraphBuilder(seed=2)
    pooled = b.node("AveragePool", [b.batchnorm(b.input("x", [2, 3, 8, 8]), 3)], kernel_shape=[2, 2], strides=[2, 2])
    b.output(b.conv(pooled, 3, 4, pads=[0, 0, 0, 0]))
    (fold,) = fold_and_compare(b.model()).outcome.folds
    assert (fold.rule, fold.direction) == ("bn-conv through AveragePool", "forward")


def test_maxpool_whose_indices_are_read_keeps_the_bn() -> None:
    b = GraphBuilder(seed=3)
    conv = b.conv(b.input("x", [1, 3, 6, 6]), 3, 4)
    pooled = b.node("MaxPool", [conv], 2, kernel_shape=[2, 2])
    b.output(b.batchnorm(pooled, 4))
    b.outputs.append(onnx.helper.make_tensor_value_info(f"{pooled}1", onnx.TensorProto.INT64, None))
    assert "also writes 'maxpool0_out1', read by a graph output" in _only_reason(b.model())


@pytest.mark.parametrize("axes", [[1], [1, 2]])
def test_a_reduction_over_the_channel_axis_keeps_the_bn(axes: list[int]) -> None:
    b = GraphBuilder(seed=4)
    reduced = b.node("ReduceMean", [b.conv(b.input("x", [2, 3, 5, 5]), 3, 4)], axes=axes, keepdims=1)
    b.output(b.batchnorm(b.node("Transpose", [reduced], perm=[0, 1, 2, 3]), 1))
    assert "combines values along the affine's axis" in _only_reason(b.model(opset=13))


def test_a_slice_of_the_channels_takes_its_part_of_the_affine_both_ways() -> None:
    b = GraphBuilder(seed=5)
    x = b.input("x", [2, 6, 5, 5])
    kept = b.node("Slice", [b.conv(x, 6, 8), *(b.const(n, np.array(v)) for n, v in
                                                (("starts", [1]), ("ends", [8]), ("axes", [1]), ("steps", [2])))])
    sliced = b.batchnorm(kept, 4)  # backward: channels 1, 3, 5, 7 of the Conv
    back = b.node("Slice", [b.batchnorm(x, 6), *(b.const(n, np.array(v)) for n, v in
                                                  (("starts", [-1]), ("ends", [-7]), ("axes", [-3]), ("steps", [-2])))])
    b.output(sliced)
    b.output(b.conv(back, 3, 2, pads=[0, 0, 0, 0]))  # forward: channels 5, 3, 1 of x
    check = fold_and_compare(b.model())
    assert sorted(fold.rule for fold in check.outcome.folds) == ["bn-conv through Slice", "conv-bn through Slice"]


def test_a_slice_off_the_channel_axis_keeps_the_affine_as_it_is() -> None:
    b = GraphBuilder(seed=6)
    cropped = b.node("Slice", [b.conv(b.input("x", [2, 3, 6, 6]), 3, 4), b.const("s", np.array([1, 0])),
                               b.const("e", np.array([5, 4])), b.const("a", np.array([2, 3]))])
    b.output(b.batchnorm(cropped, 4))
    (fold,) = fold_and_compare(b.model()).outcome.folds
    assert fold.rule == "conv-bn through Slice"


@pytest.mark.parametrize(("mode", "extra"), [
    ("nearest", {"nearest_mode": "round_prefer_ceil"}),
    ("linear", {"coordinate_transformation_mode": "align_corners"}),
    ("cubic", {"cubic_coeff_a": -0.5, "exclude_outside": 1}),
    ("cubic", {"cubic_coeff_a": -0.75, "exclude_outside": 0, "coordinate_transformation_mode": "asymmetric"}),
])
def test_resize_whose_weights_sum_to_one_folds(mode: str, extra: dict) -> None:
    b = GraphBuilder(seed=7)
    scales = b.const("scales", np.array([1.0, 1.0, 2.5, 0.75], np.float32))
    resized = b.node("Resize", [b.conv(b.input("x", [2, 3, 5, 6]), 3, 4), "", scales], mode=mode, **extra)
    b.output(b.batchnorm(resized, 4))
    (fold,) = fold_and_compare(b.model()).outcome.folds
    assert fold.rule == "conv-bn through Resize"


def test_resize_of_the_channel_axis_keeps_the_bn() -> None:
    b = GraphBuilder(seed=8)
    sizes = b.const("sizes", np.array([2, 8, 5, 5], np.int64))
    resized = b.node("Resize", [b.conv(b.input("x", [2, 3, 5, 5]), 3, 4), "", "", sizes], mode="nearest")
    b.output(b.batchnorm(resized, 8))
    assert "resizes the channel axis 1 to 8 entries" in _only_reason(b.model())


def _crop(zero_shift: bool, roi: list[float]) -> onnx.ModelProto:
    b = GraphBuilder(seed=9)
    conv = b.conv(b.input("x", [1, 3, 6, 6]), 3, 4)
    region = b.const("roi", np.array(roi, np.float32))
    cropped = b.node("Resize", [conv, region, "", b.const("sizes", np.array([1, 4, 4, 4], np.int64))],
                     mode="linear", coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=0.0)
    gamma, beta, mean, var = b.batchnorm_parameters(4)
    if zero_shift:  # beta = mean = 0: t = 0, so the extrapolated zeros stay zeros
        beta, mean = (b.const(name, np.zeros(4, np.float32)) for name in ("beta", "mean"))
    b.output(b.node("BatchNormalization", [cropped, gamma, beta, mean, var]))
    return b.model()


def test_tf_crop_and_resize_folds_only_when_the_affine_keeps_the_extrapolated_value() -> None:
    outside = [0, 0, -0.2, 0.1, 1, 1, 0.9, 1.3]  # samples beyond the input: extrapolation_value 0
    assert "writes extrapolation_value 0 outside its crop" in _only_reason(_crop(zero_shift=False, roi=outside))
    (fold,) = fold_and_compare(_crop(zero_shift=True, roi=outside)).outcome.folds
    assert fold.rule == "conv-bn through Resize"
    channel_crop = [0, 0.25, 0, 0, 1, 0.75, 1, 1]
    assert "crops the channel axis 1" in _only_reason(_crop(zero_shift=True, roi=channel_crop))


@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_pad_of_the_channel_axis_keeps_the_bn(mode: str) -> None:
    b = GraphBuilder(seed=10)
    pads = b.const("pads", np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))
    padded = b.node("Pad", [b.conv(b.input("x", [1, 3, 5, 5]), 3, 4), pads], mode=mode)
    b.output(b.batchnorm(padded, 6))
    assert "pads the channel axis 1" in _only_reason(b.model())


def test_split_forward_into_a_layer_and_a_relu_names_the_output_that_cannot_absorb_it() -> None:
    b = GraphBuilder(seed=11)
    split = b.node("Split", [b.batchnorm(b.input("x", [1, 3, 6, 6]), 3), b.const("parts", np.array([4, 2]))], 2,
                   axis=2)
    b.output(b.conv(split, 3, 2, pads=[0, 0, 0, 0]))
    b.output(b.node("Relu", [f"{split}1"]))
    reason = _only_reason(b.model())
    assert "through Split 'split0': its output 'split0_out1' feeds Relu 'relu0', which cannot absorb it" in reason


def test_split_forward_into_a_layer_and_a_graph_output_names_the_graph_output() -> None:
    b = GraphBuilder(seed=11)
    split = b.node("Split", [b.batchnorm(b.input("x", [1, 3, 6, 6]), 3), b.const("parts", np.array([4, 2]))], 2,
                   axis=2)
    b.output(b.conv(split, 3, 2, pads=[0, 0, 0, 0]))
    b.output(f"{split}1")
    assert "its output 'split0_out1' feeds a graph output, which cannot absorb it" in _only_reason(b.model())


def test_a_reshape_of_a_decomposed_affine_with_a_broadcast_channel_is_refused() -> None:
    """``Mul`` by ``[1, C, 1, 1]`` on a one-channel tensor broadcasts it to C channels:
    moving it before a reshape would need the reshape's input to have C channels."""
    b = GraphBuilder(seed=12)
    flat = b.node("Reshape", [b.gemm(b.input("x", [2, 5]), 5, 16), b.const("shape", np.array([2, 1, 4, 4]))])
    scaled = b.node("Mul", [flat, b.const("m", np.linspace(0.5, 1.5, 3, dtype=np.float32).reshape(1, 3, 1, 1))])
    b.output(b.node("Add", [scaled, b.const("a", np.ones([1, 3, 1, 1], np.float32))]))
    model = b.model()
    outcome = fold_batchnorms(model)
    assert outcome.folds == [] and op_count(model, "Mul") == 1 and op_count(model, "Add") == 1


def test_resize_to_sizes_computed_from_its_input_keeps_the_channels() -> None:
    """``interpolate(y, size=(h, w))`` with a symbolic batch: the sizes are
    ``Concat(Shape(y)[0:2], [h, w])``, whose channel entry is the input's own."""
    b = GraphBuilder(seed=13)
    conv = b.conv(b.input("x", ["n", 3, 5, 5]), 3, 4)
    leading = b.node("Slice", [b.node("Shape", [conv]), b.const("start", np.array([0])), b.const("end", np.array([2]))])
    sizes = b.node("Concat", [leading, b.const("hw", np.array([7, 3]))], axis=0)
    b.output(b.batchnorm(b.node("Resize", [conv, "", "", sizes], mode="cubic"), 4))
    check = fold_and_compare(b.model(), shapes={"x": (2, 3, 5, 5)})
    (fold,) = check.outcome.folds
    assert fold.rule == "conv-bn through Resize"


def test_a_bn_before_global_pooling_and_flatten_folds_into_the_classifier() -> None:
    """BN → GlobalAveragePool → Flatten → Gemm: forward through two movers, with a symbolic batch."""
    b = GraphBuilder(seed=14)
    pooled = b.node("GlobalAveragePool", [b.batchnorm(b.input("x", ["n", 4, 5, 5]), 4)])
    b.output(b.gemm(b.node("Flatten", [pooled]), 4, 3))
    check = fold_and_compare(b.model(), shapes={"x": (2, 4, 5, 5)})
    (fold,) = check.outcome.folds
    assert (fold.rule, fold.direction) == ("bn-linear through GlobalAveragePool, Flatten", "forward")
    assert [node.op_type for node in check.folded.graph.node] == ["GlobalAveragePool", "Flatten", "Gemm"]


@pytest.mark.parametrize("size", ["H", 8])
def test_an_average_over_windows_that_may_overhang_keeps_the_shift_out(size: int | str) -> None:
    """AveragePool(k=2, s=2, count_include_pad=1) without pads: onnxruntime still makes a window
    for an input smaller than the kernel, averaging a padded zero in. Unknown sizes may be that
    small, so the shift stays out; a known size of 8 has no such window, and the BN folds."""
    b = GraphBuilder(seed=21)
    pooled = b.node("AveragePool", [b.conv(b.input("x", ["N", 2, size, size]), 2, 2, (1, 1))],
                    kernel_shape=[2, 2], strides=[2, 2], count_include_pad=1)
    b.output(b.batchnorm(pooled, 2))
    model = b.model()
    if size == "H":
        check = fold_and_compare(model, input_variants=[{"x": np.ones((1, 2, 1, 1), np.float32)}])
        assert op_count(check.folded, "BatchNormalization") == 1 and "padding" in check.outcome.left[0].reason
    else:
        assert op_count(fold_and_compare(model).folded, "BatchNormalization") == 0


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
@pytest.mark.parametrize("size", ["W", 7])
def test_a_dilated_same_pool_is_not_crossed(op: str, size: int | str) -> None:
    """onnxruntime sizes SAME padding from the undilated kernel: a dilated window can hold
    nothing but padding (MaxPool gives -FLT_MAX there), so no affine crosses such a pool."""
    b = GraphBuilder(seed=22)
    pooled = b.node(op, [b.conv(b.input("x", ["N", 2, 1, size]), 2, 2, (1, 1))], kernel_shape=[1, 3],
                    strides=[1, 3], dilations=[1, 2], auto_pad="SAME_UPPER")
    b.output(b.batchnorm(pooled, 2))
    variants = [{"x": np.ones((1, 2, 1, 1), np.float32)}] if size == "W" else [{}]
    check = fold_and_compare(b.model(opset=19), input_variants=variants)  # AveragePool dilates from 19
    assert op_count(check.folded, "BatchNormalization") == 1
