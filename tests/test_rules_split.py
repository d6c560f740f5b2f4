"""An affine split over the inputs of a Concat or an Add (rules ``concat-split``, ``add-split``):
each input's layer absorbs its piece, the folded model computes the same outputs in onnxruntime,
and what cannot be absorbed is kept or refused with the input named."""

from __future__ import annotations

import numpy as np
import onnx

from bnfold.rules.batchnorm import is_batchnorm
from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare, op_count


def _conv(b: GraphBuilder, name: str, c_in: int, c_out: int, size: int = 5, **attributes: object) -> str:
    return b.conv(b.input(name, [1, c_in, size, size]), c_in, c_out, (3, 3), **attributes)


def _leaky(b: GraphBuilder, x: str) -> str:
    return b.output(b.node("LeakyRelu", [x], alpha=0.1))


def _batchnorms(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if is_batchnorm(node)]


# -- Concat ------------------------------------------------------------------------------------


def test_bn_over_a_channel_concat_folds_a_slice_into_each_conv() -> None:
    """BottleneckCSP: ``bn(cat(cv3(...), cv2(x)))`` with plain Convs on both sides."""
    b = GraphBuilder(seed=1)
    cat = b.node("Concat", [_conv(b, "a", 3, 4, bias=False), _conv(b, "b", 2, 3)], axis=1)
    _leaky(b, b.batchnorm(cat, 7))
    check = fold_and_compare(b.model())

    (fold,) = check.outcome.folds
    assert (fold.rule, fold.direction, fold.partial) == ("concat-split", "backward", False)
    assert fold.target == "Concat 'concat0', Conv 'conv0', Conv 'conv1'"
    assert any(note.startswith("channels 0-3: conv-bn into Conv 'conv0'") for note in fold.notes)
    assert any(note.startswith("channels 4-6: conv-bn into Conv 'conv1'") for note in fold.notes)
    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Conv", "Concat", "LeakyRelu"]


def test_bn_over_a_spatial_concat_folds_whole_into_every_input() -> None:
    b = GraphBuilder(seed=2)
    top = b.conv(b.input("a", [1, 2, 3, 4]), 2, 5, (1, 1))
    bottom = b.conv(b.input("b", [1, 3, 2, 4]), 3, 5, (3, 3))
    _leaky(b, b.batchnorm(b.node("Concat", [top, bottom], axis=-2), 5))
    check = fold_and_compare(b.model())

    assert [fold.rule for fold in check.outcome.folds] == ["concat-split"]
    assert op_count(check.folded, "BatchNormalization") == 0


def test_segments_reach_their_layer_through_movers_and_nested_concats() -> None:
    b = GraphBuilder(seed=3)
    inner = b.node("Concat", [_conv(b, "a", 2, 2), b.node("Identity", [_conv(b, "b", 2, 3)])], axis=1)
    _leaky(b, b.batchnorm(b.node("Concat", [inner, _conv(b, "c", 1, 2)], axis=1), 7))
    check = fold_and_compare(b.model())

    (fold,) = check.outcome.folds
    assert fold.rule == "concat-split" and not fold.partial
    assert any("conv-bn through Identity" in note for note in fold.notes)
    assert op_count(check.folded, "BatchNormalization") == 0


def test_a_constant_segment_takes_its_slice_in_place() -> None:
    b = GraphBuilder(seed=4)
    constant = b.random("c", [1, 2, 5, 5])
    _leaky(b, b.batchnorm(b.node("Concat", [_conv(b, "a", 2, 3), constant], axis=1), 5))
    check = fold_and_compare(b.model())

    assert any("constant 'c0' absorbs it" in note for note in check.outcome.folds[0].notes)
    assert op_count(check.folded, "BatchNormalization") == 0


def test_one_segment_no_layer_can_absorb_keeps_its_slice_as_a_smaller_batchnorm() -> None:
    b = GraphBuilder(seed=5)
    relu = b.node("Relu", [b.input("r", [1, 2, 5, 5])])
    cat = b.node("Concat", [_conv(b, "a", 3, 4), relu], axis=1)
    _leaky(b, b.batchnorm(cat, 6))
    check = fold_and_compare(b.model())

    (fold,) = check.outcome.folds
    assert fold.partial and fold.rule == "concat-split"
    assert any("channels 4-5: kept as BatchNormalization 'batchnormalization0'" in note for note in fold.notes)
    (kept,) = _batchnorms(check.folded)
    assert kept.name == "batchnormalization0" and kept.input[0] == relu
    scale = next(t for t in check.folded.graph.initializer if t.name == kept.input[1])
    assert list(scale.dims) == [2]
    (left,) = check.outcome.left
    assert left.batchnorm == "batchnormalization0" and "no foldable neighbour" in left.reason
    assert len(check.folded.graph.node) == len(check.original.graph.node)


