"""Producer → BatchNormalization patterns beyond Conv/Gemm, each proven through onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.graph import GraphIndex
from bnfold.rules import RULES, Affine, Refusal
from bnfold.rules.batchnorm_merge import BnMerge
from bnfold.rules.convtranspose import ConvTransposeBn
from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare, op_count

# -- ConvTranspose ------------------------------------------------------------------------------


@settings(deadline=None, max_examples=25)
@given(
    spatial_dims=st.integers(1, 3),
    group=st.integers(1, 3),
    per_group_in=st.integers(1, 2),
    per_group_out=st.integers(1, 3),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
    data=st.data(),
)
def test_convtranspose_bn_folds_for_random_geometry(
    spatial_dims: int, group: int, per_group_in: int, per_group_out: int, kernel: int, stride: int,
    bias: bool, seed: int, data: st.DataObject,
) -> None:
    # output_padding must be smaller than the stride (or the dilation).
    output_padding = data.draw(st.integers(0, stride - 1))
    c_in, c_out = group * per_group_in, group * per_group_out
    b = GraphBuilder(seed=seed)
    x = b.input("x", [2, c_in, *([4] * spatial_dims)])
    y = b.conv_transpose(
        x, c_in, c_out, kernel=(kernel,) * spatial_dims, group=group, bias=bias,
        strides=[stride] * spatial_dims, output_padding=[output_padding] * spatial_dims,
    )
    b.output(b.batchnorm(y, c_out))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, "BatchNormalization") == 0
    assert op_count(check.folded, "ConvTranspose") == 1
    assert [fold.rule for fold in check.outcome.folds] == ["convtranspose-bn"]


def test_convtranspose_with_shared_weight_gets_its_own_copy() -> None:
    b = GraphBuilder(seed=3)
    x = b.input("x", [1, 4, 5, 5])
    weight = b.random("W", [4, 2, 3, 3])
    first = b.node("ConvTranspose", [x, weight], group=2)
    second = b.node("ConvTranspose", [x, weight], group=2)
    b.output(b.batchnorm(first, 4))
    b.output(second)
    check = fold_and_compare(b.model())
    assert op_count(check.folded, "BatchNormalization") == 0
    assert any("is shared" in note for note in check.outcome.folds[0].notes)


def test_convtranspose_with_runtime_weight_is_refused_with_reason() -> None:
    b = GraphBuilder(seed=4)
    x = b.input("x", [1, 3, 4, 4])
    weight = b.input("w", [3, 2, 3, 3])
    b.output(b.batchnorm(b.node("ConvTranspose", [x, weight]), 2))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, "BatchNormalization") == 1
    assert "ConvTranspose 'convtranspose0' weight 'w' is not a constant (a graph input)" in check.outcome.left[0].reason


# -- MatMul and MatMul + Add ----------------------------------------------------------------------


def matmul(b: GraphBuilder, x: str, k: int, n: int, *, bias: bool = False) -> str:
    """A Linear as MatMul(X, W[K, N]) and, with ``bias``, an Add of a constant [N]."""
    y = b.node("MatMul", [x, b.random("W", [k, n], scale=1.0 / np.sqrt(k))])
    return b.node("Add", [y, b.random("bias", [n], scale=0.1)]) if bias else y


def test_rank_2_matmul_bn_becomes_one_gemm() -> None:
    b = GraphBuilder(seed=5)
    x = b.input("x", ["batch", 6])
    b.output(b.batchnorm(matmul(b, x, 6, 5), 5))
    check = fold_and_compare(b.model(), shapes={"x": (3, 6)})
    assert [node.op_type for node in check.folded.graph.node] == ["Gemm"]
    assert [fold.rule for fold in check.outcome.folds] == ["matmul-bn"]


def test_rank_2_matmul_add_bn_becomes_one_gemm() -> None:
    b = GraphBuilder(seed=6)
    x = b.input("x", [4, 8])
    hidden = b.node("Relu", [b.batchnorm(matmul(b, x, 8, 7, bias=True), 7)])
    b.output(b.batchnorm(matmul(b, hidden, 7, 3, bias=True), 3))
    check = fold_and_compare(b.model())
    assert [node.op_type for node in check.folded.graph.node] == ["Gemm", "Relu", "Gemm"]
    assert [fold.rule for fold in check.outcome.folds] == ["matmul-add-bn", "matmul-add-bn"]


@pytest.mark.parametrize("rows", ["M", 1, 3])
@pytest.mark.parametrize("bias_shape", [[5], [1, 5], [3, 5]])
@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_a_bias_that_enlarges_the_product_never_becomes_gemm_c(rows: int | str, bias_shape: list[int],
                                                             direction: str) -> None:
    """Gemm's C broadcasts to [M, N] and never enlarges it; an Add's bias may: a [3, N] bias
    turns a [1, N] product into [3, N]. Such a bias stays in its Add, and the folded model
    runs wherever the original does (M = 1 and M = 3 when M is symbolic)."""
    b = GraphBuilder(seed=12)
    x = b.input("x", [rows, 6])
    if direction == "forward":
        x = b.batchnorm(x, 6)
    y = b.node("Add", [b.node("MatMul", [x, b.random("W", [6, 5])]), b.random("bias", bias_shape)])
    b.output(b.batchnorm(y, 5) if direction == "backward" else y)
    model = b.model()
    onnx.checker.check_model(model, full_check=True)
    sizes = [1, 3] if rows == "M" else [rows]
    rng = np.random.default_rng(0)
    variants = [{"x": rng.standard_normal((size, 6)).astype(np.float32)} for size in sizes]
    check = fold_and_compare(model, shapes={"x": (sizes[-1], 6)}, input_variants=variants)
    assert op_count(check.folded, "BatchNormalization") == 0
    fits_gemm = len(bias_shape) == 1 or bias_shape[0] == 1 or bias_shape[0] == rows
    kept = ["MatMul", "Add"] if direction == "backward" else ["Gemm", "Add"]
    assert [node.op_type for node in check.folded.graph.node] == (["Gemm"] if fits_gemm else kept)


def test_batched_matmul_add_affine_stays_one_matmul_and_one_add() -> None:
    b = GraphBuilder(seed=6)
    x = b.input("x", [2, 4, 8])
    linear = matmul(b, x, 8, 7, bias=True)
    b.output(b.node("Add", [b.node("Mul", [linear, b.random("s", [7])]), b.random("t", [7])]))
    check = fold_and_compare(b.model())
    assert [node.op_type for node in check.folded.graph.node] == ["MatMul", "Add"]


def test_matmul_add_bn_with_bias_first_and_weight_shared() -> None:
    b = GraphBuilder(seed=7)
    x = b.input("x", [4, 8])
    weight = b.random("W", [8, 8])
    first = b.node("Add", [b.random("bias", [8]), b.node("MatMul", [x, weight])])
    b.output(b.batchnorm(first, 8))
    b.output(b.node("MatMul", [x, weight]))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, "BatchNormalization") == 0
    assert any("weight" in note and "is shared" in note for note in check.outcome.folds[0].notes)


def test_matmul_rank3_bn_over_time_axis_is_refused() -> None:
    """[N, T, C] with a BN of T channels: T is not a column of W."""
    b = GraphBuilder(seed=8)
    x = b.input("x", [2, 5, 6])
    b.output(b.batchnorm(matmul(b, x, 6, 4), 5))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, "BatchNormalization") == 1
    assert "MatMul 'matmul0' weight shape [6, 4] is not [K, 5]" in check.outcome.left[0].reason


def test_matmul_rank3_bn_with_matching_width_is_refused_for_the_axis() -> None:
    b = GraphBuilder(seed=9)
    x = b.input("x", [2, 4, 6])
    b.output(b.batchnorm(matmul(b, x, 6, 4), 4))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, "BatchNormalization") == 1
    assert (
        "BatchNormalization 'batchnormalization0' scales axis 1 of a rank-3 output from MatMul 'matmul0', "
        "whose channels are axis -1" in check.outcome.left[0].reason
    )


def test_matmul_of_unknown_rank_is_refused() -> None:
    """Squeeze without axes on symbolic dims: nobody knows how many axes remain."""
    b = GraphBuilder(seed=10)
    x = b.node("Squeeze", [b.input("x", ["a", "b", 6])])
    b.output(b.batchnorm(matmul(b, x, 6, 4), 4), ["n", 4])
    check = fold_and_compare(b.model(), shapes={"x": (3, 1, 6)})
    assert op_count(check.folded, "BatchNormalization") == 1
    assert "of an output of unknown rank from MatMul 'matmul0'" in check.outcome.left[0].reason


def test_matmul_add_whose_matmul_output_is_shared_is_refused() -> None:
    b = GraphBuilder(seed=11)
    x = b.input("x", [3, 6])
    product = b.node("MatMul", [x, b.random("W", [6, 4])])
    b.output(b.batchnorm(b.node("Add", [product, b.random("bias", [4])]), 4))
    b.output(b.node("Relu", [product]))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, "BatchNormalization") == 1
    assert "MatMul 'matmul0' output also feeds Relu 'relu0'" in check.outcome.left[0].reason


def test_matmul_with_runtime_weight_is_refused() -> None:
    b = GraphBuilder(seed=12)
    x = b.input("x", [3, 6])
    w = b.input("w", [6, 4])
    b.output(b.batchnorm(b.node("MatMul", [x, w]), 4))
    check = fold_and_compare(b.model())
    assert "MatMul 'matmul0' weight 'w' is not a constant (a graph input)" in check.outcome.left[0].reason


# -- chains, and affines merged into a BN that stays ----------------------------------------------


def test_conv_bn_bn_folds_both_over_two_passes() -> None:
    b = GraphBuilder(seed=13)
    y = b.conv(b.input("x", [1, 3, 6, 6]), 3, 4)
    b.output(b.batchnorm(b.batchnorm(y, 4), 4))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, "BatchNormalization") == 0 and op_count(check.folded, "Conv") == 1
    assert [fold.rule for fold in check.outcome.folds] == ["conv-bn", "conv-bn"]


def test_conv_add_bias_then_bn_folds_both() -> None:
    """PyTorch sometimes exports a Conv bias as its own Add: the Add folds first, then the BN."""
    b = GraphBuilder(seed=14)
    y = b.conv(b.input("x", [1, 3, 6, 6]), 3, 4, bias=False)
    y = b.node("Add", [y, b.random("bias", [1, 4, 1, 1])])
    b.output(b.batchnorm(y, 4))
    check = fold_and_compare(b.model())
    assert [op_count(check.folded, op) for op in ("BatchNormalization", "Add", "Conv")] == [0, 0, 1]


def test_conv_bn_then_mul_add_all_fold_into_the_conv() -> None:
    b = GraphBuilder(seed=15)
    y = b.batchnorm(b.conv(b.input("x", [1, 3, 6, 6]), 3, 4), 4)
    y = b.node("Add", [b.node("Mul", [y, b.random("m", [4, 1, 1])]), b.random("a", [4, 1, 1])])
    b.output(y)
    check = fold_and_compare(b.model())
    assert [op_count(check.folded, op) for op in ("BatchNormalization", "Mul", "Add")] == [0, 0, 0]
    assert [fold.kind for fold in check.outcome.folds] == ["BatchNormalization", "Mul+Add"]


def test_bn_scale_merges_into_a_bn_that_stays() -> None:
    """Caffe2's BN + Scale after a Relu: the Mul → Add merges into the BN, which is left."""
    b = GraphBuilder(seed=16)
    y = b.batchnorm(b.node("Relu", [b.input("x", [2, 4, 5, 5])]), 4)
    y = b.node("Add", [b.node("Mul", [y, b.random("m", [4, 1, 1])]), b.random("a", [4, 1, 1])])
    b.output(y)
    check = fold_and_compare(b.model())
    assert [op_count(check.folded, op) for op in ("BatchNormalization", "Mul", "Add")] == [1, 0, 0]
    assert [(fold.kind, fold.rule) for fold in check.outcome.folds] == [("Mul+Add", "bn-merge")]
    assert "no foldable neighbour: input from Relu 'relu0'" in check.outcome.left[0].reason


