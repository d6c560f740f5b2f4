"""Reading a BatchNormalization node and the preconditions every fold shares.

A BN can only be folded when it is a fixed affine map at inference time:

1. not in training mode, where it normalizes with batch statistics: opset 14+ says so with
   ``training_mode=1``; opsets 7 to 13 by declaring the optional statistics outputs (five
   outputs mean training, one means test, whether or not anything reads them); opset < 7
   with ``is_test=0``, which is the default there;
2. at opset 7/8 with ``spatial=0`` (statistics per element, parameters shaped
   ``[C, D1, ...]``), the resulting ``s`` and ``t`` are constant within each channel,
   so they are per-channel after all (always true for ``[C]`` parameters, e.g. a BN
   after Gemm whose output is ``[N, C]``);
3. its running-statistics outputs (opset 14+, training mode only) are not read;
4. scale, bias, mean and var are constants of one length C (``spatial=0``: of one shape);
5. every parameter is finite and ``var + epsilon > 0``, so ``s = scale / sqrt(var + eps)``
   is finite.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, attribute, is_standard
from bnfold.rules.plan import Affine, Refusal
from bnfold.rules.weights import constant_input

PARAMETER_ROLES = ("scale", "bias", "mean", "var")


def is_batchnorm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and is_standard(node)


def read_batchnorm(node: onnx.NodeProto, graph: GraphIndex) -> Affine | Refusal | None:
    """Check the BN-level preconditions and return the BN as ``s * x + t``.

    None for any node that is not a standard-domain BatchNormalization.
    """
    if not is_batchnorm(node):
        return None
    opset = graph.default_opset()
    if opset >= 14 and attribute(node, "training_mode", 0):
        return Refusal("BN in training mode (training_mode=1)")
    if 7 <= opset < 14 and any(node.output[1:]):
        return Refusal(
            f"BN in training mode (at opset {opset} its statistics outputs are declared, which means training)"
        )
    if opset < 7 and not attribute(node, "is_test", 0):
        return Refusal("BN in training mode (is_test=0)")
    per_element = opset < 9 and not attribute(node, "spatial", 1)
    used_statistics = [name for name in node.output[1:] if name and graph.use_count(name)]
    if used_statistics:
        return Refusal(f"BN running-statistics output '{used_statistics[0]}' is used")
    if len(node.input) < 5:
        return Refusal(f"BN has {len(node.input)} inputs, expected 5")

    parameters: dict[str, np.ndarray] = {}
    for slot, role in enumerate(PARAMETER_ROLES, start=1):
        value = constant_input(graph, node, slot, role)
        if value is None:
            return Refusal(f"BN {role} input is empty")
        if isinstance(value, Refusal):
            return value
        parameters[role] = value

    shapes = {value.shape for value in parameters.values()}
    (shape,) = shapes if len(shapes) == 1 else (None,)
    if shape is None or len(shape) == 0 or (len(shape) != 1 and not per_element):
        listed = ", ".join(f"{role} {list(value.shape)}" for role, value in parameters.items())
        return Refusal(f"BN parameters are not vectors of one length ({listed})")
    for role, value in parameters.items():
        as_float = value.astype(np.float64)
        if not np.all(np.isfinite(as_float)):
            return Refusal(f"BN {role} contains NaN or Inf")

    epsilon = float(attribute(node, "epsilon", 1e-5))
    denominator = parameters["var"].astype(np.float64) + epsilon
    if np.any(denominator <= 0):
        channel = int(np.argwhere(denominator <= 0)[0][0])
        return Refusal(f"BN var + epsilon <= 0 at channel {channel}")
    s, t = fold_math.batchnorm_affine(
        parameters["scale"], parameters["bias"], parameters["mean"], parameters["var"], epsilon
    )
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(t))):
        return Refusal("BN scale / sqrt(var + epsilon) is not finite")
    if s.ndim > 1:
        per_channel = fold_math.per_channel_affine(s, t)
        if per_channel is None:
            return Refusal(
                f"BN with spatial=0 has statistics that vary within a channel (parameters shaped "
                f"{list(s.shape)}); only per-channel statistics fold into weights"
            )
        s, t = per_channel
    return Affine(nodes=(node,), input_name=node.input[0], output_name=node.output[0], s=s, t=t)
