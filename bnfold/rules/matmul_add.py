"""MatMul → Add(constant bias) → BatchNormalization: how many exporters write a Linear.

``BN(X W + b) = X (W * s) + (b * s + t)``: the MatMul's weight columns are scaled and the
bias is folded. When X is known to be a matrix (rank 2) and the bias fits Gemm's C (one row,
or M rows: C never enlarges the product as an Add's bias may), the MatMul becomes a Gemm
whose C holds the folded bias and takes over the Add: one node
(:func:`~bnfold.rules.base.becomes_gemm`). Otherwise the existing bias Add takes the folded
bias and the BN's output, so the pair stays one MatMul + one Add, which works for every rank.
As for a lone MatMul, the affine's channel axis must be the last axis of the Add's output (a
BN qualifies only at rank 2), and the MatMul's output must feed nothing but the Add.
"""

from __future__ import annotations

import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, describe, is_standard
from bnfold.rules.base import Absorbed, IntoProducer, becomes_gemm, channel_axis_refusal, gemm_takes_bias
from bnfold.rules.plan import Affine, FoldPlan, OpTypeUpdate, Refusal, Replaced, RuleSet
from bnfold.rules.weights import (
    cast_tensor,
    matmul_weight,
    require_float,
    scaled_weight,
)


def matmul_and_bias_slot(add: onnx.NodeProto, graph: GraphIndex) -> tuple[onnx.NodeProto, int] | None:
    """For ``Add(MatMul(...), constant)`` (either order): the MatMul and the constant's slot."""
    if add.op_type != "Add" or len(add.input) != 2 or not is_standard(add):
        return None
    constant_slots = [slot for slot, name in enumerate(add.input) if graph.constant_value(name) is not None]
    if len(constant_slots) != 1:
        return None
    bias_slot = constant_slots[0]
    matmul = graph.producer_of(add.input[1 - bias_slot])
    if matmul is None or matmul.op_type != "MatMul" or not is_standard(matmul):
        return None
    return matmul, bias_slot


class MatMulAddBn(IntoProducer):
    """``BN(Add(MatMul(X, W), b))`` → ``Gemm(X, W * s, b * s + t)`` for a matrix X, else
    ``Add(MatMul(X, W * s), b * s + t)``."""

    name = "matmul-add-bn"
    producer_ops = frozenset({"Add"})

    def plan(self, affine: Affine, graph: GraphIndex, rules: RuleSet) -> FoldPlan | Refusal | None:
        add = graph.producer_of(affine.input_name)
        if add is None or matmul_and_bias_slot(add, graph) is None:
            return None
        return super().plan(affine, graph, rules)

    def absorb(self, producer: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Absorbed | Refusal:
        found = matmul_and_bias_slot(producer, graph)
        if found is None:  # plan() matched this Add; only a changed graph gets here
            return Refusal(f"{describe(producer)} is not an Add of a MatMul and a constant")
        matmul, bias_slot = found
        other_uses = graph.other_uses(matmul.output[0], besides=producer)
        if other_uses:
            return Refusal(f"{describe(matmul)} output also feeds {', '.join(other_uses)}")
        weight = matmul_weight(graph, matmul, affine.channels, axis=1)
        if isinstance(weight, Refusal):
            return weight
        mismatch = channel_axis_refusal(affine, producer, axis=-1, rank=graph.rank_of(producer.output[0]))
        if mismatch:
            return mismatch
        bias = graph.constant_value(producer.input[bias_slot])
        if bias is None:
            return Refusal(f"{describe(producer)} bias is not a constant")
        not_float = require_float(bias, producer, "bias")
        if not_float:
            return not_float
        if bias.ndim > 0 and bias.shape[-1] not in (1, affine.channels):
            return Refusal(
                f"{describe(producer)} bias shape {list(bias.shape)} does not broadcast to {affine.channels}"
            )
        scaled = scaled_weight(matmul, 1, weight, fold_math.axis_factor(affine.s, 2, axis=1))
        if isinstance(scaled, Refusal):
            return scaled
        exact_bias = fold_math.fold_bias(bias, affine.s, affine.t, axis=-1)
        if becomes_gemm(graph, matmul, weight.dtype) and gemm_takes_bias(graph, matmul, bias):
            gemm_bias = cast_tensor(matmul, 2, exact_bias, bias.dtype, "bias")
            if isinstance(gemm_bias, Refusal):
                return gemm_bias
            return Absorbed(
                [scaled, gemm_bias], retyped=[OpTypeUpdate(matmul, "Gemm")], replaced=[Replaced(producer, matmul)],
                target=matmul,
                notes=[f"{describe(matmul)} becomes a Gemm whose C holds the bias of {describe(producer)}"],
            )
        folded_bias = cast_tensor(producer, bias_slot, exact_bias, bias.dtype, "bias")
        if isinstance(folded_bias, Refusal):
            return folded_bias
        return Absorbed([scaled, folded_bias])
