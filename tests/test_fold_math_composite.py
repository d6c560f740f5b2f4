"""The algebra of splitting an affine over a Concat or an Add, and of merging sibling Convs
(bnfold.fold_math), checked against the direct computation: numpy concatenations and sums,
and a convolution written out tap by tap."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st

from bnfold import fold_math
from bnfold.fold_math import ConvGeometry


def direct_conv(x: np.ndarray, weight: np.ndarray, group: int, geometry: ConvGeometry) -> np.ndarray:
    """ONNX Conv without bias, float64, summed tap by tap: output position o of an axis reads
    input ``o * stride + tap * dilation - pad_begin`` (zero outside the input)."""
    batch, channels, *size = x.shape
    out_channels, per_group, *kernel = weight.shape
    padded = np.pad(x, [(0, 0), (0, 0), *zip(geometry.pads_begin, geometry.pads_end)])
    out_size = [(n + change - 1) // stride + 1 for n, change, stride in zip(size, geometry.size_changes, geometry.strides)]
    result = np.zeros((batch, out_channels, *out_size))
    outputs_per_group = out_channels // group
    for tap in np.ndindex(*kernel):
        window = padded[(slice(None), slice(None), *(
            slice(k * dilation, k * dilation + stride * (count - 1) + 1, stride)
            for k, dilation, stride, count in zip(tap, geometry.dilations, geometry.strides, out_size)))]
        for g in range(group):
            rows = slice(g * outputs_per_group, (g + 1) * outputs_per_group)
            inputs = window[:, g * per_group:(g + 1) * per_group]
            result[:, rows] += np.einsum("mc,nc...->nm...", weight[(rows, slice(None), *tap)], inputs)
    return result


@st.composite
def outer_geometry(draw: st.DrawFn, rank: int, stride: int) -> ConvGeometry:
    kernel = tuple(draw(st.integers(1, 4)) for _ in range(rank))
    dilations = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    begins = tuple(draw(st.integers(0, d * (k - 1) + 1)) for k, d in zip(kernel, dilations))
    ends = tuple(draw(st.integers(0, d * (k - 1) + 1)) for k, d in zip(kernel, dilations))
    return ConvGeometry(kernel, (stride,) * rank, dilations, begins, ends)


@st.composite
def fitting_geometry(draw: st.DrawFn, outer: ConvGeometry) -> ConvGeometry:
    """A kernel whose taps are some of ``outer``'s: every ``step``-th tap from ``first`` on."""
    kernel, dilations, begins, ends = [], [], [], []
    for k, d, begin, change in zip(outer.kernel, outer.dilations, outer.pads_begin, outer.size_changes):
        first = draw(st.integers(0, k - 1))
        step = draw(st.integers(1, 2))
        count = draw(st.integers(1, (k - 1 - first) // step + 1))
        pad_begin = begin - first * d
        pad_end = change - pad_begin + step * d * (count - 1)
        assume(pad_begin >= 0 and pad_end >= 0)
        kernel.append(count)
        dilations.append(step * d)
        begins.append(pad_begin)
        ends.append(pad_end)
    return ConvGeometry(tuple(kernel), outer.strides, tuple(dilations), tuple(begins), tuple(ends))


def offsets(geometry: ConvGeometry, axis: int) -> set[int]:
    return {i * geometry.dilations[axis] - geometry.pads_begin[axis] for i in range(geometry.kernel[axis])}


def random_input(seed: int, channels: int, rank: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, channels, *(rng.integers(3, 8) for _ in range(rank))))


@given(st.data(), st.integers(1, 2), st.integers(1, 2), st.integers(0, 2**16))
def test_a_kernel_that_fits_added_into_the_larger_one_computes_both_convs(data, rank, stride, seed) -> None:
    outer = data.draw(outer_geometry(rank, stride))
    inner = data.draw(fitting_geometry(outer))
    outer_group = data.draw(st.sampled_from([1, 2]))
    inner_group = outer_group * data.draw(st.sampled_from([1, 2, 3]))
    channels, out_channels = inner_group * data.draw(st.integers(1, 2)), inner_group * data.draw(st.integers(1, 2))
    x = random_input(seed, channels, rank)
    assume(all(n + change >= 1 for n, change in zip(x.shape[2:], outer.size_changes)))
    rng = np.random.default_rng(seed + 1)
    outer_weight = rng.standard_normal((out_channels, channels // outer_group, *outer.kernel))
    inner_weight = rng.standard_normal((out_channels, channels // inner_group, *inner.kernel))

    taps = fold_math.tap_positions(inner, outer)
    assert taps is not None
    merged = fold_math.kernel_with_branch(outer_weight, outer_group, inner_weight, inner_group, taps)

    expected = direct_conv(x, outer_weight, outer_group, outer) + direct_conv(x, inner_weight, inner_group, inner)
    np.testing.assert_allclose(direct_conv(x, merged, outer_group, outer), expected, atol=1e-9)
    assert merged.shape == outer_weight.shape


@given(st.data(), st.integers(1, 2), st.integers(1, 3))
def test_tap_positions_exist_exactly_when_every_tap_reads_a_position_of_the_other_kernel(data, rank, stride) -> None:
    outer = data.draw(outer_geometry(rank, stride))
    inner = data.draw(outer_geometry(rank, data.draw(st.sampled_from([stride, stride + 1]))))
    fits = (inner.strides == outer.strides and inner.size_changes == outer.size_changes
            and all(offsets(inner, axis) <= offsets(outer, axis) for axis in range(rank)))

    taps = fold_math.tap_positions(inner, outer)

    assert (taps is not None) == fits
    if taps is not None:
        for axis in range(rank):
            read = [j * outer.dilations[axis] - outer.pads_begin[axis] for j in taps[axis]]
            assert read == [i * inner.dilations[axis] - inner.pads_begin[axis] for i in range(inner.kernel[axis])]


@given(st.data(), st.integers(1, 2), st.integers(0, 2**16))
def test_the_identity_kernel_at_the_tap_reading_x_adds_s_times_x(data, rank, seed) -> None:
    kernel = tuple(data.draw(st.integers(1, 4)) for _ in range(rank))
    dilations = tuple(data.draw(st.integers(1, 2)) for _ in range(rank))
    begins = tuple(data.draw(st.integers(0, k - 1)) * d for k, d in zip(kernel, dilations))
    sibling = ConvGeometry(kernel, (1,) * rank, dilations, begins,
                           tuple(d * (k - 1) - b for k, d, b in zip(kernel, dilations, begins)))
    group = data.draw(st.sampled_from([1, 2, 4]))
    channels = group * data.draw(st.integers(1, 2))
    x = random_input(seed, channels, rank)
    rng = np.random.default_rng(seed + 1)
    weight = rng.standard_normal((channels, channels // group, *kernel))
    s = rng.uniform(-2.0, 2.0, channels)

    taps = fold_math.tap_positions(ConvGeometry.identity(rank), sibling)
    assert taps is not None
    merged = fold_math.kernel_with_branch(weight, group, fold_math.identity_kernel(s, rank), channels, taps)

    expected = direct_conv(x, weight, group, sibling) + s.reshape(1, -1, *(1,) * rank) * x
    np.testing.assert_allclose(direct_conv(x, merged, group, sibling), expected, atol=1e-9)


@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**16))
def test_regrouped_kernel_is_the_same_conv(coarse, refine, seed) -> None:
    group = coarse * refine
    rng = np.random.default_rng(seed)
    channels, out_channels = group * int(rng.integers(1, 3)), group * int(rng.integers(1, 3))
    weight = rng.standard_normal((out_channels, channels // group, 3, 2))
    geometry = ConvGeometry((3, 2), (1, 1), (1, 1), (1, 0), (1, 1))
    x = random_input(seed, channels, 2)

    regrouped = fold_math.regroup_kernel(weight, group, coarse)

    assert regrouped.shape == (out_channels, channels // coarse, 3, 2)
    np.testing.assert_allclose(direct_conv(x, regrouped, coarse, geometry), direct_conv(x, weight, group, geometry))


@given(st.lists(st.integers(0, 4), min_size=1, max_size=4), st.integers(0, 2**16))
def test_affine_over_a_channel_concat_is_the_concat_of_its_slices(sizes, seed) -> None:
    rng = np.random.default_rng(seed)
    segments = [rng.standard_normal((2, size, 3)) for size in sizes]
    s, t = rng.standard_normal(sum(sizes)), rng.standard_normal(sum(sizes))

    pieces = fold_math.affine_slices(s, t, sizes)

    whole = s[:, None] * np.concatenate(segments, axis=1) + t[:, None]
    parts = [s_i[:, None] * segment + t_i[:, None] for (s_i, t_i), segment in zip(pieces, segments)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole)


@given(st.sampled_from([(), (1, 1, 1), (4, 1, 1), (1, 4, 1, 1), (4, 3, 2)]), st.integers(0, 2**16))
def test_a_constant_operand_absorbs_the_affine_in_place(shape, seed) -> None:
    rng = np.random.default_rng(seed)
    y, c = rng.standard_normal((2, 4, 3, 2)), rng.standard_normal(shape)
    s, t = rng.standard_normal(4), rng.standard_normal(4)

    absorbed = fold_math.constant_with_affine(c, s, t, axes_after=2)

    expected = s[:, None, None] * (y + c) + t[:, None, None]
    np.testing.assert_allclose(s[:, None, None] * y + absorbed, expected)
