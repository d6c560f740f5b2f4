"""Property tests of the algebra the movers rely on (``bnfold.fold_math``), on plain arrays.

Each op a BN moves through is written here in numpy (a row-major reshape, a 1-D max or
average pool over the windows ``pool_windows`` gives, a constant pad) and the mover's
claim is checked on random data: ``op(s·x + t) = s'·op(x) + t'`` exactly when the function
says the affine crosses, and not otherwise.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bnfold import fold_math

SETTINGS = settings(max_examples=200, deadline=None)


def along(values: np.ndarray, axis: int, rank: int) -> np.ndarray:
    shape = [1] * rank
    shape[axis] = -1
    return values.reshape(shape)


@st.composite
def reshapes(draw: st.DrawFn) -> tuple[list[int], int, list[int]]:
    """A shape, the affine's axis in it, and another shape of as many elements."""
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    axis = draw(st.integers(0, len(shape) - 1))
    size = math.prod(shape)
    target, rest = [], size
    for _ in range(draw(st.integers(0, 3))):
        factor = draw(st.sampled_from([d for d in range(1, rest + 1) if rest % d == 0]))
        target.append(factor)
        rest //= factor
    return shape, axis, [*target, rest]


@SETTINGS
@given(reshapes(), st.integers(0, 2**31))
def test_a_reshaped_affine_is_exactly_the_affine_on_the_reshaped_tensor(case, seed: int) -> None:  # noqa: ANN001
    shape, axis, target = case
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    s, t = rng.permutation(channels) + 1.5, rng.normal(size=channels)  # distinct scales
    x = rng.normal(size=shape)
    expected = (x * along(s, axis, len(shape)) + along(t, axis, len(shape))).reshape(target)
    scale_field = np.broadcast_to(along(s, axis, len(shape)), shape).reshape(target)
    trailing = math.prod(shape[axis + 1:])
    for b in range(len(target)):
        moved = fold_math.reshaped_affine(s, t, trailing, target[b], math.prod(target[b + 1:]))
        # Whether the scale every element gets, seen on the reshaped tensor, depends on axis b alone.
        on_b = scale_field[tuple(slice(None) if a == b else 0 for a in range(len(target)))]
        per_axis_b = np.array_equal(scale_field, np.broadcast_to(along(on_b, b, len(target)), target))
        if moved is None:
            assert channels == 1 or not per_axis_b  # one channel: any axis holds it, whatever the blocks
            continue
        moved_s, moved_t = moved
        assert moved_s.shape == (target[b],)
        got = x.reshape(target) * along(moved_s, b, len(target)) + along(moved_t, b, len(target))
        np.testing.assert_array_equal(got, expected)


