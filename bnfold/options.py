"""What the user asks of a verification: which inputs, which tolerances, which provider.

Shared by ``bnfold fold`` and ``bnfold check`` and by the Python API; :mod:`bnfold.inputs`
turns the input choices into trials and :mod:`bnfold.verify` applies the tolerances. The
default tolerance of every output dtype is chosen here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# (atol, rtol) per output dtype. Folding changes the rounding order of one
# multiply-add per layer; these bounds sit well above that and far below any real bug.
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-9, 1e-7),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}
EXACT = (0.0, 0.0)


def default_tolerance(dtype: np.dtype) -> tuple[float, float]:
    """Per-dtype ``(atol, rtol)`` defaults; integer and boolean outputs must match exactly.

    Why these values: folding rounds each folded weight once to the model's dtype and changes
    the order of one multiply-add, so the expected difference is a few units in the last place
    of the output, summed over a layer's fan-in. Machine epsilon is 2.2e-16 (float64), 1.2e-7
    (float32), 9.8e-4 (float16) and 7.8e-3 (bfloat16); each default leaves a wide margin above
    that (a float16 Conv→BN fold differs by ~4e-3, a bfloat16 one by ~3e-2 on outputs of
    magnitude 5) and stays far below the error of a wrong fold (order 1).
    """
    return DEFAULT_TOLERANCES.get(np.dtype(dtype).name, EXACT)


@dataclass(frozen=True)
class Tolerances:
    """The user's tolerances: per output (``--tol``), else global (``--atol/--rtol``), else per dtype.

    A global atol given without rtol (or the reverse) keeps the dtype default for the other.
    """

    atol: float | None = None
    rtol: float | None = None
    per_output: dict[str, tuple[float, float]] = field(default_factory=dict)

    def for_output(self, name: str, dtype: np.dtype) -> tuple[float, float]:
        if name in self.per_output:
            return self.per_output[name]
        default_atol, default_rtol = default_tolerance(dtype)
        return (
            default_atol if self.atol is None else self.atol,
            default_rtol if self.rtol is None else self.rtol,
        )


@dataclass
class VerifyOptions:
    """How two models are compared (shared by ``bnfold fold`` and ``bnfold check``)."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """``--input-shape``: concrete shapes for inputs with symbolic dims."""
    batch: int | None = None
    """``--batch``: the size of every symbolic first dim (inputs without ``shapes``)."""
    seed: int = 0
    trials: int = 1
    inputs: Path | None = None
    """Real inputs (.npz or ONNX test-data folder) instead of generated ones."""
    tolerances: Tolerances = field(default_factory=Tolerances)
    provider: str = "CPUExecutionProvider"
