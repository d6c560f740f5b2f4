"""Judging bnfold on hostile-but-valid models without trusting bnfold's own verification.

The judge feeds both models its own inputs (numpy, symbolic dims set to a size other than 1,
every If condition taken both ways when asked), runs them in onnxruntime with graph
optimizations off, compares every output at the dtype's default tolerance, and runs
``onnx.checker`` with ``full_check`` on what bnfold wrote.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from bnfold.fold import FoldOutcome, fold_batchnorms
from bnfold.options import default_tolerance

SYMBOLIC_SIZE = 3
"""What the judge gives every symbolic dim: not 1, so a broadcast over a size-1 axis shows."""


def judge_feeds(
    model: onnx.ModelProto, seed: int, *, symbolic: int = SYMBOLIC_SIZE,
    shapes: dict[str, Sequence[int]] | None = None, fixed: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs for every runtime input of ``model``: floats N(0, 1), integers in [0, 4),
    booleans and anything in ``fixed`` as given; symbolic dims ``symbolic`` unless ``shapes``
    names the input."""
    rng = np.random.default_rng(seed)
    initializers = {tensor.name for tensor in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if fixed and value.name in fixed:
            feeds[value.name] = fixed[value.name]
            continue
        tensor_type = value.type.tensor_type
        shape = tuple((shapes or {}).get(value.name) or (
            dim.dim_value if dim.HasField("dim_value") else symbolic for dim in tensor_type.shape.dim
        ))
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        if dtype.kind == "f":
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[value.name] = np.asarray(rng.random(shape) < 0.5)
        else:
            feeds[value.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def conditions(names: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
    """Every combination of True/False for the boolean inputs ``names``: each branch runs."""
    for values in itertools.product((False, True), repeat=len(names)):
        yield {name: np.array(value) for name, value in zip(names, values)}


def run_onnxruntime(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of a model (in memory, or a file with its external data) with every graph
    optimization disabled, so that onnxruntime's own BN fusion cannot hide anything."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_same_function(
    original: onnx.ModelProto | Path, folded: onnx.ModelProto | Path, feed_sets: Iterable[dict[str, np.ndarray]]
) -> None:
    """Both models give the same outputs (dtype default tolerance) on every feed set."""
    count = 0
    for feeds in feed_sets:
        expected = run_onnxruntime(original, feeds)
        actual = run_onnxruntime(folded, feeds)
        assert len(expected) == len(actual)
        for reference, candidate in zip(expected, actual):
            assert reference.shape == candidate.shape and reference.dtype == candidate.dtype
            atol, rtol = default_tolerance(reference.dtype)
            np.testing.assert_allclose(
                candidate.astype(np.float64), reference.astype(np.float64), atol=atol, rtol=rtol
            )
        count += 1
    assert count, "no feeds: nothing was compared"


def fold_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldOutcome]:
    """Fold a copy of ``model`` in memory; the copy must pass the full checker."""
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    outcome = fold_batchnorms(folded)
    onnx.checker.check_model(folded, full_check=True)
    return folded, outcome


def graphs_of(model: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph and every body nested in it, at any depth."""
    pending = [model.graph]
    while pending:
        graph = pending.pop()
        yield graph
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    pending.append(attribute.g)
                pending.extend(attribute.graphs)


def all_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes of every graph, body and model-local function."""
    nodes = [node for graph in graphs_of(model) for node in graph.node]
    return nodes + [node for function in model.functions for node in function.node]


def count_ops(model: onnx.ModelProto, op_type: str) -> int:
    """How many ``op_type`` nodes the model has anywhere (bodies and functions included)."""
    return sum(node.op_type == op_type for node in all_nodes(model))


def model_of(
    nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto], *, opset: int, ir_version: int, infer: bool = True,
) -> onnx.ModelProto:
    """A model from parts, checked; with ``infer`` its value_info filled by shape inference
    (``infer=False`` leaves values inside bodies without declared shapes, as many exporters do)."""
    if ir_version < 4:
        declared = {value.name for value in inputs}
        inputs = inputs + [
            helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            for tensor in initializers if tensor.name not in declared
        ]
    model = helper.make_model(
        helper.make_graph(nodes, "hostile", inputs, outputs, initializers),
        opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version,
    )
    if infer:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def ir_version_for(opset: int) -> int:
    """The IR version that came with an opset (3 for 7-8, 4 for 9, 5 for 10, ... 8 for 14-15)."""
    return {7: 3, 8: 3, 9: 4, 10: 5, 11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8}.get(opset, 9)
