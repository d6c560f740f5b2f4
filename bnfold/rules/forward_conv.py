"""BatchNormalization → Conv: fold into the next Conv's weight and bias.

Conv weight is ``[M, C/group, k...]``; index j of axis 1 of output channel o's slice
is input channel ``group(o) * C/group + j``. With ``BN(x) = s * x + t`` on the input
channels, ``W'[o, j, k...] = W[o, j, k...] * s[c]`` and, when no output position sees
padding, ``b'[o] = b[o] + sum_{j,k} W[o, j, k] * t[c]``. Preconditions:

1. the BN normalizes axis 1, the Conv's input channels;
2. weight (and bias) are constant floats, the weight taking the BN's C channels;
3. no padding (all ``pads`` 0, ``auto_pad`` NOTSET or VALID): padded zeros are not
   shifted by ``t``, so near the border ``W t`` over-counts and the plain fold is not
   exact. This is refused by default. ``auto_pad`` SAME_UPPER / SAME_LOWER pads
   ``(ceil(n / stride) - 1) * stride + (k - 1) * dilation + 1 - n`` in total, which for a
   kernel of size 1 is at most ``0`` whatever ``n``, stride and dilation: a 1×1 SAME Conv
   never pads, so it folds even when the spatial sizes are symbolic.

With ``exact_padding`` (``--exact-padding``) and static spatial sizes, a padded Conv
is folded too: the weight is scaled as above, the bias is kept, and the shift's
exact contribution ``Conv(pad(t), W)`` — a ``[1, M, H_out, W_out]`` constant — is
added by a new Add node after the Conv. The notes give its size in bytes.
"""

from __future__ import annotations

import numpy as np
import onnx

from bnfold import fold_math
from bnfold.graph import GraphIndex, attributes, describe
from bnfold.rules.base import Absorbed, IntoConsumer
from bnfold.rules.plan import Affine, Refusal, RuleOptions
from bnfold.rules.weights import (
    added_bias,
    cast_tensor,
    constant_weight_and_bias,
    scaled_weight,
)


class BnConv(IntoConsumer):
    """``Conv(BN(x), W, b)`` → ``Conv(x, W * s, b + W t)`` (unpadded; padded with ``exact_padding``)."""

    name = "bn-conv"
    consumer_ops = frozenset({"Conv"})

    def absorb(
        self, conv: onnx.NodeProto, affine: Affine, graph: GraphIndex, options: RuleOptions
    ) -> Absorbed | Refusal:
        if affine.channel_axis != 1:
            return Refusal(
                f"the affine scales axis {affine.channel_axis}, not the input channels of {describe(conv)}"
            )
        found = constant_weight_and_bias(graph, conv, "weight", "bias")
        if isinstance(found, Refusal):
            return found
        weight, bias = found
        settings = attributes(conv)
        group = int(settings.get("group", 1))
        if weight.ndim < 3 or weight.shape[1] * group != affine.channels or weight.shape[0] % group:
            return Refusal(
                f"{describe(conv)} weight shape {list(weight.shape)} (group={group}) does not take "
                f"the BN's {affine.channels} channels"
            )
        out_channels, kernel = weight.shape[0], tuple(weight.shape[2:])
        if bias is not None and bias.shape != (out_channels,):
            return Refusal(f"{describe(conv)} bias shape {list(bias.shape)} is not [{out_channels}]")
        strides = list(settings.get("strides", [1] * len(kernel)))
        dilations = list(settings.get("dilations", [1] * len(kernel)))
        auto_pad = settings.get("auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        shape = graph.static_shape(affine.input_name)
        spatial = (
            None if shape is None or any(d is None for d in shape[2:]) else tuple(d for d in shape[2:] if d is not None)
        )
        pads: list[int] | None
        if auto_pad in ("SAME_UPPER", "SAME_LOWER") and all(k == 1 for k in kernel):
            pads = [0] * (2 * len(kernel))  # SAME never pads a kernel of size 1, whatever the sizes
        elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            pads = fold_math.same_padding(auto_pad, spatial, kernel, strides, dilations) if spatial else None
        else:
            no_pads = [0] * (2 * len(kernel))
            pads = no_pads if auto_pad == "VALID" else list(settings.get("pads", no_pads))

        new_weight = scaled_weight(conv, 1, weight, fold_math.conv_input_factor(affine.s, weight.shape, group))
        if isinstance(new_weight, Refusal):
            return new_weight
        if pads is not None and not any(pads):
            offset = fold_math.conv_offset(weight, affine.t, group)
            exact_bias = offset if bias is None else bias.astype(np.float64) + offset
            new_bias = cast_tensor(conv, 2, exact_bias, weight.dtype if bias is None else bias.dtype, "bias")
            return new_bias if isinstance(new_bias, Refusal) else Absorbed([new_weight, new_bias])
        if not options.exact_padding:
            return Refusal(
                f"{describe(conv)} pads its input: the padded zeros bypass the BN's shift, so the fold "
                "is not exact (--exact-padding adds a per-position bias instead)"
            )
        if spatial is None or pads is None:
            return Refusal(
                f"the BN input's spatial shape is unknown, so the padding correction for {describe(conv)} "
                "cannot be computed"
            )
        correction = fold_math.conv_of_padded_shift(
            weight, affine.t, group, spatial, tuple(pads), tuple(strides), tuple(dilations)
        )
        padding_bias = added_bias(conv, correction[np.newaxis], weight.dtype, "padding_bias")
        if isinstance(padding_bias, Refusal):
            return padding_bias
        return Absorbed(
            [new_weight],
            added_biases=[padding_bias],
            notes=[
                f"exact padding: added a {list(padding_bias.values.shape)} bias after {describe(conv)} "
                f"({padding_bias.values.nbytes} bytes)"
            ],
        )
