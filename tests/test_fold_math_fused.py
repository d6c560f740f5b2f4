"""Properties of the fused scale-and-cast pass, against the unfused path it replaces
(``cast_with_effect`` of the whole float64 product)."""

from __future__ import annotations

from unittest import mock

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold import fold_math


@st.composite
def weights_and_factors(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """A weight of rank 1-4 (some elements zero) and a per-channel factor along one axis."""
    shape = draw(st.lists(st.integers(1, 7), min_size=1, max_size=4))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    weight = (rng.standard_normal(shape) * draw(st.sampled_from([1.0, 1e-3, 1e3]))).astype(dtype)
    weight[rng.random(shape) < draw(st.sampled_from([0.0, 0.5, 1.0]))] = 0
    axis = draw(st.integers(0, len(shape) - 1))
    s = rng.uniform(-3, 3, shape[axis])
    return weight, fold_math.axis_factor(s, weight.ndim, axis)


@settings(deadline=None, max_examples=150)
@given(case=weights_and_factors(), block=st.sampled_from([1, 3, 8, 1 << 16]))
def test_fused_scale_matches_the_unfused_path(case: tuple[np.ndarray, np.ndarray], block: int) -> None:
    """Same cast tensor and rounding error, bit for bit, whatever the block size; the
    relative change is |factor - 1| over non-zero weights, what the division measures
    up to its own rounding."""
    weight, factor = case
    with mock.patch.object(fold_math, "_BLOCK", block):
        cast, change, rounding = fold_math.scale_with_effect(weight, factor, "weight")
    expected, expected_change, expected_rounding = fold_math.cast_with_effect(
        np.multiply(weight, factor, dtype=np.float64), weight.dtype, weight, "weight"
    )
    assert cast.dtype == weight.dtype
    np.testing.assert_array_equal(cast, expected)
    assert rounding == expected_rounding
    assert change == pytest.approx(expected_change, rel=0, abs=4 * np.finfo(np.float64).eps * np.max(np.abs(factor)))


@settings(deadline=None, max_examples=40)
@given(
    group=st.integers(1, 3),
    per_group_in=st.integers(1, 3),
    per_group_out=st.integers(1, 3),
    kernel=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_fused_scale_takes_a_convtranspose_factor(
    group: int, per_group_in: int, per_group_out: int, kernel: list[int], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((group * per_group_in, per_group_out, *kernel)).astype(np.float32)
    factor = fold_math.convtranspose_factor(rng.uniform(0.5, 2, group * per_group_out), weight.shape, group)
    with mock.patch.object(fold_math, "_BLOCK", 2):
        cast, _, rounding = fold_math.scale_with_effect(weight, factor, "weight")
    exact = np.multiply(weight, factor, dtype=np.float64)
    np.testing.assert_array_equal(cast, exact.astype(np.float32))
    assert rounding == float(np.max(np.abs(exact - cast)))


def test_fused_scale_ignores_factors_of_all_zero_channels() -> None:
    weight = np.array([[0.0, 0.0], [1.0, 0.0], [np.inf, np.nan]], np.float32)
    _, change, _ = fold_math.scale_with_effect(weight, fold_math.axis_factor(np.array([9.0, 1.5, 7.0]), 2, 0), "w")
    assert change == 0.5


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.float8_e4m3fn], ids=["float16", "float8_e4m3fn"])
def test_fused_scale_refuses_overflow_with_the_largest_value(dtype: type) -> None:
    """float8_e4m3fn has no inf: there an overflow becomes NaN, and is refused all the same."""
    weight = np.array([[1.0, 2.0], [1.0, 0.5], [np.nan, 1.0]], dtype)
    factor = fold_math.axis_factor(np.array([4e4, 1.0, 1.0]), 2, 0)
    with pytest.raises(fold_math.FoldOverflowError, match=r"overflow \w+ \(largest magnitude 8e\+04\)"):
        fold_math.scale_with_effect(weight, factor, "weight")


def test_fused_scale_keeps_already_infinite_values() -> None:
    """An Inf or NaN that was there before folding is not an overflow caused by the fold."""
    weight = np.array([np.inf, np.nan, 1.0], np.float32)
    cast, change, rounding = fold_math.scale_with_effect(weight, np.array([2.0]), "weight")
    np.testing.assert_array_equal(cast, np.array([np.inf, np.nan, 2.0], np.float32))
    assert (change, rounding) == (1.0, 0.0)


def test_fused_scale_of_an_empty_weight_measures_nothing() -> None:
    cast, change, rounding = fold_math.scale_with_effect(np.zeros((0, 3), np.float32), np.ones((1, 3)), "weight")
    assert cast.shape == (0, 3) and (change, rounding) == (0.0, 0.0)
