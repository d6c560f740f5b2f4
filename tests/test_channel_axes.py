"""Per-channel vectors land on the axis each fold names, for parameters of any rank.

A [C] scale laid along the wrong axis of a [C, H, W] tensor broadcasts without complaint when
W == C and gives a wrong model: opset 7/8 BatchNormalization with ``spatial=0`` keeps its
parameters as ``[C, D1, ...]``, and merging a second affine into such a BN once scaled the
last axis. The fold_math helpers are checked against an index-by-index reference (no ONNX),
and the merge is checked end to end through onnxruntime on shapes whose last axis has C
entries, where only the right axis gives the right numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bnfold import fold_math
from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare, op_count


def _along(values: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Reference: an array of ``shape`` whose entry at index i is ``values[i[axis]]``."""
    result = np.empty(shape)
    for index in np.ndindex(*shape):
        result[index] = values[index[axis]]
    return result


@st.composite
def tensor_and_axis(draw: st.DrawFn) -> tuple[np.ndarray, int, np.ndarray, np.ndarray]:
    """A tensor of rank 1-4 (axes often of equal length), an axis, and s, t of its length."""
    rank = draw(st.integers(1, 4))
    side = draw(st.integers(1, 4))
    shape = tuple(draw(st.sampled_from([side, side, side + 1])) for _ in range(rank))
    axis = draw(st.integers(-rank, rank - 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    channels = shape[axis]
    return rng.standard_normal(shape), axis, rng.uniform(0.2, 3.0, channels), rng.standard_normal(channels)


@given(tensor_and_axis())
def test_axis_factor_scales_exactly_the_named_axis(case: tuple[np.ndarray, int, np.ndarray, np.ndarray]) -> None:
    tensor, axis, s, _ = case
    factor = fold_math.axis_factor(s, tensor.ndim, axis)
    assert factor.dtype == np.float64 and factor.ndim == tensor.ndim
    np.testing.assert_array_equal(tensor * factor, tensor * _along(s, tensor.shape, axis))


@given(tensor_and_axis())
def test_fold_bias_applies_s_and_t_along_the_named_axis(case: tuple[np.ndarray, int, np.ndarray, np.ndarray]) -> None:
    bias, axis, s, t = case
    expected = bias * _along(s, bias.shape, axis) + _along(t, bias.shape, axis)
    np.testing.assert_allclose(fold_math.fold_bias(bias, s, t, axis=axis), expected, rtol=1e-15, atol=0)


@given(tensor_and_axis())
def test_fold_bias_without_bias_or_with_a_scalar_one(case: tuple[np.ndarray, int, np.ndarray, np.ndarray]) -> None:
    _, axis, s, t = case
    np.testing.assert_array_equal(fold_math.fold_bias(None, s, t, axis=axis), t)
    np.testing.assert_allclose(fold_math.fold_bias(np.float32(0.5), s, t, axis=axis), 0.5 * s + t, rtol=1e-15)


@given(
    channels=st.integers(1, 5),
    spatial=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    same_side=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_merging_an_affine_into_per_element_batchnorm_parameters(
    channels: int, spatial: list[int], same_side: bool, seed: int
) -> None:
    """BN with parameters [C, D...] followed by s·y + t (per channel) equals one BN with
    gamma' = gamma·s and beta' = beta·s + t along axis 0, evaluated element by element."""
    rng = np.random.default_rng(seed)
    shape = (channels, *([channels] * len(spatial) if same_side else spatial))
    gamma, beta, mean = (rng.standard_normal(shape) for _ in range(3))
    var = rng.uniform(0.1, 2.0, shape)
    s, t = rng.uniform(0.2, 3.0, channels), rng.standard_normal(channels)
    x = rng.standard_normal((2, *shape))
    normalized = (x - mean) / np.sqrt(var + 1e-5)
    expected = _along(s, shape, 0) * (gamma * normalized + beta) + _along(t, shape, 0)
    new_gamma = gamma * fold_math.axis_factor(s, gamma.ndim, axis=0)
    new_beta = fold_math.fold_bias(beta, s, t, axis=0)
    np.testing.assert_allclose(new_gamma * normalized + new_beta, expected, rtol=1e-12, atol=1e-12)


@given(
    channels=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    varies=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_per_channel_affine_of_per_element_statistics(channels: int, spatial: list[int], varies: bool,
                                                      seed: int) -> None:
    """[C, D...] s and t reduce to [C] exactly when they are constant within each channel."""
    rng = np.random.default_rng(seed)
    shape = (channels, *spatial)
    s_vec, t_vec = rng.uniform(0.2, 3.0, channels), rng.standard_normal(channels)
    s, t = _along(s_vec, shape, 0), _along(t_vec, shape, 0)
    if varies and np.prod(spatial) > 1:
        s[(0,) * len(shape)] += 0.5
        assert fold_math.per_channel_affine(s, t) is None
        return
    reduced = fold_math.per_channel_affine(s, t)
    assert reduced is not None
    np.testing.assert_array_equal(reduced[0], s_vec)
    np.testing.assert_array_equal(reduced[1], t_vec)


# -- through onnxruntime ------------------------------------------------------------------------------------------

def _per_element_batchnorm(b: GraphBuilder, x: str, shape: tuple[int, ...], **attributes: object) -> str:
    """BN with spatial=0 whose [C, D...] parameters are constant within each channel but
    differ between channels, as an exporter writes a per-channel BN at opset 7/8."""
    channels = shape[0]
    per_channel = [b.rng.uniform(0.5, 1.5, channels), b.rng.normal(0, 1, channels),
                   b.rng.normal(0, 1, channels), b.rng.uniform(0.5, 2.0, channels)]
    names = [b.const(base, np.ascontiguousarray(np.broadcast_to(v.reshape(-1, *[1] * (len(shape) - 1)), shape))
                     .astype(np.float32)) for base, v in zip(("gamma", "beta", "mean", "var"), per_channel)]
    return b.node("BatchNormalization", [x, *names], epsilon=1e-5, spatial=0, **attributes)


@pytest.mark.parametrize("opset", [7, 8])
@pytest.mark.parametrize("spatial_shape", [(3,), (4, 3), (3, 3), (2, 3, 3)])
@pytest.mark.parametrize("second", ["bn spatial=1", "bn spatial=0", "mul add"])
def test_an_affine_after_a_spatial0_batchnorm_merges_on_the_channel_axis(
    opset: int, spatial_shape: tuple[int, ...], second: str
) -> None:
    """The data's last axis has C = 3 entries too, so a scale on the wrong axis broadcasts
    silently; onnxruntime judges the merged BN."""
    channels = 3
    b = GraphBuilder(seed=opset * 10 + len(spatial_shape))
    shape = (channels, *spatial_shape)
    x = b.input("x", [2, *shape])
    first = _per_element_batchnorm(b, x, shape)
    if second == "bn spatial=1":
        y = b.batchnorm(first, channels)
    elif second == "bn spatial=0":
        y = _per_element_batchnorm(b, first, shape)
    else:
        along = [channels, *[1] * len(spatial_shape)]
        scale = b.const("scale", b.rng.uniform(0.5, 2.0, along).astype(np.float32))
        shift = b.const("shift", b.rng.normal(0, 1, along).astype(np.float32))
        y = b.node("Add", [b.node("Mul", [first, scale]), shift])
    b.output(y)
    model = b.model(opset=opset, ir_version=3 if opset == 7 else 4)
    check = fold_and_compare(model)
    merges = [fold for fold in check.outcome.folds if fold.rule == "bn-merge"]
    assert len(merges) == 1 and "BatchNormalization" in merges[0].target
    assert op_count(check.folded, "BatchNormalization") == 1
    assert op_count(check.folded, "Mul") == op_count(check.folded, "Add") == 0
