"""The arithmetic of folding BatchNormalization, on plain numpy arrays.

Inference-mode BatchNormalization is a per-channel affine map. With
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``::

    BN(x)[c] = s[c] * x[c] + t[c]

Backward fold (BN after a linear layer ``y = W x + b`` whose output channel c is
row c of W): ``BN(y) = (s * W) x + (s * b + t)``, so ``W' = W * s`` along the
output-channel axis and ``b' = s * b + t = (b - mean) * s + beta``.

Forward fold (BN before a linear layer whose input channel c is column c of W):
``W BN(x) + b = (W diag(s)) x + (b + W t)``, so ``W' = W * s`` along the
*input*-channel axis and ``b' = b + W t``. For a Conv, ``W t`` sums the kernel over
every input channel of the output's group; that is exact only when no output
position sees padding, since padded zeros are not shifted by ``t``
(:func:`conv_of_padded_shift` gives the exact per-position term).

Split over the inputs of a Concat, each input takes the slice of ``s`` and ``t``
over its channels (:func:`affine_slices`); over an Add, every operand takes ``s``
and one of them ``t``. Sibling Convs over one input summed together are one Conv
when one kernel fits in the other's taps (:func:`tap_positions`,
:func:`kernel_with_branch`); a BN on the identity branch is the depthwise 1×1
kernel ``s`` (:func:`identity_kernel`).

Everything here is computed in float64 from the stored values and cast back to
the model's dtype exactly once, at the end (:func:`cast_back`); doing the math in
float16/float32 is the classic source of folding error. No ONNX types appear in
this module so that the math can be property-tested without building graphs.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class FoldOverflowError(ValueError):
    """A folded tensor is finite in float64 but not representable in the model's dtype."""