def test_bn_bn_merge_when_neither_reaches_a_layer() -> None:
    b = GraphBuilder(seed=17)
    x = b.input("x", [3, 6])
    b.output(b.batchnorm(b.batchnorm(b.node("Relu", [x]), 6), 6))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, "BatchNormalization") == 1
    assert [fold.rule for fold in check.outcome.folds] == ["bn-merge"]
    assert len(check.outcome.left) == 1


def test_last_axis_affine_merges_into_a_rank2_bn_only() -> None:
    b = GraphBuilder(seed=18)
    flat = b.batchnorm(b.node("Relu", [b.input("x", [3, 6])]), 6)
    b.output(b.node("Mul", [flat, b.random("m", [6])]))
    image = b.batchnorm(b.node("Relu", [b.input("y", [1, 6, 6, 6])]), 6)
    b.output(b.node("Mul", [image, b.random("m", [6])]))
    check = fold_and_compare(b.model())
    assert [op_count(check.folded, op) for op in ("BatchNormalization", "Mul")] == [2, 1]
    assert [fold.target for fold in check.outcome.folds] == ["BatchNormalization 'batchnormalization0'"]


def test_bn_with_runtime_scale_cannot_absorb_the_next_bn() -> None:
    b = GraphBuilder(seed=19)
    relu = b.node("Relu", [b.input("x", [2, 4, 3, 3])])
    _, beta, mean, var = b.batchnorm_parameters(4)
    y = b.node("BatchNormalization", [relu, b.input("gamma", [4]), beta, mean, var])
    b.output(b.batchnorm(y, 4))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, "BatchNormalization") == 2
    reasons = {record.batchnorm: record.reason for record in check.outcome.left}
    assert reasons["batchnormalization1"] == (
        "BatchNormalization 'batchnormalization0' cannot absorb it: "
        "BatchNormalization 'batchnormalization0' scale 'gamma' is not a constant (a graph input)"
    )


