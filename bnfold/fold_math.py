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


def scale_along_axis(weight: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
    """Multiply ``weight`` by ``s[c]`` at every index ``c`` of ``axis`` (float64 result).

    This is ``W' = W * s`` for every layer whose output channel owns one slice of
    the weight: Conv (axis 0 of ``[M, C/g, k...]``), Gemm with ``transB=1`` (axis 0
    of ``[N, K]``) or ``transB=0`` (axis 1 of ``[K, N]``).
    """
    weight = np.asarray(weight, dtype=np.float64)
    shape = [1] * weight.ndim
    shape[axis] = -1
    return weight * np.asarray(s, dtype=np.float64).reshape(shape)


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
    cast = values.astype(dtype)
    if not np.all(np.isfinite(cast.astype(np.float64))) and np.all(np.isfinite(values)):
        worst = float(np.max(np.abs(values)))
        raise FoldOverflowError(
            f"folded {what} would overflow {np.dtype(dtype).name} (largest magnitude {worst:.4g})"
        )
    return cast
