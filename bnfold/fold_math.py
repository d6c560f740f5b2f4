"""The arithmetic of folding BatchNormalization, on plain numpy arrays.

Inference-mode BatchNormalization is a per-channel affine map. With
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``::

    BN(x)[c] = s[c] * x[c] + t[c]

Backward fold (BN after a linear layer ``y = W x + b`` whose output channel c is
row c of W): ``BN(y) = (s * W) x + (s * b + t)``, so ``W' = W * s`` along the
output-channel axis and ``b' = s * b + t = (b - mean) * s + beta``.

Everything here is computed in float64 from the stored values and cast back to
the model's dtype exactly once, at the end (:func:`cast_back`); doing the math in
float16/float32 is the classic source of folding error. No ONNX types appear in
this module so that the math can be property-tested without building graphs.
"""

from __future__ import annotations

import numpy as np


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


def scale_along_axis(weight: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
    """Multiply ``weight`` by ``s[c]`` at every index ``c`` of ``axis`` (float64 result).

    This is ``W' = W * s`` for every layer whose output channel owns one slice of
    the weight: Conv (axis 0 of ``[M, C/g, k...]``), Gemm with ``transB=1`` (axis 0
    of ``[N, K]``) or ``transB=0`` (axis 1 of ``[K, N]``).
    """
    shape = [1] * np.ndim(weight)
    shape[axis] = -1
    # One pass: the widening to float64 happens inside the multiply.
    return np.multiply(weight, np.asarray(s, dtype=np.float64).reshape(shape), dtype=np.float64)


def fold_bias(bias: np.ndarray | None, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Return ``b' = b * s + t``; a missing bias counts as zero.

    ``bias`` may be any shape that broadcasts against the channel axis (the last
    axis), e.g. a Gemm ``C`` of shape ``[]``, ``[N]``, ``[1, N]`` or ``[M, N]``; the
    result has the broadcast shape.
    """
    if bias is None:
        return np.asarray(t, dtype=np.float64).copy()
    return np.asarray(bias, dtype=np.float64) * s + t


def cast_back(values: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Cast float64 fold results to the model's ``dtype``, refusing silent overflow.

    A weight that was finite in float64 and becomes ±inf in float16 would change
    the model's function, so it raises :class:`FoldOverflowError` naming ``what``.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        cast = values.astype(dtype)
    if not np.isfinite(cast).all() and np.isfinite(values).all():
        worst = float(np.max(np.abs(values)))
        raise FoldOverflowError(
            f"folded {what} would overflow {np.dtype(dtype).name} (largest magnitude {worst:.4g})"
        )
    return cast


def scale_convtranspose_weight(weight: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    """``W' = W * s`` for a ConvTranspose weight ``[C_in, C_out/group, k...]`` (float64 result).

    Unlike Conv, the output channel is not the weight's first axis. Output channel
    ``o = g * (C_out/group) + j`` is computed from slice ``W[i, j]`` for every input
    channel ``i`` of group ``g`` (``i // (C_in/group) == g``), so ``s[o]`` scales axis
    1 of the rows that belong to group ``g``. Splitting both channel axes by group
    makes that a plain broadcast.
    """
    weight = np.asarray(weight, dtype=np.float64)
    c_in, per_group_out, *kernel = weight.shape
    grouped = weight.reshape(group, c_in // group, per_group_out, *kernel)
    scale = np.asarray(s, dtype=np.float64).reshape(group, 1, per_group_out, *([1] * len(kernel)))
    return (grouped * scale).reshape(weight.shape)


def compose_affines(
    first: tuple[np.ndarray, np.ndarray], then: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """``(s, t)`` of ``then(first(x))`` for two per-channel affine maps: ``s2 * (s1 x + t1) + t2``."""
    s1, t1 = (np.asarray(v, dtype=np.float64) for v in first)
    s2, t2 = (np.asarray(v, dtype=np.float64) for v in then)
    return s2 * s1, s2 * t1 + t2
