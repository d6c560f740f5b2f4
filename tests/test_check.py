"""``bnfold check ORIGINAL FOLDED`` through Click: the exit codes CI relies on, and what is reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from bnfold.fold import fold_batchnorms
from bnfold.verify import compare_output
from sample_models.generate import cnn_residual
from sample_models.modelkit import GraphBuilder
from tests.support import assert_one_line_error, run_cli, write_model_onnxruntime_cannot_run


def _assert_one_line_error(result, code: int, message: str) -> None:  # noqa: ANN001
    assert result.exit_code == code
    assert result.stderr == f"bnfold: error: {message}\n"
    assert "Traceback" not in result.output
    assert result.stdout == ""


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """The sample CNN and its bnfold-folded twin."""
    model = cnn_residual()
    original = tmp_path / "original.onnx"
    onnx.save(model, original)
    fold_batchnorms(model)
    folded = tmp_path / "folded.onnx"
    onnx.save(model, folded)
    return original, folded


def _perturbed(original: Path, folder: Path, delta: float) -> Path:
    """The original with one Gemm weight element moved by ``delta`` (as a bad third-party fold would)."""
    model = onnx.load(original)
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    tensor = next(t for t in model.graph.initializer if t.name == gemm.input[1])
    values = numpy_helper.to_array(tensor).copy()
    values.flat[0] += delta
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    path = folder / "perturbed.onnx"
    onnx.save(model, path)
    return path


def test_equivalent_models_exit_0(pair: tuple[Path, Path]) -> None:
    original, folded = pair
    result = run_cli("check", str(original), str(folded), "--trials", "2", "--batch", "3")
    assert result.exit_code == 0, result.output
    assert "equivalent" in result.stdout and "image float32[3,3,32,32]" in result.stdout
    assert "seeds 0..1" in result.stdout


def test_one_perturbed_weight_exits_1_and_names_the_output(pair: tuple[Path, Path], tmp_path: Path) -> None:
    original, _ = pair
    result = run_cli("check", str(original), str(_perturbed(original, tmp_path, 0.5)), "--json", "-")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert document["schema"] == "bnfold.check/1" and document["status"] == "not-equivalent"
    [output] = document["verification"]["outputs"]
    assert output["name"] == "batchnormalization5_out" and not output["passed"]
    assert output["mismatches"] > 0 and output["max_abs_error"] > 1e-3


def test_per_output_tolerance_overrides_the_default(pair: tuple[Path, Path], tmp_path: Path) -> None:
    original, _ = pair
    perturbed = str(_perturbed(original, tmp_path, 0.05))
    assert run_cli("check", str(original), perturbed).exit_code == 1
    result = run_cli("check", str(original), perturbed, "--tol", "batchnormalization5_out:10,0", "--json", "-")
    assert result.exit_code == 0
    [output] = json.loads(result.stdout)["verification"]["outputs"]
    assert (output["atol"], output["rtol"]) == (10.0, 0.0)
    # --atol alone keeps the float32 default rtol.
    [output] = json.loads(run_cli("check", str(original), perturbed, "--atol", "5", "--json", "-").stdout)[
        "verification"]["outputs"]
    assert (output["atol"], output["rtol"]) == (5.0, 1e-3)


def test_check_never_writes(pair: tuple[Path, Path]) -> None:
    original, folded = pair
    before = sorted(p.name for p in original.parent.iterdir())
    assert run_cli("check", str(original), str(folded)).exit_code == 0
    assert sorted(p.name for p in original.parent.iterdir()) == before


def test_missing_file_exits_2(pair: tuple[Path, Path], tmp_path: Path) -> None:
    original, _ = pair
    missing = tmp_path / "nope.onnx"
    _assert_one_line_error(run_cli("check", str(original), str(missing)), 2, f"{missing}: no such file")


def test_unknown_provider_exits_2(pair: tuple[Path, Path]) -> None:
    original, folded = pair
    offered = ", ".join(ort.get_available_providers())
    _assert_one_line_error(
        run_cli("check", str(original), str(folded), "--provider", "MadeUpExecutionProvider"),
        2,
        f"--provider MadeUpExecutionProvider is not available; this onnxruntime offers {offered}",
    )


def test_unknown_input_shape_name_exits_2(pair: tuple[Path, Path]) -> None:
    original, folded = pair
    _assert_one_line_error(
        run_cli("check", str(original), str(folded), "--input-shape", "pixels:1,3,32,32"),
        2,
        "--input-shape names no model input: pixels",
    )


def test_bad_tol_syntax_is_a_usage_error(pair: tuple[Path, Path]) -> None:
    original, folded = pair
    result = run_cli("check", str(original), str(folded), "--tol", "out:1e-3")
    assert result.exit_code == 2
    assert "'out:1e-3' is not NAME:ATOL,RTOL with non-negative numbers" in result.stderr


def test_model_onnxruntime_cannot_run_exits_3_with_its_message(tmp_path: Path) -> None:
    path = write_model_onnxruntime_cannot_run(tmp_path / "unrunnable.onnx")
    assert_one_line_error(run_cli("check", str(path), str(path)), 3,
                          "bnfold: error: onnxruntime cannot load the original model: ", "Mystery")


def test_folded_model_onnxruntime_cannot_run_exits_3(pair: tuple[Path, Path], tmp_path: Path) -> None:
    b = GraphBuilder()
    b.output(b.node("Relu", [b.input("x", [2])]))
    runnable = tmp_path / "relu.onnx"
    onnx.save(b.model(), runnable)
    result = run_cli("check", str(runnable), str(write_model_onnxruntime_cannot_run(tmp_path / "unrunnable.onnx")))
    assert result.exit_code == 3
    assert result.stderr.startswith("bnfold: error: onnxruntime cannot load the folded model: ")


def test_output_shape_difference_fails(tmp_path: Path) -> None:
    def model(shape: list[int]) -> onnx.ModelProto:
        b = GraphBuilder()
        b.output(b.node("Reshape", [b.input("x", [2, 3]), b.const("shape", np.array(shape, dtype=np.int64))]))
        return b.model()

    onnx.save(model([6]), tmp_path / "a.onnx")
    onnx.save(model([3, 2]), tmp_path / "b.onnx")
    result = run_cli("check", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--json", "-")
    assert result.exit_code == 1
    [output] = json.loads(result.stdout)["verification"]["outputs"]
    assert output["problem"] == "folded output is float32[3, 2], original is float32[6]"


def test_nan_on_one_side_is_always_a_failure() -> None:
    original = np.array([1.0, np.nan, np.inf], dtype=np.float32)
    same = compare_output("y", original, original.copy(), (1e9, 1e9))
    assert same.passed and same.mismatches == 0
    broken = compare_output("y", original, np.array([1.0, 2.0, np.inf], dtype=np.float32), (1e9, 1e9))
    assert not broken.passed and broken.nonfinite_mismatch
    assert broken.mismatches == 1 and broken.worst_index == (1,)


def test_string_outputs_must_be_equal() -> None:
    """onnxruntime returns str, a TensorProto gives bytes: the same text is equal."""
    expected = np.array([b"monday", b"tuesday"], dtype=object)
    assert compare_output("day", expected, np.array(["monday", "tuesday"], dtype=object), (0.0, 0.0)).passed
    different = compare_output("day", expected, np.array(["monday", "friday"], dtype=object), (0.0, 0.0))
    assert (different.mismatches, different.worst_index, different.max_abs_error) == (1, (1,), float("inf"))


def test_help_documents_exit_codes_and_tolerance_defaults() -> None:
    text = run_cli("check", "--help").stdout
    assert "3  onnxruntime cannot load or run a given model" in text
    assert "float32 0.0001/0.001" in text and "--tol NAME:ATOL,RTOL" in text


def test_models_with_different_inputs_are_a_usage_error() -> None:
    samples = Path(__file__).resolve().parent.parent / "sample_models"
    original, other = samples / "cnn_residual.onnx", samples / "mlp_gemm_bn.onnx"
    result = run_cli("check", str(original), str(other))
    assert result.exit_code == 2
    assert result.stderr == (
        f"bnfold: error: {other}: its inputs (features) are not those of {original} (image)\n"
    )


def _relu_model(path: Path, shape: list[int | str], element_type: int = onnx.TensorProto.FLOAT) -> Path:
    b = GraphBuilder(seed=0, dtype=onnx.helper.tensor_dtype_to_np_dtype(element_type).type)
    b.output(b.node("Relu", [b.input("x", shape)]))
    onnx.save(b.model(), str(path))
    return path


@pytest.mark.parametrize(("shape", "element_type", "said"), [
    ([1, 5], onnx.TensorProto.FLOAT, "float32[1, 5]"),
    ([1, 4], onnx.TensorProto.DOUBLE, "float64[1, 4]"),
    ([1, 4, 1], onnx.TensorProto.FLOAT, "float32[1, 4, 1]"),
])
def test_inputs_of_another_type_or_fixed_size_are_a_usage_error(tmp_path: Path, shape: list[int | str],
                                                                 element_type: int, said: str) -> None:
    """Two models fed different inputs are not two versions of one model: exit 2 saying how
    they differ, not onnxruntime's complaint about the data (exit 3). Symbolic dims agree with any."""
    original = _relu_model(tmp_path / "a.onnx", [1, 4])
    other = _relu_model(tmp_path / "b.onnx", shape, element_type)
    assert_one_line_error(run_cli("check", original, other), 2, "its input 'x' is " + said, "takes float32[1, 4]")
    assert run_cli("check", original, _relu_model(tmp_path / "c.onnx", ["N", 4])).exit_code == 0