def batchnorm_affine(
    scale: np.ndarray,
    bias: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(s, t)`` in float64 such that ``BN(x) = s * x + t`` per channel."""
    s = np.asarray(scale, dtype=np.float64) / np.sqrt(
        np.asarray(var, dtype=np.float64) + float(epsilon)
    )
    t = np.asarray(bias, dtype=np.float64) - np.asarray(mean, dtype=np.float64) * s
    return s, t


def per_channel_affine(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Reduce per-element ``s``, ``t`` of shape ``[C, D1, ...]`` to per-channel ``[C]``.

    Opset 7/8 BatchNormalization with ``spatial=0`` has one statistic per element.
    A layer's weights can only absorb one scale per output channel, so this works
    exactly when ``s`` and ``t`` are the same at every position of a channel;
    otherwise it returns None.
    """
    flat_s = np.asarray(s, dtype=np.float64).reshape(s.shape[0], -1)
    flat_t = np.asarray(t, dtype=np.float64).reshape(t.shape[0], -1)
    if flat_s.shape[1] == 0 or np.any(flat_s != flat_s[:, :1]) or np.any(flat_t != flat_t[:, :1]):
        return None
    return flat_s[:, 0].copy(), flat_t[:, 0].copy()


def axis_factor(s: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """``s`` (float64) shaped to broadcast along ``axis`` of an ``ndim``-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(s, dtype=np.float64).reshape(shape)


def fold_bias(bias: np.ndarray | None, s: np.ndarray, t: np.ndarray, *, axis: int) -> np.ndarray:
    """Return ``b' = b * s + t`` with ``s`` and ``t`` laid along ``axis`` of ``b``; a missing
    bias counts as zero.

    The channel axis is the last one for a layer's bias (a Gemm ``C`` of shape ``[]``, ``[N]``,
    ``[1, N]``, ``[M, 1]`` or ``[M, N]`` broadcasts against it) and axis 0 for per-element BN
    parameters ``[C, D1, ...]`` (opset 7/8 ``spatial=0``); the result has the broadcast shape.
    ``axis`` has no default: for a bias of rank > 1 the two choices give different results of
    the same shape whenever two axes have the same length, so every caller must say which.
    """
    if bias is None:
        return np.asarray(t, dtype=np.float64).copy()
    bias = np.asarray(bias, dtype=np.float64)
    if bias.ndim == 0:
        return bias * s + t
    return bias * axis_factor(s, bias.ndim, axis) + axis_factor(t, bias.ndim, axis)


def linear_offset(weight: np.ndarray, t: np.ndarray, input_axis: int) -> np.ndarray:
    """What a shift ``t`` of a 2-D layer's input adds to its output: ``t @ W`` (float64).

    With ``W' = W * s`` along ``input_axis`` (:func:`axis_factor`), ``x @ W' + t @ W ==
    (s * x + t) @ W``: the forward fold into a Gemm or MatMul. ``input_axis`` is the axis of
    ``weight`` that the input's columns multiply: 0 for ``[K, N]`` (MatMul, Gemm ``transB=0``),
    1 for ``[N, K]`` (Gemm ``transB=1``). The result has one entry per output column N.
    """
    return np.tensordot(np.asarray(t, dtype=np.float64), np.asarray(weight, dtype=np.float64), axes=([0], [input_axis]))


def gemm_bias_with_offset(
    bias: np.ndarray | None, offset: np.ndarray, alpha: float, beta: float
) -> np.ndarray:
    """Gemm's new C when ``alpha * offset`` joins its output: ``Y = alpha A B + beta C``,
    so ``C' = C + offset * alpha / beta`` keeps alpha and beta as they are (beta != 0).

    A missing C counts as zero; the result has the broadcast shape of C and ``[N]``.
    """
    base = 0.0 if bias is None else np.asarray(bias, dtype=np.float64)
    return base + np.asarray(offset, dtype=np.float64) * (float(alpha) / float(beta))


def conv_input_channel_factors(values: np.ndarray, out_channels: int, group: int) -> np.ndarray:
    """Per-input-channel ``values`` laid out like the first two axes of a Conv weight.

    A grouped Conv weight is ``[M, C/group, k...]``: output channel o belongs to group
    ``o // (M/group)``, and index j of axis 1 is input channel ``group(o) * C/group + j``.
    Entry ``[o, j]`` of the result is the value of that input channel.
    """
    values = np.asarray(values, dtype=np.float64)
    per_group = values.shape[0] // group
    group_of_output = np.arange(out_channels) // (out_channels // group)
    return values[group_of_output[:, None] * per_group + np.arange(per_group)[None, :]]


def conv_input_factor(s: np.ndarray, weight_shape: tuple[int, ...], group: int) -> np.ndarray:
    """The factor (float64, ``[M, C/group, 1...]``) that scales each input channel of a Conv
    weight ``[M, C/group, k...]`` by its ``s``: ``W'[o, j, k...] = W[o, j, k...] * s[c]`` for
    the input channel c at ``[o, j]`` (:func:`conv_input_channel_factors`)."""
    out_channels, per_group, *kernel = weight_shape
    return conv_input_channel_factors(s, out_channels, group).reshape(out_channels, per_group, *(1,) * len(kernel))


def conv_offset(weight: np.ndarray, t: np.ndarray, group: int) -> np.ndarray:
    """What a shift ``t`` of an unpadded Conv's input adds to output channel o:
    ``sum_{j,k} W[o, j, k] * t[c]`` (float64, ``[M]``).

    With ``W' = W * conv_input_factor(s)``, ``Conv(x, W') + offset == Conv(s * x + t, W)``
    wherever no padding enters the window: the forward fold into a Conv.
    """
    weight = np.asarray(weight, dtype=np.float64)
    shift = conv_input_factor(t, weight.shape, group)
    return np.sum(weight * shift, axis=tuple(range(1, weight.ndim)))


def conv_output_size(size: int, kernel: int, pad_begin: int, pad_end: int, stride: int, dilation: int) -> int:
    """Length of one spatial axis of a Conv output (ONNX/PyTorch floor rule)."""
    return (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1


def same_padding(
    auto_pad: str, spatial: tuple[int, ...], kernel: tuple[int, ...], strides: list[int], dilations: list[int]
) -> list[int]:
    """Explicit ONNX pads (begins, then ends) for ``auto_pad`` SAME_UPPER / SAME_LOWER: the
    output has ``ceil(size / stride)`` positions, the odd pad going at the end (UPPER) or the
    beginning (LOWER)."""
    begins, ends = [], []
    for size, k, stride, dilation in zip(spatial, kernel, strides, dilations):
        total = max((math.ceil(size / stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def conv_of_padded_shift(
    weight: np.ndarray,
    t: np.ndarray,
    group: int,
    spatial_shape: tuple[int, ...],
    pads: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
) -> np.ndarray:
    """What the BN's shift contributes to a *padded* Conv, per output position: ``[M, out...]``.

    The Conv sees ``pad(s * x + t) = pad(s * x) + pad(t)``, where ``pad(t)`` holds
    ``t[c]`` inside the image and zeros in the padding. This returns ``Conv(pad(t), W)``
    without bias; near the border the kernel partly covers padding, so it differs from
    the constant offset of :func:`conv_offset`. ``pads`` is ONNX-ordered
    (all begins, then all ends).
    """
    weight = np.asarray(weight, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    out_channels, per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    rank = len(kernel)
    begins, ends = pads[:rank], pads[rank:]
    padded_shape = [size + b + e for size, b, e in zip(spatial_shape, begins, ends)]
    image = np.zeros((t.shape[0], *padded_shape))
    interior = tuple(slice(b, b + size) for b, size in zip(begins, spatial_shape))
    image[(slice(None), *interior)] = t.reshape(-1, *(1,) * rank)
    image = image.reshape(group, per_group, *padded_shape)
    out_shape = [
        conv_output_size(size, k, b, e, stride, dilation)
        for size, k, b, e, stride, dilation in zip(spatial_shape, kernel, begins, ends, strides, dilations)
    ]
    kernels = weight.reshape(group, out_channels // group, per_group, *kernel)
    result = np.zeros((group, out_channels // group, *out_shape))
    for tap in np.ndindex(*kernel):
        window = tuple(
            slice(k * dilation, k * dilation + stride * (size - 1) + 1, stride)
            for k, dilation, stride, size in zip(tap, dilations, strides, out_shape)
        )
        result += np.einsum("gmc,gc...->gm...", kernels[(..., *tap)], image[(slice(None), slice(None), *window)])
    return result.reshape(out_channels, *out_shape)


def cast_back(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Cast float64 fold results to the model's ``dtype``, refusing silent overflow.

    A weight that was finite in float64 and becomes ±inf in float16 would change
    the model's function, so it raises :class:`FoldOverflowError` naming ``what``.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        cast = values.astype(dtype)
    if not np.isfinite(cast).all() and np.isfinite(values).all():
        raise _overflow(what, dtype, float(np.max(np.abs(values))))
    return cast


def _overflow(what: str, dtype: np.dtype, largest: float) -> FoldOverflowError:
    return FoldOverflowError(
        f"folded {what} would overflow {np.dtype(dtype).name} (largest magnitude {largest:.4g})"
    )


# Elements per block in cast_with_effect and scale_with_effect: float64 temporaries of
# this size (1 MiB each) stay in a core's 2 MiB L2 cache, where whole-tensor temporaries of
# a large weight would cost more than the fold. Measured on 226 MB of 9 MB weights, two
# threads: 2**17 0.098 s, 2**16 0.099 s, 2**18 0.114 s, 2**15 0.133 s (per-call overhead).
_BLOCK = 1 << 17


def cast_with_effect(
    exact: np.ndarray, dtype: np.dtype, old: np.ndarray | None, what: str
) -> tuple[np.ndarray, float | None, float]:
    """:func:`cast_back`, plus how far the fold moved the tensor, in one blocked pass.

    Returns the cast tensor; the largest ``|exact - old| / |old|`` over elements where
    ``old`` is non-zero (``|s - 1|`` for a plain scale, what amplifies rounding in low
    precision; None when there was no old tensor, e.g. a created bias); and the largest
    ``|cast - exact|``, what the cast back cost. One pass over cache-sized blocks
    instead of one whole-tensor pass per quantity: on a large weight the measuring
    would otherwise cost more than the fold.

    Raises:
        FoldOverflowError: as :func:`cast_back`.
    """
    exact = np.ascontiguousarray(exact)
    cast = np.empty(exact.shape, dtype)
    flat_exact, flat_cast = exact.reshape(-1), cast.reshape(-1)
    flat_old = None if old is None else np.ascontiguousarray(np.broadcast_to(old, exact.shape)).reshape(-1)
    worst_change, worst_rounding = 0.0, 0.0
    for start in range(0, flat_exact.size, _BLOCK):
        precise = flat_exact[start : start + _BLOCK]
        with np.errstate(over="ignore", invalid="ignore"):
            rounded = flat_cast[start : start + _BLOCK] = precise.astype(dtype)
        if not np.isfinite(rounded).all() and np.isfinite(precise).all():
            cast_back(exact, np.dtype(dtype), what)  # raises, naming the largest value
        difference = np.subtract(precise, rounded, dtype=np.float64)
        worst_rounding = max(worst_rounding, float(np.max(np.abs(difference, out=difference))))
        if flat_old is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.divide(precise, flat_old[start : start + _BLOCK], dtype=np.float64)
            change = np.abs(np.subtract(ratio, 1.0, out=ratio), out=ratio)
            largest = float(change.max())
            if not np.isfinite(largest):  # rare: zeros in the old tensor have no relative change
                largest = float(np.max(change[np.isfinite(change)], initial=0.0))
            worst_change = max(worst_change, largest)
    return cast, (None if old is None else worst_change), worst_rounding


Block = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]
"""A piece of a weight, the matching piece of its factor, and where its product goes (None:
only measured, into a scratch buffer)."""


def _row_pieces(weight: np.ndarray, factor: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Matching pieces of ``weight`` (C-contiguous) and ``factor`` (same rank, broadcastable)
    of at most ``_BLOCK`` elements each, cut along the leading axes, in the weight's order:
    consecutive pieces are consecutive runs of its memory (none when it is empty)."""
    if weight.size == 0:
        return
    if weight.size <= _BLOCK or weight.ndim == 0:
        yield weight, factor
        return
    rows = weight.shape[0]
    per_row = weight.size // rows
    if per_row <= _BLOCK:
        step = _BLOCK // per_row
        for start in range(0, rows, step):
            part = slice(start, start + step)
            yield weight[part], (factor[part] if factor.shape[0] > 1 else factor)
        return
    for row in range(rows):  # rows larger than a block are cut further
        yield from _row_pieces(weight[row], factor[row if factor.shape[0] > 1 else 0])


