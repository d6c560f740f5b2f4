"""What a model says about the sizes of its inputs' symbolic spatial dims.

bnfold generates verification inputs, and a symbolic dim the user does not give is a guess.
1 works for most models, but not for detectors and decoders that downsample by strides and
upsample again (Resize, or a strided ConvTranspose) to join the maps back together: a map rounded
up to 1×1 is upsampled to 2×2 and joined to another 1×1 map, and onnxruntime refuses to run
(PaddleOCR's DB detectors, Ultralytics YOLO, UNets). Such models run on sizes the model itself
hints at, looked for in this order:

1. the graph's ``value_info`` declaring the input with those dims fixed;
2. the model's metadata: Ultralytics writes ``imgsz`` (``[320, 320]``), the size it was trained
   and exported for;
3. the graph: the largest factor by which strided Conv / pooling nodes shrink the input on any
   path (ConvTranspose and Resize scales grow it back, and maps joined together take the finer
   one's factor), when the model upsamples at all: sizes that are multiples of it keep every map
   at least 1 and every upsampled map the size of the one it joins.

Each hint is for the spatial axes of an ``[N, C, D1, ...]`` input (axes 2 and on).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.graph import GraphIndex, attribute, is_standard

STRIDED = frozenset({"Conv", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool"})
UPSAMPLING = frozenset({"Resize", "Upsample"})
LARGEST_SIDE = 4096
"""A hint above this is no hint: generated inputs that large would cost more than they tell."""


@dataclass(frozen=True)
class SizeHint:
    """Sizes for an input's spatial axes (axes 2 and on), and where they come from."""

    sizes: tuple[int, ...]
    reason: str


def declared_elsewhere(model: onnx.ModelProto, name: str, rank: int) -> SizeHint | None:
    """The input's spatial sizes when the graph's value_info declares them fixed."""
    for value in model.graph.value_info:
        dims = value.type.tensor_type.shape.dim if value.name == name else ()
        if len(dims) == rank and all(dim.dim_value > 0 for dim in dims[2:]):
            return SizeHint(tuple(dim.dim_value for dim in dims[2:]), "declared in the graph's value_info")
    return None


def metadata_size(model: onnx.ModelProto, rank: int) -> SizeHint | None:
    """Ultralytics' ``imgsz`` metadata (``[320, 320]``, or one number for a square image)."""
    text = next((prop.value for prop in model.metadata_props if prop.key == "imgsz"), None)
    if text is None:
        return None
    numbers = [int(number) for number in re.findall(r"\d+", text)]
    if len(numbers) == 1:
        numbers *= rank - 2
    if len(numbers) != rank - 2 or not all(0 < number <= LARGEST_SIDE for number in numbers):
        return None
    return SizeHint(tuple(numbers), f"imgsz '{text}' in the model's metadata")


def _upsampling_scales(node: onnx.NodeProto, graph: GraphIndex) -> np.ndarray | None:
    """A Resize's or Upsample's constant scales (None when it is given sizes, or computes them)."""
    if node.op_type == "Upsample" and attribute(node, "scales") is not None:
        return np.asarray(attribute(node, "scales"), np.float64)
    slot = 2 if node.op_type == "Resize" and graph.default_opset() >= 11 else 1
    if len(node.input) <= slot or not node.input[slot]:
        return None
    try:
        scales = graph.constant_value(node.input[slot])
    except Exception:  # noqa: BLE001 - a value that cannot be read is no hint
        return None
    return None if scales is None or scales.size == 0 else scales.astype(np.float64).reshape(-1)


def _upsamples(node: onnx.NodeProto) -> bool:
    """A Resize or Upsample, or a ConvTranspose with a stride above 1."""
    if not is_standard(node):
        return False
    if node.op_type == "ConvTranspose":
        return any(stride > 1 for stride in attribute(node, "strides", []))
    return node.op_type in UPSAMPLING


def downsampling(model: onnx.ModelProto, name: str, rank: int) -> SizeHint | None:
    """Multiples of the largest factor by which the model shrinks input ``name`` (spatial axes),
    for a model that upsamples somewhere; None when it never upsamples or never shrinks."""
    if not any(_upsamples(node) for node in model.graph.node):
        return None
    graph = GraphIndex(model)
    spatial = rank - 2
    factors: dict[str, np.ndarray] = {name: np.ones(spatial)}
    largest = np.ones(spatial)
    for node in graph.nodes:
        known = [factors[value] for value in node.input if value in factors]
        if not known or not is_standard(node):
            continue
        # Maps joined together (Add, Concat) have one size: an upsampled map takes the size of
        # the finer map it joins, whatever a Resize to computed sizes did before.
        factor = np.min(known, axis=0)
        if node.op_type in STRIDED | {"ConvTranspose"}:
            strides = np.asarray(attribute(node, "strides", [1] * spatial), np.float64)
            if strides.shape == (spatial,):
                factor = factor * strides if node.op_type in STRIDED else factor / strides
        elif node.op_type in UPSAMPLING:
            scales = _upsampling_scales(node, graph)
            if scales is not None and scales.shape == (rank,) and np.all(scales[2:] > 0):
                factor = factor / scales[2:]
        for output in node.output:
            factors[output] = factor
        largest = np.maximum(largest, factor)
    multiples = tuple(math.ceil(value - 1e-9) for value in largest)
    if max(multiples) <= 1 or max(multiples) > LARGEST_SIDE:
        return None
    shown = "×".join(map(str, dict.fromkeys(multiples)))
    return SizeHint(multiples, f"multiples of {shown}: strided layers shrink it by {shown} before it is "
                               "upsampled again")


def spatial_hint(model: onnx.ModelProto, name: str, rank: int) -> SizeHint | None:
    """The sizes the model hints at for input ``name``'s spatial axes, or None (see the module)."""
    if rank < 3:
        return None
    return declared_elsewhere(model, name, rank) or metadata_size(model, rank) or downsampling(model, name, rank)
