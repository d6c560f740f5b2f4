"""Folds through Transpose / Squeeze / Unsqueeze (and Identity, Dropout), through onnxruntime.

Sequence models write ``Linear → Transpose → BatchNorm1d``; tf2onnx runs channels-last
Keras layers in NCHW between ``Transpose(perm=[0, 3, 1, 2])`` and ``Transpose(perm=[0, 2, 3, 1])``
and a Conv1D as ``Unsqueeze → Transpose → Conv → Squeeze``, with a Keras BN as ``Mul → Add``
by per-channel constants on either side (see docs/tf2onnx-models.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.fold import fold_batchnorms
from bnfold.rules import build_rules
from sample_models.modelkit import GraphBuilder
from tests.support import FoldCheck, fold_and_compare, op_count


def _linear_3d(b: GraphBuilder, x: str, k: int, n: int, *, bias: bool = True) -> str:
    y = b.node("MatMul", [x, b.random("W", [k, n])])
    return b.node("Add", [y, b.random("b", [n])]) if bias else y


def test_linear_then_transposed_batchnorm1d_folds_into_matmul_and_bias() -> None:
    b = GraphBuilder(seed=1)
    y = _linear_3d(b, b.input("x", [2, 5, 6]), 6, 8)
    z = b.batchnorm(b.node("Transpose", [y], perm=[0, 2, 1]), 8)
    b.output(b.node("Transpose", [z], perm=[0, 2, 1]))
    check = fold_and_compare(b.model())

    assert [(r.rule, r.target) for r in check.outcome.folds] == [
        ("matmul-add-bn through Transpose", "Transpose 'transpose0', Add 'add0'")
    ]
    assert [node.op_type for node in check.folded.graph.node] == ["MatMul", "Add", "Transpose", "Transpose"]


def test_lone_matmul_gets_its_shift_added_before_the_transpose() -> None:
    b = GraphBuilder(seed=2)
    y = _linear_3d(b, b.input("x", [2, 5, 6]), 6, 4, bias=False)
    b.output(b.batchnorm(b.node("Transpose", [y], perm=[0, 2, 1]), 4))
    check = fold_and_compare(b.model())

    assert [node.op_type for node in check.folded.graph.node] == ["MatMul", "Add", "Transpose"]


def test_tf2onnx_nhwc_decomposed_batchnorm_after_transposed_conv_folds_into_the_conv() -> None:
    b = GraphBuilder(seed=3)
    y = b.node("Transpose", [b.conv(b.input("x", [1, 3, 5, 5]), 3, 4)], perm=[0, 2, 3, 1])
    scaled = b.node("Mul", [y, b.const("m", np.linspace(0.5, 2.0, 4, dtype=np.float32))])
    b.output(b.node("Add", [scaled, b.const("a", np.linspace(-1.0, 1.0, 4, dtype=np.float32))]))
    check = fold_and_compare(b.model())

    assert [r.rule for r in check.outcome.folds] == ["conv-bn through Transpose"]
    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Transpose"]


def test_transpose_keeping_the_batchnorm_off_the_channel_axis_is_refused_with_the_reason() -> None:
    b = GraphBuilder(seed=4)
    y = _linear_3d(b, b.input("x", [4, 5, 6]), 6, 4)  # [4, 5, 4]: the batch axis has 4 entries too
    b.output(b.batchnorm(b.node("Transpose", [y], perm=[1, 0, 2]), 4))
    model = b.model()
    outcome = fold_batchnorms(model)

    assert [record.reason for record in outcome.left] == [
        "through Transpose 'transpose0': Transpose 'transpose0' scales axis 0 of a rank-3 output from "
        "Add 'add0', whose channels are axis -1"
    ]
    assert op_count(model, "BatchNormalization") == 1


def test_transpose_output_read_elsewhere_is_refused_with_the_reader() -> None:
    b = GraphBuilder(seed=5)
    t = b.node("Transpose", [_linear_3d(b, b.input("x", [2, 5, 6]), 6, 4)], perm=[0, 2, 1])
    b.output(b.batchnorm(t, 4))
    b.output(b.node("Relu", [t]))
    outcome = fold_batchnorms(b.model())

    assert [record.reason for record in outcome.left] == ["Transpose 'transpose0' output also feeds Relu 'relu0'"]


def test_identity_and_inference_dropout_between_conv_and_batchnorm_fold_through() -> None:
    b = GraphBuilder(seed=6)
    y = b.node("Identity", [b.conv(b.input("x", [1, 3, 5, 5]), 3, 4)])
    z = b.node("Dropout", [b.conv(b.node("Relu", [b.batchnorm(y, 4)]), 4, 4)], ratio=0.5)
    b.output(b.batchnorm(z, 4))
    check = fold_and_compare(b.model(opset=11))

    assert sorted(r.rule for r in check.outcome.folds) == ["conv-bn through Dropout", "conv-bn through Identity"]
    assert op_count(check.folded, "BatchNormalization") == 0


def test_dropout_whose_mask_is_read_is_refused_with_the_reason() -> None:
    b = GraphBuilder(seed=7)
    dropout = b.node("Dropout", [b.conv(b.input("x", [1, 3, 5, 5]), 3, 4)], n_outputs=2)
    b.output(b.batchnorm(dropout, 4))
    b.output(b.node("Cast", [dropout + "1"], to=1))
    outcome = fold_batchnorms(b.model())

    assert [record.reason for record in outcome.left] == [
        "Dropout 'dropout0' may drop values (training mode or its mask is used)"
    ]


def test_a_bias_add_after_a_transposed_matmul_is_not_moved_before_the_transpose() -> None:
    b = GraphBuilder(seed=8)
    t = b.node("Transpose", [_linear_3d(b, b.input("x", [2, 5, 6]), 6, 4, bias=False)], perm=[0, 2, 1])
    b.output(b.node("Add", [t, b.const("c", np.ones((4, 1), np.float32))]))
    model = b.model()

    assert fold_batchnorms(model).folds == []


def test_gemm_then_identity_then_batchnorm_folds_also_when_beta_must_change() -> None:
    """Without C, a Gemm's beta becomes 1 to carry the shift: set on the Gemm, not on the Identity."""
    b = GraphBuilder(seed=9)
    x = b.input("x", [3, 6])
    b.output(b.batchnorm(b.node("Identity", [b.gemm(x, 6, 4)]), 4))
    b.output(b.batchnorm(b.node("Identity", [b.gemm(x, 6, 4, bias=False, beta=0.5)]), 4))
    check = fold_and_compare(b.model())

    assert [r.rule for r in check.outcome.folds] == ["gemm-bn through Identity"] * 2 and not check.outcome.left
    betas = [a.f for node in check.folded.graph.node if node.op_type == "Gemm" for a in node.attribute if a.name == "beta"]
    assert betas == [1.0]