def _blocks_into(pieces: Iterable[tuple[np.ndarray, np.ndarray]], out: np.ndarray | None) -> list[Block]:
    """Consecutive ``pieces`` of a weight (and factor) as blocks, each writing into its run of
    ``out`` (a flat array, from its start) or, without one, only measured."""
    blocks: list[Block] = []
    position = 0
    for old, scale in pieces:
        target = None if out is None else out[position : position + old.size].reshape(old.shape)
        blocks.append((old, scale, target))
        position += old.size
    return blocks


def _largest_change(weight: np.ndarray, factor: np.ndarray) -> float:
    """The largest ``|factor - 1|`` over the factor entries that scale some finite,
    non-zero weight: the relative change of ``weight * factor`` wherever it has one.

    Entries are tried from the largest change down and the first whose slice of the
    weight qualifies wins, so usually a single slice is looked at.
    """
    change = np.abs(factor - 1.0)
    for flat in np.argsort(change, axis=None, kind="stable")[::-1]:
        position = np.unravel_index(flat, factor.shape)
        if not np.isfinite(change[position]):
            continue
        covered = weight[tuple(p if size > 1 else slice(None) for p, size in zip(position, factor.shape))]
        if np.any(np.isfinite(covered) & (covered != 0)):
            return float(change[position])
    return 0.0


