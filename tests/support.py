"""Shared test helpers: fold a model in memory and prove it equivalent through onnxruntime;
run the CLI in-process and check its one-line errors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner, Result
from onnx import helper, numpy_helper

from bnfold.cli import main
from bnfold.fold import FoldOutcome, fold_batchnorms
from bnfold.inputs import generate_inputs, input_specs
from bnfold.options import default_tolerance
from bnfold.rules import RULES, RuleSet


def run_cli(*args: object, env: dict[str, str] | None = None) -> Result:
    """``bnfold ARGS...`` in this process (stdout and stderr kept apart)."""
    return CliRunner().invoke(main, [str(arg) for arg in args], env=env)


def assert_one_line_error(result: Result, exit_code: int, *fragments: str) -> None:
    """The CLI failed the documented way: the exit code, one ``bnfold: error: ...`` line on
    stderr containing every fragment, and no traceback anywhere."""
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), result.stderr
    assert all(fragment in lines[0] for fragment in fragments), (fragments, lines[0])
    assert "Traceback" not in result.output and not isinstance(result.exception, AssertionError)


def onnxruntime_session(model: onnx.ModelProto) -> ort.InferenceSession:
    """A session with every onnxruntime graph optimization disabled (no built-in BN fusion)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a model with every onnxruntime graph optimization disabled (no built-in BN fusion)."""
    return onnxruntime_session(model).run(None, feeds)


def op_count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(node.op_type == op_type for node in model.graph.node)


@dataclass
class FoldCheck:
    original: onnx.ModelProto
    folded: onnx.ModelProto
    outcome: FoldOutcome
    max_abs_error: float


def fold_and_compare(
    model: onnx.ModelProto,
    *,
    seed: int = 0,
    shapes: dict[str, tuple[int, ...]] | None = None,
    tolerance: tuple[float, float] | None = None,
    atol_scales_with_output: bool = False,
    rules: RuleSet = RULES,
    input_variants: Sequence[dict[str, np.ndarray]] = ({},),
) -> FoldCheck:
    """Fold a copy of ``model``; assert the checker passes and every output matches in onnxruntime.

    ``atol_scales_with_output`` multiplies atol by the output's largest magnitude (at
    least 1): in half precision the rounding error of every element is proportional to
    the magnitudes summed into it, which a fixed atol ignores for wide-range outputs.
    The models are compared once per ``input_variants`` entry, whose values replace
    generated ones (an If's condition forced each way, so that both branches run).
    """
    original = onnx.ModelProto()
    original.CopyFrom(model)
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    outcome = fold_batchnorms(folded, rules)
    onnx.checker.check_model(folded, full_check=True)
    generated = generate_inputs(input_specs(original, shapes or {}), seed)
    sessions = onnxruntime_session(original), onnxruntime_session(folded)
    worst = 0.0
    for variant in input_variants:
        feeds = {**generated, **variant}
        worst = max(worst, _largest_difference(*sessions, feeds, tolerance, atol_scales_with_output))
    return FoldCheck(original, folded, outcome, worst)


def _largest_difference(original: ort.InferenceSession, folded: ort.InferenceSession,
                        feeds: dict[str, np.ndarray], tolerance: tuple[float, float] | None,
                        atol_scales_with_output: bool) -> float:
    """Assert every output of the two models matches on ``feeds``; the largest |Δ| over finite elements."""
    expected = original.run(None, feeds)
    actual = folded.run(None, feeds)
    worst = 0.0
    for reference, candidate in zip(expected, actual, strict=True):
        assert reference.shape == candidate.shape and reference.dtype == candidate.dtype
        atol, rtol = tolerance or default_tolerance(reference.dtype)
        finite = reference[np.isfinite(reference)]
        if atol_scales_with_output and finite.size:
            atol *= max(1.0, float(np.max(np.abs(finite.astype(np.float64)))))
        np.testing.assert_allclose(candidate.astype(np.float64), reference.astype(np.float64), atol=atol, rtol=rtol)
        both_finite = np.isfinite(reference) & np.isfinite(candidate)
        if both_finite.any():
            difference = candidate.astype(np.float64)[both_finite] - reference.astype(np.float64)[both_finite]
            worst = max(worst, float(np.max(np.abs(difference))))
    return worst


def write_model_onnxruntime_cannot_run(path: Path) -> Path:
    """A valid ONNX model whose only op lives in a domain onnxruntime does not know."""
    graph = helper.make_graph(
        [helper.make_node("Mystery", ["x"], ["y"], domain="org.example.bnfold")], "unrunnable",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("org.example.bnfold", 1)], ir_version=8
    )
    onnx.save(model, str(path))
    return path


def shift_first_weight(path: Path, delta: float) -> None:
    """Add ``delta`` to the weights of the model's first Conv or Gemm, in place: the same
    model retrained (names, shapes and graph unchanged, outputs different)."""
    model = onnx.load(str(path))
    layer = next(node for node in model.graph.node if node.op_type in ("Conv", "Gemm"))
    tensor = next(t for t in model.graph.initializer if t.name == layer.input[1])
    values = numpy_helper.to_array(tensor)
    tensor.CopyFrom(numpy_helper.from_array(values + np.asarray(delta, dtype=values.dtype), tensor.name))
    onnx.save(model, str(path))
