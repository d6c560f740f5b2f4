"""Property tests for the fold math of the producer patterns, against direct numpy evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold import fold_math
from bnfold.rules.decomposed import per_channel_vector


def conv_transpose_reference(x: np.ndarray, weight: np.ndarray, group: int) -> np.ndarray:
    """ConvTranspose with stride 1 and no padding, written out channel by channel (1-D)."""
    batch, c_in, length = x.shape
    _, per_group_out, kernel = weight.shape
    per_group_in = c_in // group
    out = np.zeros((batch, per_group_out * group, length + kernel - 1))
    for i in range(c_in):
        g = i // per_group_in
        for j in range(per_group_out):
            for k in range(kernel):
                out[:, g * per_group_out + j, k : k + length] += x[:, i, :] * weight[i, j, k]
    return out


@settings(deadline=None, max_examples=40)
@given(
    group=st.integers(1, 3),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    kernel=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_convtranspose_scale_multiplies_each_output_channel(
    group: int, per_group_in: int, per_group_out: int, kernel: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    c_in, c_out = group * per_group_in, group * per_group_out
    weight = rng.standard_normal((c_in, per_group_out, kernel))
    s = rng.standard_normal(c_out)
    x = rng.standard_normal((2, c_in, 4))
    scaled = weight * fold_math.convtranspose_factor(s, weight.shape, group)
    expected = conv_transpose_reference(x, weight, group) * s[None, :, None]
    np.testing.assert_allclose(conv_transpose_reference(x, scaled, group), expected, rtol=1e-12, atol=1e-12)


@settings(deadline=None, max_examples=40)
@given(
    group=st.integers(1, 4),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    spatial=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_convtranspose_scale_touches_only_the_output_channel_slices(
    group: int, per_group_in: int, per_group_out: int, spatial: list[int], seed: int
) -> None:
    """Every weight element W[i, j, ...] is multiplied by s[group_of(i) * per_group_out + j]."""
    rng = np.random.default_rng(seed)
    c_in = group * per_group_in
    weight = rng.standard_normal((c_in, per_group_out, *spatial)).astype(np.float32)
    s = rng.standard_normal(group * per_group_out)
    scaled = np.multiply(weight, fold_math.convtranspose_factor(s, weight.shape, group), dtype=np.float64)
    assert scaled.dtype == np.float64 and scaled.shape == weight.shape
    for i in range(c_in):
        for j in range(per_group_out):
            factor = s[(i // per_group_in) * per_group_out + j]
            np.testing.assert_allclose(scaled[i, j], weight[i, j].astype(np.float64) * factor, rtol=1e-15)


@settings(deadline=None, max_examples=40)
@given(channels=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_compose_affines_equals_applying_both(channels: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    first = (rng.standard_normal(channels), rng.standard_normal(channels))
    then = (rng.standard_normal(channels), rng.standard_normal(channels))
    x = rng.standard_normal((5, channels))
    s, t = fold_math.compose_affines(first, then)
    np.testing.assert_allclose(s * x + t, then[0] * (first[0] * x + first[1]) + then[1], rtol=1e-12, atol=1e-12)


@settings(deadline=None, max_examples=60)
@given(
    rank=st.integers(2, 4),
    channels=st.integers(2, 5),
    on_axis_one=st.booleans(),
    leading_ones=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_per_channel_vector_says_which_axis_numpy_broadcasts_over(
    rank: int, channels: int, on_axis_one: bool, leading_ones: int, seed: int
) -> None:
    """A constant [1.., C, 1..] times data equals the [C] vector applied along the reported axis."""
    rng = np.random.default_rng(seed)
    axis = 1 if on_axis_one else rank - 1
    trailing = rank - 1 - axis
    leading = min(leading_ones, axis)  # a constant may not have more axes than the data
    constant = rng.standard_normal([1] * leading + [channels] + [1] * trailing).astype(np.float32)
    data_shape = [3] * rank
    data_shape[axis] = channels
    data = rng.standard_normal(data_shape)
    found = per_channel_vector(constant, rank)
    assert found is not None
    vector, channel_axis = found
    along = [1] * rank
    along[channel_axis] = channels
    np.testing.assert_allclose(data * vector.reshape(along), data * constant.astype(np.float64), rtol=1e-15)


@pytest.mark.parametrize(
    ("constant", "rank"),
    [
        (np.float32(2.0), 4),  # a scalar
        (np.ones([1, 1, 1], np.float32), 4),  # one element
        (np.ones([4, 5, 5], np.float32), 4),  # per element
        (np.ones([4, 1], np.float32), 2),  # axis 0 of a matrix: the batch
        (np.ones([1, 4, 1, 1], np.float32), 3),  # more axes than the data
        (np.ones([4, 1, 1], np.float32), None),  # axis 1 or not: rank unknown
        (np.ones([4], np.int64), 2),  # integer arithmetic
        (np.array([1.0, np.inf], np.float32), 2),  # not finite
    ],
)
def test_per_channel_vector_refuses_what_is_not_per_channel(constant: np.ndarray, rank: int | None) -> None:
    assert per_channel_vector(constant, rank) is None
