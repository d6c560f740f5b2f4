"""Decomposed BatchNormalization (Mul/Add/Sub/Div by per-channel constants) after each producer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.graph import GraphIndex
from bnfold.rules import RULES
from bnfold.rules.conv import ConvBn
from bnfold.rules.decomposed import read_decomposed_affine
from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare, op_count

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
ARITHMETIC = ("Mul", "Add", "Sub", "Div")


def positive(b: GraphBuilder, shape: list[int]) -> str:
    """A per-channel constant away from zero (a divisor, or a scale like a folded BN's)."""
    return b.const("k", b.rng.uniform(0.5, 1.5, shape).astype(np.float32))


def apply(b: GraphBuilder, op: str, x: str, shape: list[int], *, constant_first: bool = False) -> str:
    constant = positive(b, shape)
    return b.node(op, [constant, x] if constant_first else [x, constant])


def arithmetic_counts(model: onnx.ModelProto) -> list[int]:
    return [op_count(model, op) for op in ARITHMETIC]


# -- after Conv (NCHW, constants [C, 1, 1] or [1, C, 1, 1]) -----------------------------------------


@pytest.mark.parametrize(
    ("chain", "constant_shape"),
    [
        ((("Mul", False), ("Add", False)), [6, 1, 1]),  # tf2onnx: x * m + a
        ((("Mul", True), ("Add", True)), [1, 6, 1, 1]),  # constants first
        ((("Div", False), ("Sub", False)), [6, 1, 1]),  # x / d - c
        ((("Sub", False), ("Mul", False)), [6, 1, 1]),  # (x - c) * m
        ((("Sub", True), ("Div", False)), [6, 1, 1]),  # (c - x) / d
        ((("Mul", False),), [6, 1, 1]),  # a layer scale
        ((("Add", False),), [1, 6, 1, 1]),  # a bias kept apart from its Conv
        ((("Mul", False), ("Add", False), ("Mul", False), ("Add", False)), [6, 1, 1]),
    ],
)
def test_decomposed_affine_after_conv_folds_completely(chain: tuple, constant_shape: list[int]) -> None:
    b = GraphBuilder(seed=20)
    y = b.conv(b.input("x", [2, 3, 7, 7]), 3, 6, bias=False)
    for op, constant_first in chain:
        y = apply(b, op, y, constant_shape, constant_first=constant_first)
    b.output(y)
    check = fold_and_compare(b.model())
    assert arithmetic_counts(check.folded) == [0, 0, 0, 0]
    assert op_count(check.folded, "Conv") == 1
    assert [fold.kind for fold in check.outcome.folds] == ["+".join(op for op, _ in chain)]


def test_decomposed_affine_after_depthwise_conv1d() -> None:
    b = GraphBuilder(seed=21)
    y = b.conv(b.input("x", [2, 8, 16]), 8, 8, kernel=(3,), group=8)
    b.output(apply(b, "Add", apply(b, "Mul", y, [8, 1]), [8, 1]))
    check = fold_and_compare(b.model())
    assert arithmetic_counts(check.folded) == [0, 0, 0, 0]


def test_decomposed_affine_after_convtranspose() -> None:
    b = GraphBuilder(seed=22)
    y = b.conv_transpose(b.input("x", [1, 4, 5, 5]), 4, 6, group=2, strides=[2, 2])
    b.output(apply(b, "Add", apply(b, "Mul", y, [6, 1, 1]), [6, 1, 1]))
    check = fold_and_compare(b.model())
    assert arithmetic_counts(check.folded) == [0, 0, 0, 0]
    assert [fold.rule for fold in check.outcome.folds] == ["convtranspose-bn"]


# -- after Gemm and MatMul ([N, C], constants [C] or [1, C]) ----------------------------------------


def test_decomposed_affine_after_gemm() -> None:
    b = GraphBuilder(seed=23)
    y = b.gemm(b.input("x", [4, 10]), 10, 5, trans_b=0, beta=0.5)
    b.output(apply(b, "Add", apply(b, "Mul", y, [5]), [1, 5]))
    check = fold_and_compare(b.model())
    assert arithmetic_counts(check.folded) == [0, 0, 0, 0]
    assert op_count(check.folded, "Gemm") == 1


def test_decomposed_affine_after_a_rank_2_matmul_makes_one_gemm() -> None:
    b = GraphBuilder(seed=24)
    y = b.node("MatMul", [b.input("x", [4, 10]), b.random("W", [10, 5])])
    b.output(apply(b, "Sub", apply(b, "Div", y, [5]), [5]))
    check = fold_and_compare(b.model())
    assert arithmetic_counts(check.folded) == [0, 0, 0, 0]
    assert [node.op_type for node in check.folded.graph.node] == ["Gemm"]


def test_decomposed_affine_after_a_batched_matmul_leaves_one_add() -> None:
    b = GraphBuilder(seed=24)
    y = b.node("MatMul", [b.input("x", [2, 4, 10]), b.random("W", [10, 5])])
    b.output(apply(b, "Sub", apply(b, "Div", y, [5]), [5]))
    check = fold_and_compare(b.model())
    assert arithmetic_counts(check.folded) == [0, 1, 0, 0]
    assert op_count(check.folded, "MatMul") == 1


def test_lone_mul_after_matmul_needs_no_add() -> None:
    b = GraphBuilder(seed=25)
    y = b.node("MatMul", [b.input("x", [4, 10]), b.random("W", [10, 5])])
    b.output(apply(b, "Mul", y, [5]))
    check = fold_and_compare(b.model())
    assert arithmetic_counts(check.folded) == [0, 0, 0, 0]


def test_last_axis_affine_after_rank3_matmul_folds() -> None:
    """[N, T, C] with [C] constants: the last axis is the MatMul's channel axis at any rank."""
    b = GraphBuilder(seed=26)
    y = b.node("MatMul", [b.input("x", [2, 3, 10]), b.random("W", [10, 5])])
    b.output(apply(b, "Add", apply(b, "Mul", y, [5]), [5]))
    check = fold_and_compare(b.model())
    assert arithmetic_counts(check.folded) == [0, 1, 0, 0]


def test_lone_bias_add_after_matmul_is_left_as_it_is() -> None:
    b = GraphBuilder(seed=27)
    y = b.node("MatMul", [b.input("x", [4, 10]), b.random("W", [10, 5])])
    b.output(apply(b, "Add", y, [5]))
    check = fold_and_compare(b.model())
    assert arithmetic_counts(check.folded) == [0, 1, 0, 0]
    assert check.outcome.folds == [] and check.outcome.left == []


@settings(deadline=None, max_examples=15)
@given(
    chain=st.lists(st.tuples(st.sampled_from(ARITHMETIC), st.booleans()), min_size=1, max_size=4),
    producer=st.sampled_from(["Conv", "Gemm", "MatMul"]),
    seed=st.integers(0, 1000),
)
def test_random_affine_chains_fold_exactly(chain: list[tuple[str, bool]], producer: str, seed: int) -> None:
    """Any chain of per-channel Mul/Add/Sub/Div (c / x excluded: not affine) folds away."""
    b = GraphBuilder(seed=seed)
    if producer == "Conv":
        y, shape = b.conv(b.input("x", [2, 3, 5, 5]), 3, 4), [4, 1, 1]
    elif producer == "Gemm":
        y, shape = b.gemm(b.input("x", [3, 6]), 6, 4), [4]
    else:
        y, shape = b.node("MatMul", [b.input("x", [3, 6]), b.random("W", [6, 4])]), [4]
    for op, constant_first in chain:
        y = apply(b, op, y, shape, constant_first=constant_first and op != "Div")
    b.output(y)
    check = fold_and_compare(b.model())
    # A lone bias after a MatMul is its folded form already; any other shift makes the
    # rank-2 MatMul a Gemm.
    lone_bias_after_matmul = producer == "MatMul" and len(chain) == 1 and chain[0][0] in ("Add", "Sub")
    expected_subs = int(lone_bias_after_matmul and chain[0][0] == "Sub")
    assert arithmetic_counts(check.folded) == [0, int(lone_bias_after_matmul) - expected_subs, expected_subs, 0]
    shifted = any(op in ("Add", "Sub") for op, _ in chain)
    assert op_count(check.folded, "MatMul") == int(producer == "MatMul" and (lone_bias_after_matmul or not shifted))


# -- what is not a per-channel affine, or cannot fold ---------------------------------------------


@pytest.mark.parametrize(
    ("op", "constant", "constant_first"),
    [
        # (a scalar or one-element constant folds: tests/test_packaged_classes.py)
        ("Add", np.ones([6, 5, 5], np.float32), False),  # per element
        ("Div", np.ones([6, 1, 1], np.float32) * 2, True),  # c / x is not affine
        ("Mul", np.ones([5], np.float32) * 2, False),  # scales W, not C
    ],
)
def test_not_a_foldable_per_channel_affine_stays(op: str, constant: np.ndarray, constant_first: bool) -> None:
    b = GraphBuilder(seed=28)
    y = b.conv(b.input("x", [1, 3, 5, 5]), 3, 6)
    c = b.const("k", constant)
    b.output(b.node(op, [c, y] if constant_first else [y, c]))
    check = fold_and_compare(b.model())
    assert op_count(check.folded, op) == 1
    assert check.outcome.folds == [] and check.outcome.left == []


def test_conv_refuses_an_affine_on_the_last_axis_with_reason() -> None:
    b = GraphBuilder(seed=29)
    y = b.conv(b.input("x", [1, 3, 6, 6]), 3, 6)
    b.output(b.node("Mul", [y, b.const("k", np.full([6], 2.0, np.float32))]))
    graph = GraphIndex(b.model())
    affine = read_decomposed_affine(graph.nodes[-1], graph)
    assert affine is not None and affine.channel_axis == -1
    refusal = ConvBn().plan(affine, graph, RULES)
    assert refusal.reason == "Mul 'mul0' scales axis -1 of a rank-4 output from Conv 'conv0', whose channels are axis 1"


def test_chain_is_read_once_from_its_head() -> None:
    b = GraphBuilder(seed=30)
    y = b.conv(b.input("x", [1, 3, 6, 6]), 3, 4)
    b.output(apply(b, "Add", apply(b, "Mul", y, [4, 1, 1]), [4, 1, 1]))
    graph = GraphIndex(b.model())
    conv, mul, add = graph.nodes
    affine = read_decomposed_affine(mul, graph)
    assert [node.op_type for node in affine.nodes] == ["Mul", "Add"] and affine.channel_axis == 1
    assert read_decomposed_affine(add, graph) is None
    assert read_decomposed_affine(conv, graph) is None


def test_chain_after_a_shared_conv_output_stays_silently() -> None:
    b = GraphBuilder(seed=31)
    y = b.conv(b.input("x", [1, 3, 6, 6]), 3, 4)
    b.output(apply(b, "Add", apply(b, "Mul", y, [4, 1, 1]), [4, 1, 1]))
    b.output(b.node("Relu", [y]))
    check = fold_and_compare(b.model())
    assert arithmetic_counts(check.folded) == [1, 1, 0, 0]
    assert check.outcome.folds == [] and check.outcome.left == []


def test_chain_stops_where_an_intermediate_value_is_also_read() -> None:
    """x * m feeds both the Add and a graph output: only the Mul folds, the Add stays."""
    b = GraphBuilder(seed=32)
    y = b.conv(b.input("x", [1, 3, 6, 6]), 3, 4)
    scaled = apply(b, "Mul", y, [4, 1, 1])
    b.output(apply(b, "Add", scaled, [4, 1, 1]))
    b.output(scaled)
    check = fold_and_compare(b.model())
    assert arithmetic_counts(check.folded) == [0, 1, 0, 0]
    assert [fold.kind for fold in check.outcome.folds] == ["Mul"]


def test_tf_style_sample_folds_every_batchnorm_mul_and_add() -> None:
    model = onnx.load(str(SAMPLES / "tf_style_decomposed.onnx"))
    assert arithmetic_counts(model) == [3, 4, 0, 0]
    check = fold_and_compare(model, shapes={"image": (2, 3, 16, 16)})
    assert arithmetic_counts(check.folded) == [0, 0, 0, 0]  # the Dense with its bias is one Gemm
    assert [fold.kind for fold in check.outcome.folds] == ["Mul+Add", "Mul+Add", "Add+Mul+Add"]


# -- before a layer: the forward rules take a decomposed affine like a BN --------------------------


def test_input_normalization_as_mul_add_folds_forward_into_an_unpadded_conv() -> None:
    b = GraphBuilder(seed=37)
    x = apply(b, "Add", apply(b, "Mul", b.input("x", [1, 3, 8, 8]), [3, 1, 1]), [3, 1, 1])
    b.output(b.conv(x, 3, 4, pads=[0, 0, 0, 0]))
    check = fold_and_compare(b.model())
    assert arithmetic_counts(check.folded) == [0, 0, 0, 0]
    assert [fold.direction for fold in check.outcome.folds] == ["forward"]


def test_last_axis_affine_before_gemm_folds_forward() -> None:
    b = GraphBuilder(seed=38)
    x = apply(b, "Sub", apply(b, "Div", b.input("x", [4, 6]), [6]), [6])
    b.output(b.gemm(x, 6, 3))
    check = fold_and_compare(b.model())
    assert arithmetic_counts(check.folded) == [0, 0, 0, 0]
    assert op_count(check.folded, "Gemm") == 1