NCHW_TO_NHWC = [0, 2, 3, 1]
NHWC_TO_NCHW = [0, 3, 1, 2]


def decomposed_bn(b: GraphBuilder, x: str, shape: list[int]) -> str:
    """``x * m + a`` by per-channel constants of ``shape``, as tf2onnx writes a Keras BN."""
    scaled = b.node("Mul", [x, b.const("m", b.rng.uniform(0.5, 1.5, shape).astype(np.float32))])
    return b.node("Add", [scaled, b.const("a", b.rng.normal(0.0, 0.5, shape).astype(np.float32))])


def nhwc_conv(b: GraphBuilder, x: str, c_in: int, c_out: int, **conv: object) -> str:
    """An NHWC layer as tf2onnx writes it: Transpose → Conv (NCHW) → Transpose."""
    y = b.conv(b.node("Transpose", [x], perm=NHWC_TO_NCHW), c_in, c_out, **conv)
    return b.node("Transpose", [y], perm=NCHW_TO_NHWC)


def affine_count(check: FoldCheck) -> tuple[int, int, int]:
    return tuple(op_count(check.folded, op) for op in ("BatchNormalization", "Mul", "Add"))


def left_reasons(check: FoldCheck) -> list[str]:
    return [record.reason for record in check.outcome.left]


# -- tf2onnx layouts, backward: layer → Transpose/Squeeze → affine ----------------------------------


@pytest.mark.parametrize("group", [1, 6])
def test_nhwc_affine_after_transpose_folds_into_conv(group: int) -> None:
    b = GraphBuilder(seed=1)
    y = nhwc_conv(b, b.input("x", [2, 7, 7, 6]), 6, 6, group=group)
    b.output(decomposed_bn(b, y, [6]))
    check = fold_and_compare(b.model())
    assert affine_count(check) == (0, 0, 0)
    assert op_count(check.folded, "Transpose") == 2 and op_count(check.folded, "Conv") == 1
    assert [(fold.rule, fold.target) for fold in check.outcome.folds] == [
        ("conv-bn through Transpose", "Transpose 'transpose1', Conv 'conv0'")
    ]


