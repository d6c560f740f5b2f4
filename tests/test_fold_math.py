"""Property tests of the fold arithmetic against a direct float64 evaluation of the layers."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold import fold_math

FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def batchnorm_reference(y: np.ndarray, gamma, beta, mean, var, eps: float, axis: int) -> np.ndarray:
    """BatchNormalization as the ONNX spec writes it, in float64."""
    shape = [1] * y.ndim
    shape[axis] = -1
    r = lambda v: np.asarray(v, np.float64).reshape(shape)  # noqa: E731
    return r(gamma) * (y - r(mean)) / np.sqrt(r(var) + eps) + r(beta)


@st.composite
def batchnorm_statistics(draw: st.DrawFn, channels: int) -> tuple[np.ndarray, ...]:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(-2, 2, channels)
    beta = rng.normal(0, 1, channels)
    mean = rng.normal(0, 3, channels)
    var = rng.uniform(0, 4, channels) * draw(st.sampled_from([1.0, 1e-6, 1e3]))
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1, 1e-9]))
    return gamma, beta, mean, var, eps


def grouped_conv_at_patches(weight: np.ndarray, bias: np.ndarray | None, patches: np.ndarray) -> np.ndarray:
    """Conv outputs at a few receptive fields: output m reads the patch of its group.

    ``weight`` is ``[M, C/g, k...]`` and ``patches`` is ``[P, g, C/g, k...]``.
    """
    groups = patches.shape[1]
    per_group = weight.shape[0] // groups
    reduce_axes = tuple(range(1, patches.ndim - 1))
    columns = [np.sum(weight[m] * patches[:, m // per_group], axis=reduce_axes) for m in range(weight.shape[0])]
    return np.stack(columns, axis=1) + (0.0 if bias is None else bias)


@settings(max_examples=60)
@given(
    channels_per_group=st.integers(1, 6),
    inputs_per_group=st.integers(1, 4),
    groups=st.integers(1, 3),
    kernel=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    with_bias=st.booleans(),
    data=st.data(),
)
def test_conv_fold_equals_conv_then_batchnorm(channels_per_group, inputs_per_group, groups, kernel, with_bias, data) -> None:
    """BN(Conv) equals the Conv with ``W * s`` along axis 0 and ``b * s + t``, for any group count."""
    out_channels = channels_per_group * groups
    gamma, beta, mean, var, eps = data.draw(batchnorm_statistics(out_channels))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    weight = rng.normal(size=(out_channels, inputs_per_group, *kernel))
    bias = rng.normal(size=out_channels) if with_bias else None
    patches = rng.normal(size=(5, groups, inputs_per_group, *kernel))
    expected = batchnorm_reference(grouped_conv_at_patches(weight, bias, patches), gamma, beta, mean, var, eps, axis=1)

    s, t = fold_math.batchnorm_affine(gamma, beta, mean, var, eps)
    got = grouped_conv_at_patches(
        weight * fold_math.axis_factor(s, weight.ndim, axis=0), fold_math.fold_bias(bias, s, t, axis=-1), patches
    )
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9 * (1 + np.abs(expected).max()))


@settings(max_examples=60)
@given(
    m=st.integers(1, 5),
    k=st.integers(1, 6),
    n=st.integers(1, 6),
    trans_b=st.booleans(),
    alpha=st.sampled_from([1.0, 0.5, -2.0]),
    beta=st.sampled_from([1.0, 0.25, 3.0]),
    bias_shape=st.sampled_from(["none", "scalar", "n", "1n", "mn"]),
    data=st.data(),
)
def test_gemm_fold_equals_gemm_then_batchnorm(m, k, n, trans_b, alpha, beta, bias_shape, data) -> None:
    """``BN(alpha*A@B + beta*C)`` equals ``alpha*A@(B*s) + beta*(C*s + t/beta)`` for every C shape."""
    gamma, bn_beta, mean, var, eps = data.draw(batchnorm_statistics(n))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    a = rng.normal(size=(m, k))
    b = rng.normal(size=(n, k) if trans_b else (k, n))
    c = {"none": None, "scalar": rng.normal(size=()), "n": rng.normal(size=n),
         "1n": rng.normal(size=(1, n)), "mn": rng.normal(size=(m, n))}[bias_shape]
    matrix = b.T if trans_b else b
    y = alpha * a @ matrix + (0 if c is None else beta * c)
    expected = batchnorm_reference(y, gamma, bn_beta, mean, var, eps, axis=1)

    s, t = fold_math.batchnorm_affine(gamma, bn_beta, mean, var, eps)
    folded_b = b * fold_math.axis_factor(s, 2, axis=0 if trans_b else 1)
    effective_beta = beta if c is not None else 1.0
    folded_c = fold_math.fold_bias(c, s, t / effective_beta, axis=-1)
    got = alpha * a @ (folded_b.T if trans_b else folded_b) + effective_beta * folded_c
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9 * (1 + np.abs(expected).max()))


@given(channels=st.integers(1, 16), data=st.data())
def test_batchnorm_affine_matches_spec_formula(channels, data) -> None:
    gamma, beta, mean, var, eps = data.draw(batchnorm_statistics(channels))
    x = np.random.default_rng(channels).normal(size=(3, channels, 2))
    s, t = fold_math.batchnorm_affine(gamma, beta, mean, var, eps)
    expected = batchnorm_reference(x, gamma, beta, mean, var, eps, axis=1)
    np.testing.assert_allclose(x * s[None, :, None] + t[None, :, None], expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_batchnorm_affine_is_float64_whatever_the_input_dtype(dtype) -> None:
    """Low-precision parameters are widened before the division, not after."""
    gamma = np.array([1.0, 3.0], dtype)
    s, t = fold_math.batchnorm_affine(gamma, gamma, gamma, np.array([2.0, 1e-4], dtype), 1e-5)
    assert s.dtype == np.float64 and t.dtype == np.float64
    var64 = np.array([2.0, 1e-4], dtype).astype(np.float64)
    np.testing.assert_array_equal(s, gamma.astype(np.float64) / np.sqrt(var64 + 1e-5))


def test_cast_back_refuses_overflow_with_the_largest_value() -> None:
    with pytest.raises(fold_math.FoldOverflowError, match=r"folded weight would overflow float16 \(largest magnitude 1e\+06\)"):
        fold_math.cast_back(np.array([1.0, -1e6]), np.dtype(np.float16), "weight")


def test_cast_back_keeps_already_infinite_values() -> None:
    """An Inf that was there before folding is not an overflow caused by the fold."""
    values = np.array([np.inf, 1.0])
    np.testing.assert_array_equal(fold_math.cast_back(values, np.dtype(np.float32), "weight"), values.astype(np.float32))