def test_convtranspose_decoder_sample_folds_both_batchnorms() -> None:
    model = onnx.load(str(Path(__file__).resolve().parent.parent / "sample_models" / "convtranspose_decoder.onnx"))
    check = fold_and_compare(model, shapes={"latent": (2, 8, 4, 4)})
    assert op_count(check.folded, "BatchNormalization") == 0 and op_count(check.folded, "ConvTranspose") == 2
    assert [fold.rule for fold in check.outcome.folds] == ["convtranspose-bn", "convtranspose-bn"]


# -- refusals that a valid model cannot show end to end: the rule asked directly ------------------


def affine_over(graph: GraphIndex, node_position: int, channels: int) -> Affine:
    """A stand-in per-channel affine of ``channels`` at a node of the graph (s = 2, t = 1)."""
    node = graph.nodes[node_position]
    return Affine((node,), node.input[0], node.output[0], np.full(channels, 2.0), np.ones(channels))


def test_convtranspose_weight_that_does_not_give_the_channels_is_refused() -> None:
    b = GraphBuilder(seed=33)
    y = b.conv_transpose(b.input("x", [1, 4, 3, 3]), 4, 4, group=2)
    b.output(b.node("Relu", [y]))
    graph = GraphIndex(b.model())
    refusal = ConvTransposeBn().plan(affine_over(graph, 1, 6), graph, RULES)
    assert refusal == Refusal(
        "ConvTranspose 'convtranspose0' weight shape [4, 2, 3, 3] with group=2 does not give the BN's 6 channels"
    )