def test_nhwc_affine_after_transpose_folds_into_convtranspose() -> None:
    b = GraphBuilder(seed=2)
    y = b.conv_transpose(b.node("Transpose", [b.input("x", [1, 5, 5, 4])], perm=NHWC_TO_NCHW), 4, 6, strides=[2, 2])
    b.output(decomposed_bn(b, b.node("Transpose", [y], perm=NCHW_TO_NHWC), [6]))
    check = fold_and_compare(b.model())
    assert affine_count(check) == (0, 0, 0)
    assert [fold.rule for fold in check.outcome.folds] == ["convtranspose-bn through Transpose"]


def test_batchnorm_after_a_transpose_that_keeps_channels_on_axis_1_folds() -> None:
    b = GraphBuilder(seed=3)
    y = b.node("Transpose", [b.conv(b.input("x", [2, 3, 5, 7]), 3, 4)], perm=[0, 1, 3, 2])
    b.output(b.batchnorm(y, 4))
    check = fold_and_compare(b.model())
    assert affine_count(check) == (0, 0, 0)
    assert [fold.rule for fold in check.outcome.folds] == ["conv-bn through Transpose"]


@pytest.mark.parametrize("opset", [11, 13])
def test_conv1d_affine_after_squeeze_folds_into_conv(opset: int) -> None:
    """tf2onnx's Conv1D: Unsqueeze → Conv (1 × k) → Squeeze, then Mul → Add by [1, C, 1].
    Squeeze's axes are an attribute before opset 13, an input from it on."""
    b = GraphBuilder(seed=4)

    def axes_of(op: str, x: str) -> str:
        return b.node(op, [x], axes=[2]) if opset < 13 else b.node(op, [x, b.const("axes", np.array([2]))])

    y = axes_of("Squeeze", b.conv(axes_of("Unsqueeze", b.input("x", [2, 3, 10])), 3, 5, kernel=(1, 3)))
    b.output(decomposed_bn(b, y, [1, 5, 1]))
    check = fold_and_compare(b.model(opset=opset))
    assert affine_count(check) == (0, 0, 0)
    assert [fold.rule for fold in check.outcome.folds] == ["conv-bn through Squeeze"]


# -- forward: affine → Transpose/Unsqueeze → layer ------------------------------------------------


def test_nhwc_input_affine_folds_through_transpose_into_unpadded_conv() -> None:
    """A Keras BN on the input image: Mul → Add by [C] → Transpose → Conv (VALID)."""
    b = GraphBuilder(seed=6)
    b.output(nhwc_conv(b, decomposed_bn(b, b.input("x", [2, 8, 8, 3]), [3]), 3, 4, pads=[0, 0, 0, 0]))
    check = fold_and_compare(b.model())
    assert affine_count(check) == (0, 0, 0)
    assert [(fold.rule, fold.target) for fold in check.outcome.folds] == [
        ("bn-conv through Transpose", "Conv 'conv0', Transpose 'transpose0'")
    ]


def test_affine_folds_through_unsqueeze_into_conv() -> None:
    b = GraphBuilder(seed=7)
    x = b.node("Unsqueeze", [decomposed_bn(b, b.input("x", [2, 3, 9]), [3, 1]), b.const("axes", np.array([2]))])
    b.output(b.conv(x, 3, 4, kernel=(1, 3), pads=[0, 0, 0, 0]))
    check = fold_and_compare(b.model())
    assert affine_count(check) == (0, 0, 0)
    assert [fold.rule for fold in check.outcome.folds] == ["bn-conv through Unsqueeze"]


