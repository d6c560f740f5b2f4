"""Forward-fold arithmetic checked against direct numpy evaluation of the unfolded layer."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold import fold_math

TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def _vectors(rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
    """A BN's (s, t): scales of either sign, shifts of any sign."""
    return rng.uniform(0.2, 2.0, length) * rng.choice([-1.0, 1.0], length), rng.normal(0.0, 1.0, length)


def _direct_conv2d(
    image: np.ndarray, weight: np.ndarray, group: int, pads: tuple[int, ...], strides: tuple[int, int],
    dilations: tuple[int, int],
) -> np.ndarray:
    """ONNX Conv of one ``[C, H, W]`` image with zero padding, one output element at a time."""
    out_channels, per_group, kh, kw = weight.shape
    padded = np.pad(image, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out_h = (padded.shape[1] - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    out_w = (padded.shape[2] - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    result = np.zeros((out_channels, out_h, out_w))
    for o in range(out_channels):
        first = (o // (out_channels // group)) * per_group
        for i in range(out_h):
            for j in range(out_w):
                top, left = i * strides[0], j * strides[1]
                patch = padded[
                    first:first + per_group,
                    top:top + dilations[0] * (kh - 1) + 1:dilations[0],
                    left:left + dilations[1] * (kw - 1) + 1:dilations[1],
                ]
                result[o, i, j] = np.sum(patch * weight[o])
    return result


@settings(deadline=None, max_examples=40)
@given(
    st.integers(1, 6), st.integers(1, 6), st.integers(1, 4), st.sampled_from([0, 1]),
    st.floats(0.1, 3.0), st.floats(0.1, 3.0), st.booleans(), st.integers(0, 2**32 - 1),
)
def test_forward_linear_fold_matches_gemm_on_normalized_input(
    k: int, n: int, rows: int, input_axis: int, alpha: float, beta: float, with_bias: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    s, t = _vectors(rng, k)
    weight = rng.normal(size=(k, n) if input_axis == 0 else (n, k))
    bias = rng.normal(size=n) if with_bias else None
    x = rng.normal(size=(rows, k))
    as_kn = weight if input_axis == 0 else weight.T

    expected = alpha * (s * x + t) @ as_kn + (beta * bias if with_bias else 0.0)
    folded_weight = weight * fold_math.axis_factor(s, 2, input_axis)
    offset = fold_math.linear_offset(weight, t, input_axis)
    new_bias = fold_math.gemm_bias_with_offset(bias, offset, alpha, beta)
    folded_kn = folded_weight if input_axis == 0 else folded_weight.T
    np.testing.assert_allclose(alpha * x @ folded_kn + beta * new_bias, expected, **TIGHT)
    np.testing.assert_allclose(x @ folded_kn + offset, (s * x + t) @ as_kn, **TIGHT)


@settings(deadline=None, max_examples=30)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_conv_input_channel_factors_follow_the_group_layout(
    groups: int, per_group: int, outputs_per_group: int, seed: int
) -> None:
    values = np.random.default_rng(seed).normal(size=groups * per_group)
    out_channels = groups * outputs_per_group
    factors = fold_math.conv_input_channel_factors(values, out_channels, groups)
    assert factors.shape == (out_channels, per_group)
    for o in range(out_channels):
        group = o // outputs_per_group
        np.testing.assert_array_equal(factors[o], values[group * per_group:(group + 1) * per_group])


conv_cases = st.tuples(
    st.integers(1, 3),  # groups
    st.integers(1, 3),  # input channels per group
    st.integers(1, 3),  # output channels per group
    st.tuples(st.integers(1, 3), st.integers(1, 3)),  # kernel
    st.tuples(st.integers(1, 2), st.integers(1, 2)),  # strides
    st.tuples(st.integers(1, 2), st.integers(1, 2)),  # dilations
    st.integers(0, 2**32 - 1),
)


def _conv_case(case: tuple) -> tuple:
    groups, per_group, outputs_per_group, kernel, strides, dilations, seed = case
    rng = np.random.default_rng(seed)
    channels = groups * per_group
    s, t = _vectors(rng, channels)
    weight = rng.normal(size=(groups * outputs_per_group, per_group, *kernel))
    image = rng.normal(size=(channels, 7, 6))
    return groups, strides, dilations, s, t, weight, image


@settings(deadline=None, max_examples=30)
@given(conv_cases)
def test_unpadded_conv_fold_matches_conv_of_normalized_input(case: tuple) -> None:
    groups, strides, dilations, s, t, weight, image = _conv_case(case)
    pads = (0, 0, 0, 0)
    expected = _direct_conv2d(s[:, None, None] * image + t[:, None, None], weight, groups, pads, strides, dilations)
    folded_weight = weight * fold_math.conv_input_factor(s, weight.shape, groups)
    offset = fold_math.conv_offset(weight, t, groups)
    actual = _direct_conv2d(image, folded_weight, groups, pads, strides, dilations) + offset[:, None, None]
    np.testing.assert_allclose(actual, expected, **TIGHT)


@settings(deadline=None, max_examples=30)
@given(conv_cases, st.tuples(*[st.integers(0, 2)] * 4))
def test_padded_shift_makes_the_padded_conv_fold_exact(case: tuple, pads: tuple[int, int, int, int]) -> None:
    groups, strides, dilations, s, t, weight, image = _conv_case(case)
    expected = _direct_conv2d(s[:, None, None] * image + t[:, None, None], weight, groups, pads, strides, dilations)
    folded_weight = weight * fold_math.conv_input_factor(s, weight.shape, groups)
    offset = fold_math.conv_offset(weight, t, groups)
    correction = fold_math.conv_of_padded_shift(weight, t, groups, image.shape[1:], pads, strides, dilations)
    actual = _direct_conv2d(image, folded_weight, groups, pads, strides, dilations) + correction
    np.testing.assert_allclose(actual, expected, **TIGHT)
    if not any(pads):
        # Without padding every output position sees the whole kernel: the correction is the plain offset.
        np.testing.assert_allclose(correction, np.broadcast_to(offset[:, None, None], correction.shape), **TIGHT)


def test_padded_shift_differs_from_the_plain_offset_at_the_border() -> None:
    """The reason padded Convs are refused by default: the border sees less of ``t``."""
    weight = np.ones((1, 1, 3, 3))
    t = np.array([1.0])
    correction = fold_math.conv_of_padded_shift(weight, t, 1, (4, 4), (1, 1, 1, 1), (1, 1), (1, 1))
    offset = fold_math.conv_offset(weight, t, 1)
    assert offset[0] == 9.0
    assert correction[0, 0, 0] == 4.0 and correction[0, 0, 1] == 6.0 and correction[0, 1, 1] == 9.0
