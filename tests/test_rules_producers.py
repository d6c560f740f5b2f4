"""Producer → BatchNormalization patterns beyond Conv/Gemm, each proven through onnxruntime."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

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