def test_flattening_repeats_each_channel_once_per_position() -> None:
    s, t = np.array([2.0, 3.0]), np.array([0.5, -1.0])
    # [N, 2, 3] → [N, 6]: channel c owns columns 3c … 3c+2
    moved_s, moved_t = fold_math.reshaped_affine(s, t, trailing=3, length_to=6, trailing_to=1)
    np.testing.assert_array_equal(moved_s, [2, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(moved_t, [0.5, 0.5, 0.5, -1, -1, -1])
    # and back: [N, 6] → [N, 2, 3] needs the repeated scale, not any other
    assert fold_math.reshaped_affine(moved_s, moved_t, trailing=1, length_to=2, trailing_to=3) is None


# -- pools ----------------------------------------------------------------------------------------


@st.composite
def windows(draw: st.DrawFn) -> tuple[int, list[list[int]], int]:
    size = draw(st.integers(1, 8))
    kernel = draw(st.integers(1, 4))
    dilation = draw(st.integers(1, 2))
    pad_begin, pad_end = draw(st.integers(0, kernel - 1)), draw(st.integers(0, kernel - 1))
    found = fold_math.pool_windows(size, kernel, draw(st.integers(1, 3)), pad_begin, pad_end, dilation,
                                   draw(st.booleans()))
    assume(found)
    return size, found, pad_end


def max_pool(x: np.ndarray, windows_: list[list[int]]) -> np.ndarray:
    """Per channel (rows of x), the max over each window's real values."""
    return np.stack([x[:, [p for p in window if 0 <= p < x.shape[1]]].max(axis=1) for window in windows_], axis=1)


def counted_average(x: np.ndarray, windows_: list[list[int]], pad_end: int) -> np.ndarray:
    """Average pool with ``count_include_pad=1``: padded positions are zeros in the count,
    positions past the padded input (a ``ceil_mode`` window hanging over) are not counted."""
    size = x.shape[1]
    columns = []
    for window in windows_:
        real = [p for p in window if 0 <= p < size]
        counted = sum(p < size + pad_end for p in window)
        columns.append(x[:, real].sum(axis=1) / counted)
    return np.stack(columns, axis=1)


@SETTINGS
@given(windows(), st.integers(0, 2**31))
def test_max_pool_commutes_with_the_affine_exactly_when_no_scale_is_negative(case, seed: int) -> None:  # noqa: ANN001
    size, windows_, _ = case
    assume(not fold_math.windows_without_values(windows_, size))
    rng = np.random.default_rng(seed)
    s = rng.normal(size=3) * rng.choice([0.0, 1.0], 3, p=[0.2, 0.8])
    t = rng.normal(size=3)
    x = rng.permutation(3 * size).reshape(3, size).astype(np.float64)  # distinct values
    left = max_pool(x * s[:, None] + t[:, None], windows_)
    right = s[:, None] * max_pool(x, windows_) + t[:, None]
    negative = fold_math.first_negative(s)
    if negative is None:
        np.testing.assert_allclose(left, right)
    else:
        assert s[negative] < 0 and np.all(s[:negative] >= 0)
        if any(sum(0 <= p < size for p in window) > 1 for window in windows_):  # some max picks
            assert not np.allclose(left[negative], right[negative])


@SETTINGS
@given(windows(), st.integers(0, 2**31))
def test_counted_average_keeps_the_shift_exactly_when_no_window_reads_padding(case, seed: int) -> None:  # noqa: ANN001
    size, windows_, pad_end = case
    assume(not fold_math.windows_without_values(windows_, size))
    rng = np.random.default_rng(seed)
    s, t = rng.normal(size=2), rng.uniform(0.5, 1.5, 2)  # t ≠ 0
    x = rng.normal(size=(2, size))
    left = counted_average(x * s[:, None] + t[:, None], windows_, pad_end)
    right = s[:, None] * counted_average(x, windows_, pad_end) + t[:, None]
    if fold_math.windows_read_padding(windows_, size, pad_end):
        assert not np.allclose(left, right)
        zero_shift = counted_average(x * s[:, None], windows_, pad_end)
        np.testing.assert_allclose(zero_shift, s[:, None] * counted_average(x, windows_, pad_end))  # t = 0 is fine
    else:
        np.testing.assert_allclose(left, right)


@SETTINGS
@given(windows(), st.integers(0, 2**31))
def test_an_average_of_real_values_only_always_keeps_the_shift(case, seed: int) -> None:  # noqa: ANN001
    size, windows_, _ = case
    assume(not fold_math.windows_without_values(windows_, size))
    rng = np.random.default_rng(seed)
    s, t, x = rng.normal(size=2), rng.normal(size=2), rng.normal(size=(2, size))

    def average(values: np.ndarray) -> np.ndarray:
        return np.stack([values[:, [p for p in w if 0 <= p < size]].mean(axis=1) for w in windows_], axis=1)

    np.testing.assert_allclose(average(x * s[:, None] + t[:, None]), s[:, None] * average(x) + t[:, None])


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 3), st.integers(1, 2), st.booleans())
def test_pool_windows_follow_the_onnx_output_size(size: int, kernel: int, stride: int, dilation: int,
                                                  ceil_mode: bool) -> None:
    pads = (kernel - 1) // 2, kernel // 2
    span = dilation * (kernel - 1) + 1
    assume(size + sum(pads) >= span)
    found = fold_math.pool_windows(size, kernel, stride, *pads, dilation, ceil_mode)
    rounding = math.ceil if ceil_mode else math.floor
    expected = rounding((size + sum(pads) - span) / stride) + 1
    # ceil_mode drops a last window that would start in the end padding
    last_start = (expected - 1) * stride - pads[0]
    assert len(found) == (expected - 1 if ceil_mode and last_start >= size else expected)
    assert all(window[0] < size for window in found)
    assert all(window == list(range(window[0], window[0] + span, dilation)) for window in found)


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 5), st.integers(1, 3), st.integers(1, 2),
       st.sampled_from(["SAME_UPPER", "SAME_LOWER"]))
def test_same_padding_keeps_ceil_of_size_over_stride(size: int, kernel: int, stride: int, dilation: int,
                                                     mode: str) -> None:
    begin, end = fold_math.same_padding(mode, (size,), (kernel,), [stride], [dilation])
    assert fold_math.conv_output_size(size, kernel, begin, end, stride, dilation) == math.ceil(size / stride)
    assert abs(begin - end) <= 1 and (begin <= end if mode == "SAME_UPPER" else begin >= end)


# -- constant pad -------------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 2**31), st.sampled_from([0.0, 0.0, 1.5, -2.0]), st.booleans(), st.booleans())
def test_a_constant_pad_commutes_exactly_when_the_affine_keeps_its_value(
    seed: int, value: float, zero_shift: bool, identity_channel: bool
) -> None:
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.5, 1.5, 3)
    t = np.zeros(3) if zero_shift else rng.normal(size=3)
    if identity_channel:
        s[1], t[1] = 1.0, 0.0
    x = rng.normal(size=(3, 4))
    pad = ((0, 0), (1, 2))
    left = np.pad(x * s[:, None] + t[:, None], pad, constant_values=value)
    right = s[:, None] * np.pad(x, pad, constant_values=value) + t[:, None]
    changed = fold_math.first_changed_pad_value(s, t, value)
    if changed is None:
        np.testing.assert_array_equal(left, right)
    else:
        assert not np.array_equal(left[changed], right[changed])
        assert all(s[c] * value + t[c] == value for c in range(changed))