def test_a_decomposed_affine_keeps_its_slice_as_mul_and_add() -> None:
    b = GraphBuilder(seed=6)
    cat = b.node("Concat", [b.input("x", [1, 2, 4, 4]), _conv(b, "a", 3, 3, size=4)], axis=1)
    scaled = b.node("Mul", [cat, b.const("m", np.linspace(0.5, 1.5, 5, dtype=np.float32).reshape(5, 1, 1))])
    _leaky(b, b.node("Add", [scaled, b.const("a", np.linspace(-1, 1, 5, dtype=np.float32).reshape(5, 1, 1))]))
    check = fold_and_compare(b.model())

    (fold,) = check.outcome.folds
    assert fold.partial and fold.kind == "Mul+Add"
    assert [node.op_type for node in check.folded.graph.node] == ["Mul", "Add", "Conv", "Concat", "LeakyRelu"]


def test_two_segments_no_layer_can_absorb_leave_the_batchnorm_whole_naming_both() -> None:
    b = GraphBuilder(seed=7)
    cat = b.node("Concat", [b.node("Relu", [b.input("r", [1, 2, 5, 5])]), _conv(b, "a", 3, 4),
                            b.input("x", [1, 1, 5, 5])], axis=1)
    _leaky(b, b.batchnorm(cat, 7))
    check = fold_and_compare(b.model())

    assert not check.outcome.folds
    (left,) = check.outcome.left
    assert "input 0 'relu0_out' (channels 0-1) cannot absorb its part" in left.reason
    assert "input 2 'x' (channels 6-6) cannot absorb its part: 'x' is a graph input" in left.reason


def test_concat_read_by_another_node_is_refused() -> None:
    b = GraphBuilder(seed=8)
    cat = b.node("Concat", [_conv(b, "a", 2, 2), _conv(b, "b", 2, 2)], axis=1)
    b.output(b.node("Relu", [cat]))
    _leaky(b, b.batchnorm(cat, 4))
    check = fold_and_compare(b.model())

    assert "Concat 'concat0' output also feeds Relu 'relu0'" in check.outcome.left[0].reason


def test_segments_whose_convs_share_a_weight_get_their_own_copies() -> None:
    b = GraphBuilder(seed=9)
    weight = b.random("W", [3, 2, 3, 3])
    convs = [b.node("Conv", [b.input(name, [1, 2, 4, 4]), weight], pads=[1, 1, 1, 1]) for name in ("a", "b")]
    _leaky(b, b.batchnorm(b.node("Concat", convs, axis=1), 6))
    check = fold_and_compare(b.model())

    assert op_count(check.folded, "BatchNormalization") == 0
    weights = {node.input[1] for node in check.folded.graph.node if node.op_type == "Conv"}
    assert len(weights) == 2


def test_float16_concat_split() -> None:
    b = GraphBuilder(seed=10, dtype=np.float16)
    _leaky(b, b.batchnorm(b.node("Concat", [_conv(b, "a", 2, 3), _conv(b, "b", 2, 1)], axis=1), 4))
    check = fold_and_compare(b.model(), atol_scales_with_output=True)

    assert op_count(check.folded, "BatchNormalization") == 0


# -- Add ----------------------------------------------------------------------------------------


def _bias(model: onnx.ModelProto, conv: str) -> np.ndarray | None:
    node = next(node for node in model.graph.node if node.name == conv)
    if len(node.input) < 3:
        return None
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == node.input[2]))


def test_bn_over_an_add_of_two_convs_scales_both_and_shifts_one() -> None:
    """Pre-activation ResNet's last BN: ``bn(conv2(...) + shortcut(...))``."""
    b = GraphBuilder(seed=11)
    total = b.node("Add", [_conv(b, "a", 3, 4, bias=False), _conv(b, "b", 2, 4, bias=False)])
    _leaky(b, b.batchnorm(total, 4))
    check = fold_and_compare(b.model())

    (fold,) = check.outcome.folds
    assert (fold.rule, fold.target) == ("add-split", "Add 'add0', Conv 'conv0', Conv 'conv1'")
    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Conv", "Add", "LeakyRelu"]
    biases = [_bias(check.folded, name) for name in ("conv0", "conv1")]
    assert sum(bias is not None and bool(np.any(bias)) for bias in biases) == 1  # the shift goes in once


