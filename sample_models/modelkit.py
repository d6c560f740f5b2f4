"""A small kit for writing ONNX test models with onnx.helper and seeded random weights.

Used by ``sample_models/generate.py``, the tests and the benchmarks, so that every
model the project ships or tests is built the same way, with no torch involved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DEFAULT_OPSET = 17
DEFAULT_IR_VERSION = 8


class GraphBuilder:
    """Accumulates inputs, initializers and nodes; names everything uniquely."""

    def __init__(self, seed: int = 0, dtype: type = np.float32) -> None:
        self.rng = np.random.default_rng(seed)
        self.dtype = np.dtype(dtype)
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.nodes: list[onnx.NodeProto] = []
        self._counts: dict[str, int] = {}

    @property
    def elem_type(self) -> int:
        return helper.np_dtype_to_tensor_dtype(self.dtype)

    def fresh(self, base: str) -> str:
        count = self._counts.get(base, 0)
        self._counts[base] = count + 1
        return f"{base}{count}"

    @contextlib.contextmanager
    def collecting(self) -> Iterator[tuple[list[onnx.NodeProto], list[onnx.TensorProto]]]:
        """Send the nodes and initializers added inside the block to two fresh lists,
        for a subgraph body; names stay unique across the model (one counter)."""
        saved = self.nodes, self.initializers
        self.nodes, self.initializers = [], []
        try:
            yield self.nodes, self.initializers
        finally:
            self.nodes, self.initializers = saved

    # -- graph boundary ---------------------------------------------------------------------

    def input(self, name: str, shape: Sequence[int | str | None], elem_type: int | None = None) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type or self.elem_type, shape))
        return name

    def output(self, name: str, shape: Sequence[int | str | None] | None = None) -> str:
        value = helper.make_tensor_value_info(name, self.elem_type, shape)
        self.outputs.append(value)
        return name

    # -- values -----------------------------------------------------------------------------

    def const(self, base: str, values: np.ndarray, *, as_node: bool = False) -> str:
        """Add a constant as an initializer, or as a Constant node when ``as_node``."""
        name = self.fresh(base)
        tensor = numpy_helper.from_array(np.asarray(values), name)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor, name=f"const_{name}"))
        else:
            self.initializers.append(tensor)
        return name

    def random(self, base: str, shape: Sequence[int], scale: float = 0.5, **kwargs: bool) -> str:
        values = (self.rng.standard_normal(shape) * scale).astype(self.dtype)
        return self.const(base, values, **kwargs)

    def node(self, op_type: str, inputs: Sequence[str], n_outputs: int = 1, **attributes: object) -> str:
        """Add a node named after its op; return its (first) output name."""
        name = self.fresh(op_type.lower())
        outputs = [f"{name}_out{i}" if i else f"{name}_out" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=name, **attributes))
        return outputs[0]

    # -- layers -----------------------------------------------------------------------------

    def _layer_inputs(
        self, x: str, weight_shape: list[int], fan_in: int, channels: int, bias: bool, bias_base: str = "b"
    ) -> list[str]:
        """``[x, W]`` or ``[x, W, b]``: weights scaled by 1/sqrt(fan-in), so that deep
        test stacks keep their activations near unit size."""
        weight = self.random("W", weight_shape, scale=1.0 / np.sqrt(fan_in))
        return [x, weight] + ([self.random(bias_base, [channels], scale=0.1)] if bias else [])

    def conv(
        self,
        x: str,
        c_in: int,
        c_out: int,
        kernel: Sequence[int] = (3, 3),
        *,
        group: int = 1,
        bias: bool = True,
        **attributes: object,
    ) -> str:
        inputs = self._layer_inputs(x, [c_out, c_in // group, *kernel], c_in * int(np.prod(kernel)), c_out, bias)
        if "pads" not in attributes and "auto_pad" not in attributes:
            attributes["pads"] = [k // 2 for k in kernel] * 2
        return self.node("Conv", inputs, group=group, **attributes)

    def conv_transpose(
        self,
        x: str,
        c_in: int,
        c_out: int,
        kernel: Sequence[int] = (3, 3),
        *,
        group: int = 1,
        bias: bool = True,
        **attributes: object,
    ) -> str:
        """A ConvTranspose; its weight is ``[c_in, c_out / group, *kernel]``."""
        inputs = self._layer_inputs(x, [c_in, c_out // group, *kernel], c_in * int(np.prod(kernel)), c_out, bias)
        return self.node("ConvTranspose", inputs, group=group, **attributes)

    def gemm(self, x: str, k: int, n: int, *, trans_b: int = 1, bias: bool = True, **attributes: object) -> str:
        inputs = self._layer_inputs(x, [n, k] if trans_b else [k, n], k, n, bias, bias_base="c")
        return self.node("Gemm", inputs, transB=trans_b, **attributes)

    def batchnorm_parameters(self, channels: int, **kwargs: bool) -> list[str]:
        """Realistic running statistics: scale ~ U(0.5, 1.5), var ~ U(0.5, 2)."""
        rng = self.rng
        values = [
            rng.uniform(0.5, 1.5, channels),
            rng.normal(0.0, 0.5, channels),
            rng.normal(0.0, 0.5, channels),
            rng.uniform(0.5, 2.0, channels),
        ]
        return [self.const(base, v.astype(self.dtype), **kwargs) for base, v in zip(("gamma", "beta", "mean", "var"), values)]

    def batchnorm(self, x: str, channels: int, *, epsilon: float = 1e-5, **attributes: object) -> str:
        as_node = bool(attributes.pop("constant_nodes", False))
        parameters = self.batchnorm_parameters(channels, as_node=as_node)
        return self.node("BatchNormalization", [x, *parameters], epsilon=epsilon, **attributes)

    # -- result -----------------------------------------------------------------------------

    def model(
        self, name: str = "bnfold_sample", *, opset: int = DEFAULT_OPSET, ir_version: int = DEFAULT_IR_VERSION
    ) -> onnx.ModelProto:
        inputs = list(self.inputs)
        if ir_version < 4:
            # Before IR 4 every initializer must also be declared as a graph input.
            inputs += [
                helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
                for tensor in self.initializers
            ]
        graph = helper.make_graph(self.nodes, name, inputs, self.outputs, self.initializers)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version,
            producer_name="bnfold-modelkit",
        )
        # Outputs declared without a shape get the inferred one (the checker wants a shape).
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        onnx.checker.check_model(model, full_check=True)
        return model


__all__ = ["GraphBuilder", "TensorProto", "DEFAULT_OPSET", "DEFAULT_IR_VERSION"]