@dataclass(frozen=True)
class _BlockResult:
    worst_rounding: float
    largest_overflowing: float | None
    """The largest ``|exact|`` of the blocks where a finite product did not survive the cast
    (None: no overflow)."""


def _scale_blocks(blocks: list[Block], measure: bool) -> _BlockResult:
    """Scale and cast ``blocks`` with buffers of their own; when ``measure``, also find the
    largest ``|cast - exact|`` and any finite product that did not survive the cast (an
    overflow, for the caller to report). Without it the blocks are only computed, as when a
    product already measured is computed again to be written."""
    exact_buffer = np.empty(_BLOCK)
    error_buffer = np.empty(_BLOCK) if measure else exact_buffer
    scratch = None
    worst_rounding, largest_overflowing = 0.0, None
    # Overflow and values that were not finite are found below; numpy's warnings about them
    # would reach the user's stderr (errstate is per thread: the caller's does not reach here).
    with np.errstate(all="ignore"):
        for old, scale, rounded in blocks:
            exact = exact_buffer[: old.size].reshape(old.shape)
            if rounded is None:
                if scratch is None:
                    scratch = np.empty(_BLOCK, old.dtype)
                rounded = scratch[: old.size].reshape(old.shape)
            # Widening first keeps the multiply within float64, where it is twice as fast
            # as a mixed-type one, with the same result (widening is exact).
            np.copyto(exact, old)
            np.multiply(exact, scale, out=exact)
            np.copyto(rounded, exact, casting="unsafe")
            if not measure:
                continue
            error = error_buffer[: old.size].reshape(old.shape)
            np.copyto(error, rounded)
            np.subtract(exact, error, out=error)
            largest = max(float(error.max()), -float(error.min()))  # two reads instead of abs and a read
            if not np.isfinite(largest):  # rare: an overflow, or values that were already not finite
                if np.any(~np.isfinite(rounded) & np.isfinite(exact)):  # inf, or NaN in float8 without inf
                    block_largest = float(np.nanmax(np.abs(exact)))
                    largest_overflowing = max(largest_overflowing or 0.0, block_largest)
                largest = float(np.max(np.abs(error[np.isfinite(error)]), initial=0.0))
            worst_rounding = max(worst_rounding, largest)
    return _BlockResult(worst_rounding, largest_overflowing)


# numpy releases the GIL in its loops: a large weight is scaled by this many threads, each
# over a contiguous share of the blocks (measured 2.2x faster on two cores for 141 MB).
_THREADS = max(1, min(4, os.cpu_count() or 1))
_pool: ThreadPoolExecutor | None = None


