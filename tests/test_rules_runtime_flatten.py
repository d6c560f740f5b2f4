"""BN → ``x.view(x.size(0), -1)`` → Linear: a flatten whose shape is computed at run time."""

from __future__ import annotations

import numpy as np

from bnfold.fold import fold_batchnorms
from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare


def _view_head(*, batch_from: str = "bn", tail: list[int] | None = None) -> GraphBuilder:
    """``Gemm(Reshape(BN(x), Concat(Shape(v)[0], tail)))`` as the classic exporter writes a view."""
    b = GraphBuilder(seed=7)
    x = b.input("x", ["n", 3, 2, 2])
    y = b.batchnorm(x, 3)
    source = y if batch_from == "bn" else x
    batch = b.node("Unsqueeze", [b.node("Gather", [b.node("Shape", [source]), b.const("zero", np.array(0))], axis=0),
                                 b.const("axes", np.array([0]))])
    target = b.node("Concat", [batch, b.const("tail", np.array(tail or [-1]))], axis=0)
    flat = b.node("Reshape", [y, target])
    b.output(b.gemm(flat, 12, 5) if tail is None else b.node("MatMul", [flat, b.random("W", [tail[-1], 5])]))
    return b


def test_bn_before_a_runtime_view_folds_into_the_linear_and_the_shape_reads_the_bn_input() -> None:
    check = fold_and_compare(_view_head().model(), shapes={"x": (3, 3, 2, 2)})

    assert [record.rule for record in check.outcome.folds] == ["bn-linear through Reshape"]
    assert "BatchNormalization" not in {node.op_type for node in check.folded.graph.node}
    assert next(n for n in check.folded.graph.node if n.op_type == "Shape").input[0] == "x"


def test_runtime_view_of_batch_from_the_graph_input_folds_too() -> None:
    check = fold_and_compare(_view_head(batch_from="x").model(), shapes={"x": (2, 3, 2, 2)})

    assert len(check.outcome.folds) == 1


def test_runtime_reshape_to_three_axes_is_refused_with_the_reason() -> None:
    model = _view_head(tail=[3, 4]).model()
    outcome = fold_batchnorms(model)

    (left,) = outcome.left
    assert "normalizes axis 1 of a rank-3 tensor, but MatMul 'matmul0' multiplies its last axis" in left.reason