def test_merge_of_different_channel_counts_is_refused() -> None:
    b = GraphBuilder(seed=34)
    y = b.batchnorm(b.node("Relu", [b.input("x", [2, 4, 3, 3])]), 4)
    b.output(b.node("Relu", [y]))
    graph = GraphIndex(b.model())
    refusal = BnMerge().plan(affine_over(graph, 2, 8), graph, RULES)
    assert refusal == Refusal("BatchNormalization 'batchnormalization0' has 4 channels, Relu 'relu1' 8")


def test_float16_matmul_weight_that_would_overflow_is_refused() -> None:
    b = GraphBuilder(seed=35, dtype=np.float16)
    y = b.node("MatMul", [b.input("x", [2, 3]), b.const("W", np.full([3, 2], 1000.0, np.float16))])
    ones = np.ones(2, np.float16)
    tiny_var = np.full(2, 1e-4, np.float16)
    parameters = [b.const(name, values) for name, values in (("g", ones), ("b", ones), ("m", ones), ("v", tiny_var))]
    b.output(b.node("BatchNormalization", [y, *parameters], epsilon=0.0))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, "BatchNormalization") == 1
    assert "MatMul 'matmul0': folded weight would overflow float16" in check.outcome.left[0].reason


def test_rank_of_uses_declarations_constants_then_shape_inference() -> None:
    b = GraphBuilder(seed=36)
    product = b.node("MatMul", [b.input("x", [2, 3, 6]), b.random("W", [6, 4])])
    squeezed = b.node("Squeeze", [b.input("z", ["a", "b"])])  # how many axes remain is unknown
    b.output(b.node("Relu", [product]))
    b.output(b.node("Identity", [squeezed]), ["n"])
    model = b.model()
    del model.graph.value_info[:]  # nothing declared between the nodes
    graph = GraphIndex(model)
    assert [graph.rank_of(name) for name in ("x", "z", "W0", product, squeezed, "identity0_out")] == [3, 2, 2, 3, None, 1]
