"""Property tests for the fold math of the producer patterns, against direct numpy evaluation."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold import fold_math


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
    scaled = fold_math.scale_convtranspose_weight(weight, s, group)
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
    scaled = fold_math.scale_convtranspose_weight(weight, s, group)
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