def _shared(work: Callable[[list[_Item]], _Result], items: list[_Item]) -> list[_Result]:
    """``work`` over ``items``, in contiguous shares among the threads when there are enough."""
    global _pool
    if _THREADS == 1 or len(items) < 2 * _THREADS:
        return [work(items)]
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="bnfold-fold")
    size = -(-len(items) // _THREADS)
    return list(_pool.map(work, [items[start : start + size] for start in range(0, len(items), size)]))


def _compute(blocks: list[Block], measure: bool) -> list[_BlockResult]:
    """:func:`_scale_blocks` over ``blocks``, shared among the threads."""
    return _shared(functools.partial(_scale_blocks, measure=measure), blocks)


def _largest_of(pieces: list[np.ndarray]) -> float:
    """``max |piece|`` over ``pieces`` (inf when some value is not finite)."""
    largest = 0.0
    for piece in pieces:
        found = max(float(piece.max()), -float(piece.min()))  # two reads, no temporary
        if not math.isfinite(found):
            return math.inf
        largest = max(largest, found)
    return largest


# Elements a streamed product is computed in before that piece is written: several blocks
# per thread, so that the threads' start-up is paid once per piece (8 MiB of float32).
_PIECE_ELEMENTS = 16 * _BLOCK


class ScaledWeight:
    """``weight * factor`` cast back to ``weight``'s dtype, computed when it is used.

    The product of a weight that lies in a file (a read-only memory map of it) is kept as
    this recipe instead of as an array: holding it costs no memory, and when the output is
    written its values are computed piece by piece (:meth:`pieces`) into two small buffers,
    so a model's folded weights never all exist in memory at once, and each is computed
    once. The arithmetic is :func:`scale_with_effect`'s, block for block, so the values are
    bit for bit the ones an array would hold; ``numpy.asarray`` computes the whole product
    for a reader that needs it.

    :attr:`rounding_error` (the largest ``|cast - exact|``) is measured whenever the product
    is computed; it is None until then, unless the fold measured it already.
    """

    def __init__(self, weight: np.ndarray, factor: np.ndarray, rounding_error: float | None = None) -> None:
        self._weight, self._factor = weight, factor
        self.shape: tuple[int, ...] = weight.shape
        self.dtype: np.dtype = weight.dtype
        self.nbytes: int = weight.nbytes
        self.rounding_error = rounding_error

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        cast = np.empty(self.shape, self.dtype)
        measure = self.rounding_error is None
        results = _compute(_blocks_into(_row_pieces(self._weight, self._factor), cast.reshape(-1)), measure)
        if measure:
            self._measured(results)
        return cast if dtype is None else cast.astype(dtype, copy=False)

    def pieces(self) -> Iterator[np.ndarray]:
        """The product's values in order, as consecutive flat pieces, each a view of one of two
        reused buffers: a piece stays valid until the next one is asked for (the caller writes
        it meanwhile, while the piece after it is computed)."""
        batches = self._batches()
        if not batches:
            self._measured([])
            return
        size = max(sum(old.size for old, _ in batch) for batch in batches)
        buffers = [np.empty(size, self.dtype) for _ in range(min(2, len(batches)))]
        global _ahead
        if _ahead is None:
            _ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bnfold-ahead")
        measure = self.rounding_error is None
        results: list[_BlockResult] = []
        pending = _ahead.submit(self._computed, batches[0], buffers[0], measure)
        try:
            for index in range(len(batches)):
                piece, measured = pending.result()
                results += measured
                if index + 1 < len(batches):
                    pending = _ahead.submit(self._computed, batches[index + 1], buffers[(index + 1) % 2], measure)
                yield piece
        finally:
            pending.cancel()
            wait([pending])  # a writer that stopped early leaves no computation behind
        if measure:
            self._measured(results)

    def _measured(self, results: list[_BlockResult]) -> None:
        """Keep the rounding error of a whole computation. An overflow cannot appear here:
        :func:`scale_with_effect` only hands out products it has proven to stay finite."""
        if any(result.largest_overflowing is not None for result in results):
            raise RuntimeError("a streamed product overflowed after its bound said it could not")
        self.rounding_error = max((result.worst_rounding for result in results), default=0.0)

    def _batches(self) -> list[list[tuple[np.ndarray, np.ndarray]]]:
        """The weight's blocks grouped into pieces of at most ``_PIECE_ELEMENTS`` (or one block)."""
        batches: list[list[tuple[np.ndarray, np.ndarray]]] = []
        filled = _PIECE_ELEMENTS
        for old, scale in _row_pieces(self._weight, self._factor):
            if filled + old.size > _PIECE_ELEMENTS:
                batches.append([])
                filled = 0
            batches[-1].append((old, scale))
            filled += old.size
        return batches

    @staticmethod
    def _computed(
        batch: list[tuple[np.ndarray, np.ndarray]], buffer: np.ndarray, measure: bool
    ) -> tuple[np.ndarray, list[_BlockResult]]:
        filled = sum(old.size for old, _ in batch)
        return buffer[:filled], _compute(_blocks_into(batch, buffer), measure)


# One thread that computes a streamed product's next piece while the current one is written.
_ahead: ThreadPoolExecutor | None = None

# Types whose largest finite value numpy knows (np.finfo): for these a bound proves that a
# product cannot overflow without computing it.
_BOUNDED_TYPES = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64))


def _largest_magnitude(weight: np.ndarray) -> float:
    """``max |weight|`` read block by block, without a temporary (inf when a value is not finite)."""
    pieces = [old for old, _ in _row_pieces(weight, np.ones((1,) * weight.ndim))]
    return max(_shared(_largest_of, pieces), default=0.0)


def _cannot_overflow(weight: np.ndarray, factor: np.ndarray) -> bool:
    """Whether no element of ``weight * factor`` can leave the dtype's finite range, proven
    from ``max |W| * max |factor|``: each product is at most that in float64 (rounding is
    monotonic), and a value no larger than the largest finite one is cast to a finite one.
    Not finite (a NaN or inf weight or factor) proves nothing."""
    if weight.dtype not in _BOUNDED_TYPES or factor.size == 0:
        return False
    bound = _largest_magnitude(weight) * float(np.max(np.abs(factor)))
    return bool(np.isfinite(bound)) and bound <= float(np.finfo(weight.dtype).max)


