"""Sibling branches summed together merge into one Conv (rule ``branch-merge``): RepVGG, ACNet
and MobileOne blocks re-parameterized, a BN on the identity branch folded into a sibling's kernel,
and the branches that must stay apart, verified in onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from bnfold.pipeline import FoldOptions, fold_file
from bnfold.report import quiet_fold_line
from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare, op_count
from tests.test_schema import _fields, _schema_block


def _branch(b: GraphBuilder, x: str, c_in: int, c_out: int, kernel: tuple[int, ...], *, batchnorm: bool = True,
            **attributes: object) -> str:
    y = b.conv(x, c_in, c_out, kernel, bias=not batchnorm, **attributes)
    return b.batchnorm(y, c_out) if batchnorm else y


def _sum(b: GraphBuilder, terms: list[str]) -> str:
    total = terms[0]
    for term in terms[1:]:
        total = b.node("Add", [total, term])
    return total


def _repvgg(b: GraphBuilder, x: str, channels: int, *, group: int = 1) -> str:
    terms = [_branch(b, x, channels, channels, (3, 3), group=group),
             _branch(b, x, channels, channels, (1, 1), group=group), b.batchnorm(x, channels)]
    return b.node("Relu", [_sum(b, terms)])


def test_repvgg_block_becomes_one_conv() -> None:
    b = GraphBuilder(seed=1)
    b.output(_repvgg(b, b.input("x", [2, 4, 6, 6]), 4))
    check = fold_and_compare(b.model())

    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Relu"]
    rules = sorted((fold.rule, fold.direction) for fold in check.outcome.folds)
    assert rules == [("branch-merge", "sibling"), ("conv-bn", "backward"), ("conv-bn", "backward")]
    identity = next(fold for fold in check.outcome.folds if fold.rule == "branch-merge")
    assert identity.target == "Conv 'conv0'" and "diagonal of tap (1, 1) of the 3×3 kernel" in identity.notes[0]
    (merge,) = check.outcome.merges
    assert (merge.merged, merge.target, merge.rule) == ("conv1", "Conv 'conv0'", "branch-merge")
    assert merge.notes[0] == "1×1 kernel added at tap (1, 1) of the 3×3 kernel"


def test_grouped_and_depthwise_blocks_take_the_identity_on_their_diagonal() -> None:
    """A grouped RepVGG block, and MobileOne's depthwise block of three 3×3 branches, a 1×1 and
    the identity BN summed by one Sum."""
    b = GraphBuilder(seed=2)
    x = _repvgg(b, b.input("x", [1, 6, 5, 5]), 6, group=3)
    terms = [_branch(b, x, 6, 6, (3, 3), group=6) for _ in range(3)]
    terms += [_branch(b, x, 6, 6, (1, 1), group=6), b.batchnorm(x, 6)]
    b.output(b.node("Relu", [b.node("Sum", terms)]))
    check = fold_and_compare(b.model())

    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Relu", "Conv", "Relu"]
    assert len(check.outcome.merges) == 1 + 3


def test_acnet_block_without_batchnorms_merges_its_asymmetric_kernels() -> None:
    """What the dynamo exporter leaves of ACNet: every BN already folded, three Convs summed."""
    b = GraphBuilder(seed=3)
    x = b.input("x", [1, 3, 7, 7])
    terms = [_branch(b, x, 3, 5, kernel, batchnorm=False, strides=[2, 2])
             for kernel in ((3, 3), (1, 3), (3, 1))]
    b.output(b.node("Relu", [_sum(b, terms)]))
    check = fold_and_compare(b.model())

    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Relu"]
    assert not check.outcome.folds
    assert sorted((merge.merged, merge.notes[0]) for merge in check.outcome.merges) == [
        ("conv1", "1×3 kernel added at tap (1, 0) of the 3×3 kernel"),
        ("conv2", "3×1 kernel added at tap (0, 1) of the 3×3 kernel")]


def test_a_decomposed_affine_on_the_identity_branch_joins_the_sibling() -> None:
    """The identity branch as tf2onnx writes a Keras BN: ``x * m + a`` by ``[C, 1, 1]`` constants."""
    b = GraphBuilder(seed=10)
    x = b.input("x", [1, 3, 5, 5])
    scaled = b.node("Mul", [x, b.const("m", np.linspace(0.5, 1.5, 3, dtype=np.float32).reshape(3, 1, 1))])
    shifted = b.node("Add", [scaled, b.const("a", np.linspace(-1, 1, 3, dtype=np.float32).reshape(3, 1, 1))])
    b.output(b.node("Relu", [b.node("Add", [b.conv(x, 3, 3, (3, 3)), shifted])]))
    check = fold_and_compare(b.model())

    assert [(fold.kind, fold.rule, fold.direction) for fold in check.outcome.folds] == [
        ("Mul+Add", "branch-merge", "sibling")]
    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Relu"]


def test_kernels_that_fit_in_neither_stay_apart() -> None:
    """1×3 beside 3×1 alone would make a larger 3×3; a 3×3 beside a 3×3 of another stride or
    dilation reads other positions; a dense 1×1 does not fit in a depthwise kernel."""
    b = GraphBuilder(seed=4)
    x = b.input("x", [1, 4, 7, 7])
    pairs = [
        (dict(kernel=(1, 3)), dict(kernel=(3, 1))),
        (dict(kernel=(3, 3)), dict(kernel=(3, 3), dilations=[2, 2], pads=[2, 2, 2, 2])),
        (dict(kernel=(3, 3), group=4), dict(kernel=(1, 1))),
    ]
    for first, second in pairs:
        terms = [_branch(b, x, 4, 4, batchnorm=False, **first), _branch(b, x, 4, 4, batchnorm=False, **second)]
        b.output(b.node("Add", terms))
    strided = [_branch(b, x, 4, 4, (3, 3), batchnorm=False, strides=[2, 2]),
               _branch(b, x, 4, 4, (3, 3), batchnorm=False, strides=[2, 2], pads=[0, 0, 2, 2])]
    b.output(b.node("Add", strided))
    check = fold_and_compare(b.model())

    assert not check.outcome.merges
    assert op_count(check.folded, "Conv") == 8


@pytest.mark.parametrize("form", ["Add(c, c)", "Sum(c, c)", "Sum(k, d, d)"])
def test_one_conv_added_twice_is_not_merged_with_itself(form: str) -> None:
    """Two terms of one sum computed by the same Conv are one branch: "merging" it into
    itself would delete it. Different Convs over the same input still merge."""
    b = GraphBuilder(seed=21)
    x = b.input("x", [2, 4, 6, 6])
    conv = _branch(b, x, 4, 4, (1, 1), batchnorm=False)
    if form == "Add(c, c)":
        total = b.node("Add", [conv, conv])
    elif form == "Sum(c, c)":
        total = b.node("Sum", [conv, conv])
    else:
        total = b.node("Sum", [_branch(b, x, 4, 4, (3, 3), batchnorm=False, pads=[1] * 4), conv, conv])
    b.output(b.batchnorm(total, 4))
    check = fold_and_compare(b.model())
    assert not check.outcome.merges
    assert op_count(check.folded, "Conv") == (2 if form == "Sum(k, d, d)" else 1)
    assert [left.reason for left in check.outcome.left] and "twice" in check.outcome.left[0].reason


def test_a_dilated_kernel_takes_a_one_by_one_at_its_centre() -> None:
    b = GraphBuilder(seed=5)
    x = b.input("x", [1, 3, 8, 8])
    terms = [_branch(b, x, 3, 3, (3, 3), dilations=[2, 2], pads=[2, 2, 2, 2]), _branch(b, x, 3, 3, (1, 1)),
             b.batchnorm(x, 3)]
    b.output(_sum(b, terms))
    check = fold_and_compare(b.model())

    assert [node.op_type for node in check.folded.graph.node] == ["Conv"]
    assert check.folded.graph.node[0].output[0] == check.folded.graph.output[0].name


def test_same_padding_1d_and_3d_siblings_merge() -> None:
    b = GraphBuilder(seed=6)
    sequence = b.input("s", [1, 4, 9])
    b.output(_sum(b, [_branch(b, sequence, 4, 4, (5,), auto_pad="SAME_UPPER"), _branch(b, sequence, 4, 4, (1,)),
                      b.batchnorm(sequence, 4)]))
    volume = b.input("v", [1, 2, 4, 4, 4])
    b.output(_sum(b, [_branch(b, volume, 2, 3, (3, 3, 3)), _branch(b, volume, 2, 3, (1, 1, 1))]))
    check = fold_and_compare(b.model())

    assert [node.op_type for node in check.folded.graph.node] == ["Conv", "Conv"]


def test_identity_bn_with_no_sibling_that_can_take_it_is_left_with_the_reasons() -> None:
    b = GraphBuilder(seed=7)
    x = b.input("x", [1, 3, 6, 6])
    around = b.conv(x, 3, 3, (2, 2), dilations=[2, 2], pads=[1, 1, 1, 1])  # reads x one step away, never x itself
    shared = b.conv(x, 3, 3, (1, 1))
    b.output(shared)
    b.output(b.node("Relu", [_sum(b, [around, shared, b.batchnorm(x, 3)])]))
    check = fold_and_compare(b.model())

    (left,) = check.outcome.left
    assert left.reason.startswith("no sibling Conv over 'x' can take it: ")
    assert "Conv 'conv1' output also feeds a graph output" in left.reason
    assert "Conv 'conv0': its taps do not read every position" in left.reason


def test_a_branch_merged_inside_a_model_local_function() -> None:
    b = GraphBuilder(seed=8)
    with b.collecting() as (nodes, initializers):
        y = _sum(b, [_branch(b, "fx", 2, 2, (3, 3), batchnorm=False), _branch(b, "fx", 2, 2, (1, 1), batchnorm=False)])
    constants = [helper.make_node("Constant", [], [tensor.name], value=tensor) for tensor in initializers]
    function = helper.make_function("local", "block", ["fx"], [y], [*constants, *nodes],
                                    opset_imports=[helper.make_opsetid("", 17)])
    b.nodes.append(helper.make_node("block", [b.input("x", [1, 2, 5, 5])], ["y"], domain="local"))
    b.output("y", [1, 2, 5, 5])
    graph = helper.make_graph(b.nodes, "g", b.inputs, b.outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[function], ir_version=8)
    check = fold_and_compare(model)

    assert [merge.merged for merge in check.outcome.merges] == ["function 'block' / conv1"]
    assert [node.op_type for node in check.folded.functions[0].node if node.op_type != "Constant"] == ["Conv"]


def test_report_shows_merges_in_json_and_quiet_line(tmp_path: Path) -> None:
    b = GraphBuilder(seed=9)
    b.output(_repvgg(b, b.input("x", [1, 3, 5, 5]), 3))
    path = tmp_path / "repvgg.onnx"
    onnx.save(b.model(), path)
    report = fold_file(path, FoldOptions())
    document = json.loads(json.dumps(report.to_dict()))

    assert report.status == "equivalent"
    assert set(document["merges"][0]) == _fields(_schema_block()["merges"])
    assert set(document["folds"][0]) == _fields(_schema_block()["folds"])
    assert {fold["direction"] for fold in document["folds"]} == {"backward", "sibling"}
    assert "folded 3 of 3 BatchNormalization, merged 1 sibling branch, equivalent" in quiet_fold_line(report)
    assert np.isfinite(document["merges"][0]["max_rounding_error"])
