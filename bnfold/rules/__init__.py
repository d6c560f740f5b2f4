"""The fold rules, in the order they are tried for each BatchNormalization.

Adding a pattern means adding a module with one :class:`~bnfold.rules.base.FoldRule`
subclass and one line here; no other rule changes. Backward folds (into the
producer) come first so that a BN between two layers is folded into the one
before it; forward folds (into the consumers) follow.
"""

from __future__ import annotations

from bnfold.rules.base import BatchNorm, FoldPlan, FoldRule, Refusal, TensorUpdate
from bnfold.rules.batchnorm import read_batchnorm
from bnfold.rules.batchnorm_merge import BatchNormIntoBatchNorm
from bnfold.rules.conv import ConvIntoBatchNorm
from bnfold.rules.convtranspose import ConvTransposeIntoBatchNorm
from bnfold.rules.decomposed import read_decomposed_affine
from bnfold.rules.forward_conv import ConvAfterBatchNorm
from bnfold.rules.forward_linear import FlattenLinearAfterBatchNorm, LinearAfterBatchNorm
from bnfold.rules.gemm import GemmIntoBatchNorm
from bnfold.rules.layout import ThroughLayoutIntoConsumer
from bnfold.rules.matmul import MatMulIntoBatchNorm
from bnfold.rules.matmul_add import MatMulAddIntoBatchNorm
from bnfold.rules.transpose import TransposedLayerIntoBatchNorm

# Functions that recognise a removable per-channel affine map at a node (or None).
AFFINE_READERS = (read_batchnorm, read_decomposed_affine)

FORWARD_RULES: tuple[FoldRule, ...] = (LinearAfterBatchNorm(), FlattenLinearAfterBatchNorm(), ConvAfterBatchNorm())

RULES: tuple[FoldRule, ...] = (
    ConvIntoBatchNorm(),
    GemmIntoBatchNorm(),
    ConvTransposeIntoBatchNorm(),
    MatMulIntoBatchNorm(),
    MatMulAddIntoBatchNorm(),
    TransposedLayerIntoBatchNorm(),
    *FORWARD_RULES,
    # The forward rules through a Transpose/Squeeze/Unsqueeze (tf2onnx's NHWC and Conv1D inputs).
    ThroughLayoutIntoConsumer(FORWARD_RULES),
    BatchNormIntoBatchNorm(),  # last: an affine merges into a BN only when no layer takes it
)


def with_exact_padding(rules: tuple[FoldRule, ...]) -> tuple[FoldRule, ...]:
    """``rules`` with the forward Conv fold also folding padded Convs (``--exact-padding``),
    through a Transpose/Squeeze/Unsqueeze too."""

    def padded(rule: FoldRule) -> FoldRule:
        if isinstance(rule, ConvAfterBatchNorm):
            return ConvAfterBatchNorm(exact_padding=True)
        if isinstance(rule, ThroughLayoutIntoConsumer):
            return ThroughLayoutIntoConsumer(tuple(padded(inner) for inner in rule.rules))
        return rule

    return tuple(padded(rule) for rule in rules)


__all__ = [
    "AFFINE_READERS", "RULES", "BatchNorm", "FoldPlan", "FoldRule", "Refusal", "TensorUpdate", "read_batchnorm",
    "with_exact_padding",
]