def scale_with_effect(
    weight: np.ndarray, factor: np.ndarray, what: str
) -> tuple[np.ndarray | ScaledWeight, float, float | None]:
    """:func:`cast_with_effect` of ``weight * factor`` back to ``weight.dtype``, in one
    blocked pass: the product exists in float64 one cache-sized block at a time, the blocks
    of a large weight shared among threads.

    ``factor`` broadcasts to ``weight`` (one entry per output channel, e.g.
    :func:`axis_factor`). Returns the cast tensor, the largest relative change
    (``|factor - 1|`` wherever the weight is finite and non-zero: there the ratio of
    new to old is the factor itself, so the weight need not be divided) and the
    largest ``|cast - exact|``. A folded layer's weight is the largest tensor a fold
    touches, and this is the whole of its arithmetic.

    A weight mapped from a file (``numpy.memmap``) gives a :class:`ScaledWeight` instead of
    an array, computed when the output is written: the product of a large model's weights
    then never has to be held, and is computed once. When a bound on its magnitude proves
    that it cannot overflow (as good as always), nothing more is computed here and the
    rounding error is None: the recipe measures it when it computes the product.

    Raises:
        FoldOverflowError: as :func:`cast_back`, for any element that was finite in
        float64 and is not once cast (other elements may have been NaN or inf before).
    """
    mapped = isinstance(weight, np.memmap)
    weight = np.ascontiguousarray(weight)
    factor = np.asarray(factor, dtype=np.float64)
    factor = factor.reshape((1,) * (weight.ndim - factor.ndim) + factor.shape)
    change = _largest_change(weight, factor)
    if mapped and _cannot_overflow(weight, factor):
        return ScaledWeight(weight, factor), change, None
    cast = None if mapped else np.empty(weight.shape, weight.dtype)
    results = _compute(_blocks_into(_row_pieces(weight, factor), None if cast is None else cast.reshape(-1)),
                       measure=True)
    overflowing = [result.largest_overflowing for result in results if result.largest_overflowing is not None]
    if overflowing:
        raise _overflow(what, weight.dtype, max(overflowing))
    worst_rounding = max((result.worst_rounding for result in results), default=0.0)
    values = ScaledWeight(weight, factor, worst_rounding) if cast is None else cast
    return values, change, worst_rounding


