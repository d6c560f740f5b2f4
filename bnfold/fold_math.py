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


def max_relative_change(old: np.ndarray, new: np.ndarray) -> float:
    """Largest ``|new - old| / |old|`` over the elements where ``old`` is non-zero (0 if none).

    Reported per fold so a user sees how far the fold moved the weights (``|s - 1|``
    for a plain scale), which is what amplifies rounding in low precision.
    """
    reference = np.asarray(old, dtype=np.float64)
    change = np.abs(np.asarray(new, dtype=np.float64) - reference)  # a Gemm bias may broadcast
    magnitude = np.broadcast_to(np.abs(reference), change.shape)
    relative = np.divide(change, magnitude, out=np.zeros_like(change), where=magnitude > 0)
    return float(relative.max()) if relative.size else 0.0


def max_abs_difference(cast: np.ndarray, exact: np.ndarray) -> float:
    """Largest ``|cast - exact|`` in float64: the rounding the cast back to the model's dtype cost."""
    difference = np.abs(np.asarray(cast, dtype=np.float64) - np.asarray(exact, dtype=np.float64))
    return float(difference.max()) if difference.size else 0.0
