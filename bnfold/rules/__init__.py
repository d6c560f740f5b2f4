"""The fold rules, in the order they are tried for each BatchNormalization.

Adding a pattern means adding a module with one :class:`~bnfold.rules.base.FoldRule`
subclass and one line here; no other rule changes. Backward folds (into the
producer) come first so that a BN between two layers is folded into the one
before it.
"""

from __future__ import annotations

from bnfold.rules.base import BatchNorm, FoldPlan, FoldRule, Refusal, TensorUpdate
from bnfold.rules.batchnorm import read_batchnorm
from bnfold.rules.batchnorm_merge import BatchNormIntoBatchNorm
from bnfold.rules.conv import ConvIntoBatchNorm
from bnfold.rules.convtranspose import ConvTransposeIntoBatchNorm
from bnfold.rules.decomposed import read_decomposed_affine
from bnfold.rules.gemm import GemmIntoBatchNorm
from bnfold.rules.matmul import MatMulIntoBatchNorm
from bnfold.rules.matmul_add import MatMulAddIntoBatchNorm

# Functions that recognise a removable per-channel affine map at a node (or None).
AFFINE_READERS = (read_batchnorm, read_decomposed_affine)

RULES: tuple[FoldRule, ...] = (
    ConvIntoBatchNorm(),
    GemmIntoBatchNorm(),
    ConvTransposeIntoBatchNorm(),
    MatMulIntoBatchNorm(),
    MatMulAddIntoBatchNorm(),
    BatchNormIntoBatchNorm(),  # last: an affine merges into a BN only when no layer takes it
)

__all__ = ["AFFINE_READERS", "RULES", "BatchNorm", "FoldPlan", "FoldRule", "Refusal", "TensorUpdate", "read_batchnorm"]