def test_bn_over_a_tree_of_adds_and_a_sum_with_a_constant() -> None:
    """``a + b + c`` as a chain of Adds, and a Sum whose constant operand takes the shift."""
    b = GraphBuilder(seed=12)
    chain = b.node("Add", [b.node("Add", [_conv(b, "a", 2, 3), _conv(b, "b", 2, 3)]), _conv(b, "c", 2, 3)])
    _leaky(b, b.batchnorm(chain, 3))
    total = b.node("Sum", [_conv(b, "d", 2, 3), b.const("k", np.float32(0.25)), _conv(b, "e", 2, 3, bias=False)])
    _leaky(b, b.batchnorm(total, 3))
    check = fold_and_compare(b.model())

    assert [fold.rule for fold in check.outcome.folds] == ["add-split", "add-split"]
    assert op_count(check.folded, "BatchNormalization") == 0
    sum_fold = check.outcome.folds[1]
    assert any("input 1 with the shift: constant 'k0' absorbs it" in note for note in sum_fold.notes)
    assert _bias(check.folded, "conv4") is None  # the bias-free Conv got no bias: the constant took the shift


def test_decomposed_affine_over_an_add_of_rank2_layers() -> None:
    """tf2onnx's Mul/Add by ``[C]`` after an Add of two Gemms: the channel axis is the last."""
    b = GraphBuilder(seed=13)
    total = b.node("Add", [b.gemm(b.input("x", [2, 5]), 5, 4), b.gemm(b.input("y", [2, 3]), 3, 4, bias=False)])
    scaled = b.node("Mul", [total, b.const("m", np.linspace(0.5, 2.0, 4, dtype=np.float32))])
    _leaky(b, b.node("Add", [scaled, b.const("t", np.linspace(-1, 1, 4, dtype=np.float32))]))
    check = fold_and_compare(b.model())

    assert [(fold.kind, fold.rule) for fold in check.outcome.folds] == [("Mul+Add", "add-split")]
    assert [node.op_type for node in check.folded.graph.node] == ["Gemm", "Gemm", "Add", "LeakyRelu"]


def test_a_bias_add_after_an_add_needs_only_the_layer_operand() -> None:
    """``(relu + conv) + c``: the Relu's piece is the identity, so only the Conv takes ``c``."""
    b = GraphBuilder(seed=14)
    total = b.node("Add", [b.node("Relu", [b.input("r", [1, 3, 5, 5])]), _conv(b, "a", 2, 3)])
    _leaky(b, b.node("Add", [total, b.const("c", np.linspace(-1, 1, 3, dtype=np.float32).reshape(3, 1, 1))]))
    check = fold_and_compare(b.model())

    assert [fold.rule for fold in check.outcome.folds] == ["add-split"]
    assert [node.op_type for node in check.folded.graph.node] == ["Relu", "Conv", "Add", "LeakyRelu"]


def test_bn_over_an_add_with_an_operand_that_cannot_absorb_is_refused_naming_it() -> None:
    b = GraphBuilder(seed=15)
    stem = _conv(b, "x", 2, 3)
    b.output(b.node("Relu", [stem]))
    total = b.node("Add", [_conv(b, "a", 3, 3), stem])
    _leaky(b, b.batchnorm(total, 3))
    check = fold_and_compare(b.model())

    (left,) = check.outcome.left
    assert left.reason.startswith("Add 'add0' input 1 'conv0_out' cannot absorb the scale: "
                                  "Conv 'conv0' output also feeds Relu 'relu0'")
    assert op_count(check.folded, "Conv") == 2 and not check.outcome.folds


def test_an_operand_broadcast_along_the_channels_is_refused() -> None:
    b = GraphBuilder(seed=16)
    total = b.node("Add", [_conv(b, "a", 2, 3), _conv(b, "b", 2, 1)])
    _leaky(b, b.batchnorm(total, 3))
    check = fold_and_compare(b.model())

    assert "input 1 'conv1_out' broadcasts along the channel axis" in check.outcome.left[0].reason