def convtranspose_factor(s: np.ndarray, weight_shape: tuple[int, ...], group: int) -> np.ndarray:
    """The factor (float64) that ``W' = W * factor`` applies to a ConvTranspose weight
    ``[C_in, C_out/group, k...]`` so that output channel ``o`` is scaled by ``s[o]``.

    Unlike Conv, the output channel is not the weight's first axis. Output channel
    ``o = g * (C_out/group) + j`` is computed from slice ``W[i, j]`` for every input
    channel ``i`` of group ``g`` (``i // (C_in/group) == g``), so ``s[o]`` scales axis
    1 of the rows that belong to group ``g``: the factor is ``[1, C_out, 1...]`` for
    one group, else ``[C_in, C_out/group, 1...]`` (one entry per kernel, not per tap).
    """
    c_in, per_group_out, *kernel = weight_shape
    ones = [1] * len(kernel)
    s = np.asarray(s, dtype=np.float64)
    if group == 1:
        return s.reshape(1, per_group_out, *ones)
    per_input = np.repeat(s.reshape(group, 1, per_group_out), c_in // group, axis=1)
    return per_input.reshape(c_in, per_group_out, *ones)


def compose_affines(
    first: tuple[np.ndarray, np.ndarray], then: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """``(s, t)`` of ``then(first(x))`` for two per-channel affine maps: ``s2 * (s1 x + t1) + t2``."""
    s1, t1 = (np.asarray(v, dtype=np.float64) for v in first)
    s2, t2 = (np.asarray(v, dtype=np.float64) for v in then)
    return s2 * s1, s2 * t1 + t2


# -- an affine split over the inputs of a Concat or an Add -----------------------------------------


def affine_slices(s: np.ndarray, t: np.ndarray, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The pieces of a per-channel affine over ``Concat(y1, y2, ...)`` along its channel axis.

    Channel c of the concat is channel ``c - offset_i`` of the segment ``y_i`` it lies in, so
    ``s * Concat(y1, y2) + t = Concat(s1 * y1 + t1, s2 * y2 + t2)`` with ``(s_i, t_i)`` the
    entries of ``s`` and ``t`` over ``y_i``'s channels (``sizes``, in order).
    """
    bounds = np.cumsum([0, *sizes])
    if bounds[-1] != len(s):
        raise ValueError(f"segments of {list(sizes)} channels do not cover {len(s)}")
    s, t = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    return [(s[begin:end].copy(), t[begin:end].copy()) for begin, end in zip(bounds[:-1], bounds[1:])]


def constant_with_affine(constant: np.ndarray, s: np.ndarray, t: np.ndarray, axes_after: int) -> np.ndarray:
    """``s * c + t`` for a constant input ``c`` of an Add or a Concat, with ``s`` and ``t`` laid
    along the channel axis, which has ``axes_after`` axes after it (float64).

    A constant absorbs the affine in place: ``s * (y + c) + t = s * y + (s * c + t)``. A
    constant that broadcast along the channel axis (a scalar, ``[1, 1, 1]``) becomes
    per-channel, which broadcasts to the same result.
    """
    shape = [-1] + [1] * axes_after
    values = np.asarray(constant, dtype=np.float64)
    return values * np.asarray(s, dtype=np.float64).reshape(shape) + np.asarray(t, dtype=np.float64).reshape(shape)


# -- sibling Conv branches over one input merged into one Conv ------------------------------------


@dataclass(frozen=True)
class ConvGeometry:
    """Which input positions a Conv's kernel taps read, per spatial axis.

    Output position ``o`` of an axis reads, at tap ``i``, the input position
    ``o * stride + i * dilation - pad_begin``; the output has
    ``(size + size_change - 1) // stride + 1`` positions (ONNX's floor rule), where
    ``size_change = pad_begin + pad_end - dilation * (kernel - 1)``.
    """

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]

    @property
    def size_changes(self) -> tuple[int, ...]:
        return tuple(begin + end - dilation * (k - 1) for k, dilation, begin, end
                     in zip(self.kernel, self.dilations, self.pads_begin, self.pads_end))

    @classmethod
    def identity(cls, rank: int) -> ConvGeometry:
        """A 1×…×1 kernel, unpadded, stride 1: what reads ``x`` itself at every position."""
        ones, zeros = (1,) * rank, (0,) * rank
        return cls(ones, ones, ones, zeros, zeros)


def tap_positions(inner: ConvGeometry, outer: ConvGeometry) -> tuple[np.ndarray, ...] | None:
    """For each spatial axis, the tap of ``outer`` that reads what each tap of ``inner`` reads.

    Both Convs must produce the same positions from any input (same strides and size
    changes); then tap ``i`` of ``inner`` and tap ``j`` of ``outer`` read the same input
    position for every output exactly when ``i * d_in - p_in = j * d_out - p_out``. None when
    the positions differ or some tap of ``inner`` has no such tap in ``outer``: ``inner``
    does not fit in ``outer``'s kernel.
    """
    if inner.strides != outer.strides or inner.size_changes != outer.size_changes:
        return None
    taps = []
    for k_in, d_in, p_in, k_out, d_out, p_out in zip(inner.kernel, inner.dilations, inner.pads_begin,
                                                     outer.kernel, outer.dilations, outer.pads_begin):
        reach = np.arange(k_in) * d_in - p_in + p_out
        if np.any(reach % d_out) or np.any(reach < 0) or np.any(reach // d_out >= k_out):
            return None
        taps.append(reach // d_out)
    return tuple(taps)


def regroup_kernel(weight: np.ndarray, group: int, to_group: int) -> np.ndarray:
    """A Conv weight ``[M, C/group, k...]`` written for ``to_group`` groups, ``[M, C/to_group, k...]``
    (float64): the same Conv, with zeros where its finer groups connect nothing.

    ``to_group`` divides ``group``, so each group of the weight lies inside one of the coarser
    groups: output channel o of fine group g reads input channels ``g * C/group ...``, which
    sit at offset ``g * C/group - G * C/to_group`` of the coarse group ``G`` that holds o.
    """
    out_channels, per_group, *kernel = weight.shape
    if group % to_group:
        raise ValueError(f"{to_group} groups do not contain {group}")
    channels = per_group * group
    per_coarse = channels // to_group
    outputs_per_group = out_channels // group
    regrouped = np.zeros((out_channels, per_coarse, *kernel))
    for g in range(group):
        coarse = g // (group // to_group)
        offset = g * per_group - coarse * per_coarse
        rows = slice(g * outputs_per_group, (g + 1) * outputs_per_group)
        regrouped[rows, offset:offset + per_group] = weight[rows]
    return regrouped


def identity_kernel(s: np.ndarray, spatial_rank: int) -> np.ndarray:
    """``s * x`` as a Conv weight: a depthwise (``group = C``) 1×…×1 kernel ``[C, 1, 1...]``.

    Placed at the tap of a sibling's kernel that reads ``x`` itself
    (:func:`tap_positions` against :meth:`ConvGeometry.identity`) and regrouped to its
    groups, it puts ``s_c`` on the diagonal: input channel c to output channel c.
    """
    return np.asarray(s, dtype=np.float64).reshape(-1, 1, *(1,) * spatial_rank)


def kernel_with_branch(
    weight: np.ndarray, group: int, branch: np.ndarray, branch_group: int, taps: tuple[np.ndarray, ...]
) -> np.ndarray:
    """``weight`` plus a sibling's kernel ``branch`` (float64), so that one Conv computes both.

    The branch is regrouped to ``group`` groups (:func:`regroup_kernel`) and zero-padded into
    ``weight``'s kernel: its tap ``i`` of each axis lands on tap ``taps[axis][i]``
    (:func:`tap_positions`). The Conv is linear in its weight, so
    ``Conv(x, W) + Conv'(x, B) = Conv(x, W + pad(B))``.
    """
    merged = np.asarray(weight, dtype=np.float64).copy()
    regrouped = regroup_kernel(np.asarray(branch, dtype=np.float64), branch_group, group)
    out_channels, per_group = regrouped.shape[:2]
    merged[np.ix_(np.arange(out_channels), np.arange(per_group), *taps)] += regrouped
    return merged


# -- moving an affine across ops that commute with it ------------------------------------------
#
# The movers of ``bnfold.rules`` (``rules/move_*.py``) decide whether ``op(s * x + t)`` equals
# ``s' * op(x) + t'`` and what ``s'``, ``t'`` are; the arithmetic and the window geometry they
# decide with live here, so that it can be property-tested on plain arrays.


def reshaped_affine(
    s: np.ndarray, t: np.ndarray, trailing: int, length_to: int, trailing_to: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """A per-channel affine moved across a row-major reshape, or None when it is not per-channel there.

    The affine scales axis ``a`` of a tensor A (``C = len(s)`` entries; ``trailing`` is the
    product of A's sizes after ``a``), so the element at flat index ``f`` is scaled by
    ``s[(f // trailing) % C]``. A reshape keeps flat indices; on axis ``b`` of the reshaped
    tensor B (``length_to`` entries, ``trailing_to`` the product of B's sizes after ``b``) an
    affine would scale it by ``s'[(f // trailing_to) % length_to]``. With
    ``r = trailing / trailing_to`` an integer and ``length_to`` a multiple of ``C * r``::

        (f // trailing) % C = ((f // trailing_to) // r) % C = (j // r) % C,   j = (f // trailing_to) % length_to

    so ``s' = tile(repeat(s, r), length_to / (C r))`` (each channel a block of ``r``
    consecutive entries: ``[N, C*H*W] ↔ [N, C, H, W]`` gives ``r = H*W``). Otherwise some
    entry of axis ``b`` holds elements of several channels and no ``s'`` exists for every ``s``.
    The relation is symmetric: the same function moves the affine either way.
    """
    channels = len(s)
    if channels == 0 or trailing_to <= 0 or trailing % trailing_to:
        return None
    repeat = trailing // trailing_to
    if length_to % (channels * repeat):
        return None
    copies = length_to // (channels * repeat)
    s = np.asarray(s, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    return np.tile(np.repeat(s, repeat), copies), np.tile(np.repeat(t, repeat), copies)


def pool_windows(
    size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int, ceil_mode: bool
) -> list[list[int]]:
    """The input positions each output of a pool reads along one axis, in order.

    Positions below 0 or from ``size`` on are padding. The output count follows the ONNX
    rule (floor, or ceil with ``ceil_mode``); with ``ceil_mode`` a last window that would
    start inside the end padding is dropped, as PyTorch and onnxruntime do. Positions past
    ``size + pad_end`` (a ``ceil_mode`` window hanging over the end) are neither values nor
    counted padding.
    """
    span = dilation * (kernel - 1) + 1
    room = size + pad_begin + pad_end - span
    if room < 0:
        return []
    count = (-(-room // stride) if ceil_mode else room // stride) + 1
    if ceil_mode and count > 1 and (count - 1) * stride >= size + pad_begin:
        count -= 1
    return [[i * stride - pad_begin + j * dilation for j in range(kernel)] for i in range(count)]


def windows_read_padding(windows: list[list[int]], size: int, pad_end: int) -> bool:
    """Whether some window takes a padded position (at the start, or in the ``pad_end`` positions
    after the input), which an AveragePool with ``count_include_pad=1`` counts as a zero."""
    return any(position < 0 or size <= position < size + pad_end for window in windows for position in window)


def windows_without_values(windows: list[list[int]], size: int) -> bool:
    """Whether some window holds no input value at all (only padding), where a pool's result
    does not depend on its input."""
    return any(all(not 0 <= position < size for position in window) for window in windows)


def first_negative(s: np.ndarray) -> int | None:
    """The first channel whose scale is negative, or None.

    ``max(s * x + t) = s * max(x) + t`` holds per channel exactly when ``s >= 0`` (with
    ``s = 0`` both sides are ``t``); a negative ``s`` turns the max into ``s * min(x) + t``.
    """
    negative = np.flatnonzero(np.asarray(s, dtype=np.float64) < 0)
    return int(negative[0]) if negative.size else None


def first_changed_pad_value(s: np.ndarray, t: np.ndarray, value: float) -> int | None:
    """The first channel whose affine moves a constant pad's ``value``, or None.

    ``pad(s * x + t, v)`` holds ``v`` where ``s * pad(x, v) + t`` holds ``s * v + t``: the two
    agree exactly when ``s * v + t == v`` in every channel (``t = 0`` for the usual ``v = 0``).
    """
    s = np.asarray(s, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    moved = np.flatnonzero(s * float(value) + t != float(value))
    return int(moved[0]) if moved.size else None
