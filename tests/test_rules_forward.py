"""Forward folds (BN → next layer): equivalence in onnxruntime, exact counts, refusal reasons."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from bnfold.cli import main
from bnfold.graph import GraphIndex
from bnfold.rules import RULES, build_rules
from bnfold.rules.batchnorm import read_batchnorm
from bnfold.rules.forward_conv import BnConv
from bnfold.rules.forward_linear import BnLinear
from bnfold.rules.plan import Affine, FoldPlan, Refusal
from sample_models.generate import classifier_head_bn, input_bn_conv
from sample_models.modelkit import GraphBuilder
from tests.support import FoldCheck, fold_and_compare, op_count

EXACT_PADDING = build_rules(exact_padding=True)


def _only_left_reason(check: FoldCheck) -> str:
    """The reason of the one BN left in place (asserting nothing was folded)."""
    assert not check.outcome.folds and len(check.outcome.left) == 1
    assert op_count(check.folded, "BatchNormalization") == 1
    return check.outcome.left[0].reason


# -- BN → Gemm / MatMul -------------------------------------------------------------------------


@settings(deadline=None, max_examples=25)
@given(
    st.integers(1, 8), st.integers(1, 6), st.sampled_from([0, 1]), st.sampled_from([0.5, 1.0, 2.5]),
    st.sampled_from([0.25, 1.0, 3.0]), st.booleans(), st.integers(0, 1000),
)
def test_bn_on_graph_input_folds_into_following_gemm(
    k: int, n: int, trans_b: int, alpha: float, beta: float, with_c: bool, seed: int
) -> None:
    b = GraphBuilder(seed=seed)
    x = b.input("features", ["batch", k])
    b.output(b.gemm(b.batchnorm(x, k), k, n, trans_b=trans_b, bias=with_c, alpha=alpha, beta=beta))
    check = fold_and_compare(b.model(), shapes={"features": (3, k)})
    assert op_count(check.folded, "BatchNormalization") == 0
    assert [node.op_type for node in check.folded.graph.node] == ["Gemm"]
    (fold,) = check.outcome.folds
    assert (fold.rule, fold.direction) == ("bn-linear", "forward")


def test_bn_into_a_rank_2_matmul_makes_it_a_gemm_holding_the_shift() -> None:
    b = GraphBuilder(seed=1)
    x = b.input("x", ["batch", 6])
    b.output(b.node("Relu", [b.node("MatMul", [b.batchnorm(x, 6), b.random("W", [6, 4])])]))
    check = fold_and_compare(b.model())
    assert [node.op_type for node in check.folded.graph.node] == ["Gemm", "Relu"]
    (fold,) = check.outcome.folds
    assert "becomes a Gemm whose C holds the BN's shift" in fold.notes[0]
    assert len(check.folded.graph.initializer) == 2  # the scaled weight and the new C


def test_bn_into_a_rank_2_matmul_with_a_bias_add_makes_one_gemm() -> None:
    b = GraphBuilder(seed=1)
    x = b.input("x", [3, 6])
    product = b.node("MatMul", [b.batchnorm(x, 6), b.random("W", [6, 4])])
    b.output(b.node("Relu", [b.node("Add", [b.random("c", [1, 4]), product])]))
    check = fold_and_compare(b.model())
    assert [node.op_type for node in check.folded.graph.node] == ["Gemm", "Relu"]


def test_affine_into_a_batched_matmul_adds_the_shift_after_it() -> None:
    b = GraphBuilder(seed=1)
    x = b.input("x", [2, 3, 6])
    scaled = b.node("Add", [b.node("Mul", [x, b.random("s", [6])]), b.random("t", [6])])
    b.output(b.node("Relu", [b.node("MatMul", [scaled, b.random("W", [6, 4])])]))
    check = fold_and_compare(b.model())
    assert [node.op_type for node in check.folded.graph.node] == ["MatMul", "Add", "Relu"]
    (fold,) = check.outcome.folds
    assert "has no bias input: the BN's shift is added after it" in fold.notes[0]


def test_bn_on_last_axis_affine_input_is_not_folded_into_matmul_over_its_last_axis() -> None:
    b = GraphBuilder(seed=2)
    x = b.input("x", [2, 4, 4])  # channels (axis 1) and the MatMul's axis (2) have the same size
    b.output(b.node("MatMul", [b.batchnorm(x, 4), b.random("W", [4, 3])]))
    reason = _only_left_reason(fold_and_compare(b.model()))
    assert "the BN normalizes axis 1 of a rank-3 tensor, but MatMul 'matmul0' multiplies its last axis" in reason


def test_affine_on_last_axis_folds_into_matmul_of_any_rank() -> None:
    """A decomposed affine broadcast on the last axis (channel_axis -1) is what a MatMul multiplies."""
    b = GraphBuilder(seed=3)
    x = b.input("x", [2, 5, 4])
    b.output(b.node("MatMul", [b.batchnorm(x, 5), b.random("W", [4, 3])]))
    model = b.model()
    graph = GraphIndex(model)
    bn = read_batchnorm(graph.nodes[0], graph)
    assert isinstance(bn, Affine)
    last_axis_affine = Affine(bn.nodes, bn.input_name, bn.output_name, bn.s[:4], bn.t[:4], channel_axis=-1)
    assert isinstance(BnLinear().plan(last_axis_affine, graph, RULES), FoldPlan)
    assert BnConv().plan(last_axis_affine, graph, RULES) is None  # no Conv reads it: the rule does not match


def test_gemm_with_transposed_input_is_refused() -> None:
    b = GraphBuilder(seed=4)
    x = b.input("x", [5, 3])
    b.output(b.node("Gemm", [b.batchnorm(x, 3), b.random("W", [5, 2])], transA=1))
    assert "Gemm 'gemm0' has transA=1" in _only_left_reason(fold_and_compare(b.model()))


# -- BN → Flatten / Reshape → Gemm / MatMul -----------------------------------------------------


def _flatten_head(
    flatten: str, batch: int | str = "batch", spatial: tuple = (3, 2), **reshape: object
) -> onnx.ModelProto:
    b = GraphBuilder(seed=5)
    x = b.input("x", [batch, 4, *spatial])
    normalized = b.batchnorm(x, 4)
    if flatten == "Flatten":
        flat = b.node("Flatten", [normalized])
    else:
        flat = b.node("Reshape", [normalized, b.const("shape", np.array(reshape["to"], dtype=np.int64))])
    b.output(b.gemm(flat, 24, 5))
    return b.model()


@pytest.mark.parametrize(
    ("flatten", "batch", "target"),
    [("Flatten", "batch", None), ("Reshape", "batch", [0, 24]), ("Reshape", "batch", [-1, 24]),
     ("Reshape", 2, [2, -1]), ("Reshape", "batch", [0, -1])],
)
def test_bn_folds_through_a_plain_flatten_into_gemm(flatten: str, batch: int | str, target: list | None) -> None:
    check = fold_and_compare(_flatten_head(flatten, batch, to=target))
    assert [node.op_type for node in check.folded.graph.node] == [flatten, "Gemm"]
    (fold,) = check.outcome.folds
    assert fold.rule == f"bn-linear through {flatten}" and fold.target == f"Gemm 'gemm0', {flatten} '{flatten.lower()}0'"


def test_flatten_with_unknown_spatial_size_is_refused() -> None:
    model = _flatten_head("Flatten", spatial=("h", "w"))
    reason = _only_left_reason(fold_and_compare(model, shapes={"x": (2, 4, 3, 2)}))
    assert "Flatten 'flatten0' reshapes [batch, 4, h, w]" in reason and "with sizes unknown" in reason


def test_reshape_that_is_not_a_flatten_is_refused() -> None:
    b = GraphBuilder(seed=6)
    x = b.input("x", [2, 4, 3, 2])
    flat = b.node("Reshape", [b.batchnorm(x, 4), b.const("shape", np.array([8, 6], dtype=np.int64))])
    b.output(b.node("MatMul", [flat, b.random("W", [6, 3])]))
    reason = _only_left_reason(fold_and_compare(b.model()))
    assert "normalizes axis -2 of a rank-2 tensor, but MatMul 'matmul0' multiplies its last axis" in reason


def test_flatten_into_matmul_makes_a_gemm() -> None:
    b = GraphBuilder(seed=7)
    x = b.input("x", ["batch", 3, 2, 2])
    flat = b.node("Flatten", [b.batchnorm(x, 3)])
    b.output(b.node("MatMul", [flat, b.random("W", [12, 4])]))
    check = fold_and_compare(b.model())
    assert [node.op_type for node in check.folded.graph.node] == ["Flatten", "Gemm"]


# -- BN → Conv ----------------------------------------------------------------------------------


@settings(deadline=None, max_examples=25)
@given(
    st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
    st.tuples(st.integers(1, 3), st.integers(1, 3)), st.tuples(st.integers(1, 2), st.integers(1, 2)),
    st.sampled_from(["pads", "VALID", "NOTSET"]), st.booleans(), st.integers(0, 1000),
)
def test_bn_on_graph_input_folds_into_unpadded_conv(
    groups: int, per_group: int, outputs_per_group: int, kernel: tuple[int, int], strides: tuple[int, int],
    padding: str, bias: bool, seed: int,
) -> None:
    channels = groups * per_group
    b = GraphBuilder(seed=seed)
    x = b.input("image", ["batch", channels, 7, 6])
    unpadded = {"pads": [0, 0, 0, 0]} if padding == "pads" else {"auto_pad": padding}
    b.output(b.conv(b.batchnorm(x, channels), channels, groups * outputs_per_group, kernel, group=groups,
                    bias=bias, strides=list(strides), **unpadded))
    check = fold_and_compare(b.model(), shapes={"image": (2, channels, 7, 6)})
    assert [node.op_type for node in check.folded.graph.node] == ["Conv"]
    (fold,) = check.outcome.folds
    assert (fold.rule, fold.direction) == ("bn-conv", "forward")
    assert len(check.folded.graph.node[0].input) == 3  # a missing bias was created


def _padded_conv_model(padding: dict, group: int = 1, strides: tuple[int, int] = (1, 1)) -> onnx.ModelProto:
    b = GraphBuilder(seed=8)
    x = b.input("image", ["batch", 4, 7, 6])
    b.output(b.conv(b.batchnorm(x, 4), 4, 6, (3, 3), group=group, strides=list(strides), **padding))
    return b.model()


def test_bn_into_padded_conv_is_refused_by_default() -> None:
    reason = _only_left_reason(fold_and_compare(_padded_conv_model({"pads": [1, 1, 1, 1]})))
    assert "Conv 'conv0' pads its input: the padded zeros bypass the BN's shift, so the fold is not exact" in reason


@pytest.mark.parametrize(
    ("padding", "group", "strides", "out_shape"),
    [({"pads": [1, 1, 1, 1]}, 1, (1, 1), [7, 6]), ({"pads": [2, 0, 1, 1]}, 2, (2, 1), [4, 5]),
     ({"auto_pad": "SAME_UPPER"}, 2, (2, 2), [4, 3]), ({"auto_pad": "SAME_LOWER"}, 1, (1, 2), [7, 3])],
)
def test_exact_padding_folds_padded_conv_with_a_per_position_bias(
    padding: dict, group: int, strides: tuple[int, int], out_shape: list[int]
) -> None:
    check = fold_and_compare(_padded_conv_model(padding, group, strides), rules=EXACT_PADDING)
    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Add"]
    (fold,) = check.outcome.folds
    assert fold.notes == (
        f"exact padding: added a [1, 6, {out_shape[0]}, {out_shape[1]}] bias after Conv 'conv0' "
        f"({6 * out_shape[0] * out_shape[1] * 4} bytes)",
    )


def test_exact_padding_keeps_the_backward_fold_of_the_bn_after_the_conv() -> None:
    """The Add after a padded Conv must not come between the Conv and the BN that follows it."""
    b = GraphBuilder(seed=16)
    x = b.input("image", ["batch", 4, 6, 6])
    b.output(b.batchnorm(b.conv(b.batchnorm(x, 4), 4, 6, (3, 3)), 6))
    check = fold_and_compare(b.model(), rules=EXACT_PADDING)
    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Add"]
    assert [(fold.rule, fold.direction) for fold in check.outcome.folds] == [
        ("conv-bn", "backward"), ("bn-conv", "forward"),
    ]


def test_exact_padding_needs_static_spatial_sizes() -> None:
    b = GraphBuilder(seed=9)
    x = b.input("image", ["batch", 4, "h", "w"])
    b.output(b.conv(b.batchnorm(x, 4), 4, 6, (3, 3)))
    check = fold_and_compare(b.model(), shapes={"image": (1, 4, 5, 5)}, rules=EXACT_PADDING)
    assert "the BN input's spatial shape is unknown, so the padding correction" in _only_left_reason(check)


def test_affine_on_last_axis_is_refused_by_conv() -> None:
    model = input_bn_conv()
    graph = GraphIndex(model)
    bn = next(found for node in graph.nodes if isinstance(found := read_batchnorm(node, graph), Affine))
    last_axis = Affine(bn.nodes, bn.input_name, bn.output_name, bn.s, bn.t, channel_axis=-1)
    refusal = BnConv().plan(last_axis, graph, RULES)
    assert isinstance(refusal, Refusal)
    assert refusal.reason.startswith("the affine scales axis -1, not the input channels of Conv")


# -- ordering and neighbours --------------------------------------------------------------------


def test_bn_between_two_convs_is_folded_backward_once() -> None:
    b = GraphBuilder(seed=10)
    x = b.input("x", [1, 3, 8, 8])
    middle = b.batchnorm(b.conv(x, 3, 4), 4)
    b.output(b.conv(middle, 4, 5, (1, 1), pads=[0, 0, 0, 0]))
    check = fold_and_compare(b.model())
    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Conv"]
    (fold,) = check.outcome.folds
    assert (fold.rule, fold.direction, fold.target) == ("conv-bn", "backward", "Conv 'conv0'")
    untouched = numpy_helper.to_array(next(t for t in check.original.graph.initializer if t.name == "W1"))
    np.testing.assert_array_equal(numpy_helper.to_array(next(t for t in check.folded.graph.initializer
                                                             if t.name == "W1")), untouched)


def test_nonlinearity_between_bn_and_conv_is_never_folded() -> None:
    b = GraphBuilder(seed=11)
    x = b.input("x", [1, 3, 6, 6])
    b.output(b.conv(b.node("Relu", [b.batchnorm(x, 3)]), 3, 4, (1, 1), pads=[0, 0, 0, 0]))
    reason = _only_left_reason(fold_and_compare(b.model(), rules=EXACT_PADDING))
    assert reason == "no foldable neighbour: input from graph input 'x', output to Relu 'relu0'"


def test_bn_output_that_is_a_graph_output_is_not_folded_forward() -> None:
    b = GraphBuilder(seed=12)
    x = b.input("x", [2, 3])
    normalized = b.batchnorm(x, 3)
    b.output(b.gemm(normalized, 3, 2))
    b.output(normalized)
    assert _only_left_reason(fold_and_compare(b.model())) == "the BN output is also a graph output"


# -- several consumers --------------------------------------------------------------------------


def test_bn_feeding_two_gemms_with_a_shared_weight_folds_into_both() -> None:
    b = GraphBuilder(seed=13)
    x = b.input("x", ["batch", 5])
    normalized = b.batchnorm(x, 5)
    shared = b.random("W", [3, 5])
    b.output(b.node("Gemm", [normalized, shared], transB=1))
    b.output(b.node("Gemm", [normalized, shared, b.random("c", [3])], transB=1, alpha=0.5))
    b.output(b.node("MatMul", [normalized, b.random("W", [5, 2])]))
    check = fold_and_compare(b.model())
    assert [node.op_type for node in check.folded.graph.node] == ["Gemm", "Gemm", "Gemm"]
    (fold,) = check.outcome.folds
    assert fold.target == "Gemm 'gemm0', Gemm 'gemm1', MatMul 'matmul0'"
    gemm_weights = [node.input[1] for node in check.folded.graph.node[:2]]
    # Each Gemm got its own copy; the original W0 is read by nobody afterwards, so the
    # first copy takes its name back and only the second keeps a "shared" note.
    assert gemm_weights == ["W0", "W0_bnfold2"]
    assert [note for note in fold.notes if "is shared" in note] == [
        "weight 'W0' is shared; Gemm 'gemm1' got its own copy 'W0_bnfold2'"
    ]


def test_bn_feeding_a_layer_that_cannot_absorb_it_is_refused() -> None:
    b = GraphBuilder(seed=14)
    x = b.input("x", ["batch", 5])
    normalized = b.batchnorm(x, 5)
    b.output(b.gemm(normalized, 5, 3))
    b.output(b.node("Relu", [normalized]))
    check = fold_and_compare(b.model())
    assert _only_left_reason(check) == "BN output also feeds Relu 'relu0', which cannot absorb it"
    assert check.folded.SerializeToString() == check.original.SerializeToString()


def test_bn_feeding_an_unpadded_and_a_padded_conv_names_the_padded_one() -> None:
    b = GraphBuilder(seed=15)
    x = b.input("image", [1, 4, 6, 6])
    normalized = b.batchnorm(x, 4)
    b.output(b.conv(normalized, 4, 4, (1, 1), pads=[0, 0, 0, 0]))
    b.output(b.conv(normalized, 4, 4, (3, 3)))
    assert _only_left_reason(fold_and_compare(b.model())).startswith("Conv 'conv1' pads its input")
    check = fold_and_compare(b.model(), rules=EXACT_PADDING)
    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Conv", "Add"]


# -- sample models and the command line -----------------------------------------------------------


def test_classifier_head_sample_folds_every_bn() -> None:
    check = fold_and_compare(classifier_head_bn())
    assert op_count(check.folded, "BatchNormalization") == 0 and not check.outcome.left
    assert sorted((fold.rule, fold.direction) for fold in check.outcome.folds) == [
        ("bn-linear", "forward"), ("bn-linear through Flatten", "forward"), ("conv-bn", "backward"),
    ]


def test_input_bn_conv_sample_folds_into_the_unpadded_conv() -> None:
    check = fold_and_compare(input_bn_conv())
    assert op_count(check.folded, "BatchNormalization") == 0 and not check.outcome.left
    assert [fold.direction for fold in check.outcome.folds] == ["backward", "forward"]


def test_exact_padding_flag_reaches_the_fold(tmp_path) -> None:  # noqa: ANN001 - pytest fixture
    source = tmp_path / "padded.onnx"
    onnx.save_model(_padded_conv_model({"pads": [1, 1, 1, 1]}), source)
    runner = CliRunner()
    default = runner.invoke(main, [str(source), "--dry-run", "--json", "-"])
    exact = runner.invoke(main, [str(source), "--dry-run", "--exact-padding", "--json", "-"])
    assert default.exit_code == 0 and exact.exit_code == 0
    assert '"rule": "bn-conv"' not in default.output and '"rule": "bn-conv"' in exact.output
    assert '"status": "equivalent"' in exact.output