def test_affine_folds_through_unsqueeze_then_transpose_into_conv1d() -> None:
    """tf2onnx's Conv1D on a channels-last input: Mul → Add by [C] → Unsqueeze → Transpose → Conv."""
    b = GraphBuilder(seed=13)
    x = b.node("Unsqueeze", [decomposed_bn(b, b.input("x", [2, 9, 3]), [3]), b.const("axes", np.array([1]))])
    y = b.conv(b.node("Transpose", [x], perm=NHWC_TO_NCHW), 3, 4, kernel=(1, 3), pads=[0, 0, 0, 0])
    b.output(y)
    check = fold_and_compare(b.model())
    assert affine_count(check) == (0, 0, 0)
    assert [(fold.rule, fold.target, fold.notes) for fold in check.outcome.folds] == [
        (
            "bn-conv through Unsqueeze, Transpose",
            "Conv 'conv0', Transpose 'transpose0', Unsqueeze 'unsqueeze0'",
            ("through Unsqueeze 'unsqueeze0'", "through Transpose 'transpose0'"),
        )
    ]


def test_input_affine_through_transpose_into_padded_conv_needs_exact_padding() -> None:
    def model():  # noqa: ANN202 - a fresh model per fold
        b = GraphBuilder(seed=8)
        b.output(nhwc_conv(b, decomposed_bn(b, b.input("x", [1, 6, 6, 3]), [3]), 3, 4))
        return b.model()

    assert fold_and_compare(model()).outcome.folds == []
    check = fold_and_compare(model(), rules=build_rules(exact_padding=True))
    assert affine_count(check) == (0, 0, 1)  # the per-position padding bias
    assert [fold.rule for fold in check.outcome.folds] == ["bn-conv through Transpose"]


# -- refusals --------------------------------------------------------------------------------------


def test_refused_when_the_layer_output_has_another_reader() -> None:
    b = GraphBuilder(seed=9)
    y = b.conv(b.input("x", [1, 3, 5, 5]), 3, 4)
    b.output(b.node("Relu", [y]))
    b.output(b.batchnorm(b.node("Transpose", [y], perm=[0, 1, 3, 2]), 4))
    check = fold_and_compare(b.model())
    assert left_reasons(check) == [
        "through Transpose 'transpose0': "
        "Conv 'conv0' output also feeds Relu 'relu0'"
    ]


def test_refused_when_the_transpose_moves_a_spatial_axis_onto_the_bn_axis() -> None:
    b = GraphBuilder(seed=11)
    y = b.node("Transpose", [b.conv(b.input("x", [1, 3, 4, 4]), 3, 4)], perm=[0, 2, 1, 3])
    b.output(b.batchnorm(y, 4))
    check = fold_and_compare(b.model())
    assert left_reasons(check) == [
        "through Transpose 'transpose0': "
        "Transpose 'transpose0' scales axis 2 of a rank-4 output from Conv 'conv0', whose channels are axis 1"
    ]


def test_forward_refused_when_the_transpose_feeds_a_padded_conv() -> None:
    b = GraphBuilder(seed=12)
    bn = b.batchnorm(b.input("x", [1, 3, 6, 6]), 3)
    b.output(b.conv(b.node("Transpose", [bn], perm=[0, 1, 3, 2]), 3, 4))
    check = fold_and_compare(b.model())
    assert left_reasons(check) == [
        "through Transpose 'transpose0': Conv 'conv0' pads its input: "
        "the padded zeros bypass the BN's shift, so the fold is not exact (--exact-padding adds a per-position "
        "bias instead)"
    ]


# -- property: any permutation ---------------------------------------------------------------------


@settings(deadline=None, max_examples=25)
@given(
    perm=st.permutations(range(4)),
    sizes=st.lists(st.integers(2, 5), min_size=3, max_size=3, unique=True),
    seed=st.integers(0, 1000),
)
def test_affine_on_the_last_axis_after_any_transpose(perm: list[int], sizes: list[int], seed: int) -> None:
    """Conv → Transpose(perm) → Mul → Add on the last axis: folded exactly when that axis is
    the Conv's channel axis (``perm[-1] == 1``), left as arithmetic otherwise; always equivalent."""
    channels, height, width = sizes
    b = GraphBuilder(seed=seed)
    y = b.node("Transpose", [b.conv(b.input("x", [2, 3, height, width]), 3, channels)], perm=list(perm))
    last = [2, channels, height, width][perm[-1]]
    b.output(decomposed_bn(b, y, [last]))
    check = fold_and_compare(b.model())
    folds = perm[-1] == 1
    assert affine_count(check) == ((0, 0, 0) if folds else (0, 1, 1))
    assert [fold.rule for fold in check.outcome.folds] == (["conv-bn through Transpose"] if folds else [])
