"""Layer → Transpose → BN folds (how sequence models and tf2onnx write a BN), through onnxruntime."""

from __future__ import annotations

import numpy as np

from bnfold.fold import fold_batchnorms
from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare, op_count


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


def test_gemm_then_identity_then_batchnorm_folds_unless_beta_must_change() -> None:
    b = GraphBuilder(seed=9)
    x = b.input("x", [3, 6])
    b.output(b.batchnorm(b.node("Identity", [b.gemm(x, 6, 4)]), 4))
    b.output(b.batchnorm(b.node("Identity", [b.gemm(x, 6, 4, bias=False, beta=0.5)]), 4))
    model = b.model()
    check = fold_and_compare(model)

    assert [r.rule for r in check.outcome.folds] == ["gemm-bn through Identity"]
    assert [r.reason for r in check.outcome.left] == [
        "through Identity 'identity1': Gemm 'gemm1' would need beta changed"
    ]
