"""Verification inputs: generated trials and batch sizes, real inputs from .npz and ONNX test-data folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bnfold.inputs import generate_inputs, guess_sizes, input_specs
from bnfold.pipeline import FoldOptions, VerifyOptions, check_files, fold_file
from sample_models.generate import cnn_residual
from sample_models.modelkit import GraphBuilder
from tests.support import run_cli, run_onnxruntime


def _assert_one_line_error(result, message: str) -> None:  # noqa: ANN001
    assert result.exit_code == 2
    assert result.stderr == f"bnfold: error: {message}\n"
    assert "Traceback" not in result.output


@pytest.fixture
def cnn(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(cnn_residual(), path)
    return path


def _image(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)


def _write_tensor(path: Path, values: np.ndarray, name: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(numpy_helper.from_array(values, name).SerializeToString())


def _reference_outputs(model_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return run_onnxruntime(onnx.load(model_path), feeds)


# -- generated inputs ----------------------------------------------------------------------------


def _clip_pair(folder: Path) -> tuple[Path, Path]:
    """Identity vs Clip(-3, 3): equal unless some generated value has |x| > 3."""
    def model(op: str, *bounds: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            [helper.make_node(op, ["x", *bounds], ["y"])], op,
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8])],
            [numpy_helper.from_array(np.float32(-3), "lo"), numpy_helper.from_array(np.float32(3), "hi")],
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)

    onnx.save(model("Identity"), folder / "identity.onnx")
    onnx.save(model("Clip", "lo", "hi"), folder / "clip.onnx")
    return folder / "identity.onnx", folder / "clip.onnx"


def test_trials_report_the_worst_seed(tmp_path: Path) -> None:
    identity, clip = _clip_pair(tmp_path)
    options = VerifyOptions(seed=5, trials=40, batch=2)
    report = check_files(identity, clip, options)
    specs = input_specs(onnx.load(identity), {}, batch=2)
    excess = {seed: float(np.max(np.abs(generate_inputs(specs, seed)["x"])) - 3) for seed in range(5, 45)}
    worst_seed = max(excess, key=excess.get)
    assert excess[worst_seed] > 0, "some seed must exceed the clip for this test to mean anything"
    [output] = report.verification.outputs
    assert output.trial == f"seed {worst_seed}"
    assert output.max_abs_error == pytest.approx(excess[worst_seed], rel=1e-6)
    assert report.exit_code == 1
    assert [t.seed for t in report.verification.trials] == list(range(5, 45))


def test_single_trial_can_miss_what_trials_find(tmp_path: Path) -> None:
    identity, clip = _clip_pair(tmp_path)
    specs = input_specs(onnx.load(identity), {})
    quiet_seed = next(s for s in range(100) if np.max(np.abs(generate_inputs(specs, s)["x"])) < 3)
    assert check_files(identity, clip, VerifyOptions(seed=quiet_seed)).exit_code == 0
    assert check_files(identity, clip, VerifyOptions(seed=quiet_seed, trials=60)).exit_code == 1


def test_batch_sets_symbolic_first_dims_and_input_shape_wins(cnn: Path) -> None:
    result = run_cli("check", str(cnn), str(cnn), "--batch", "4", "--json", "-")
    assert result.exit_code == 0
    [trial] = json.loads(result.stdout)["verification"]["trials"]
    assert trial["inputs"] == [{"name": "image", "shape": [4, 3, 32, 32], "dtype": "float32"}]
    result = run_cli("check", str(cnn), str(cnn), "--batch", "4", "--input-shape", "image:2,3,32,32", "--json", "-")
    assert json.loads(result.stdout)["verification"]["trials"][0]["inputs"][0]["shape"] == [2, 3, 32, 32]


def test_input_shape_with_wrong_rank_exits_2(cnn: Path) -> None:
    _assert_one_line_error(
        run_cli("check", str(cnn), str(cnn), "--input-shape", "image:1,3,32"),
        "--input-shape image: rank 3 but the model declares rank 4",
    )


def test_generated_inputs_per_dtype() -> None:
    kinds = (("f", onnx.TensorProto.FLOAT16), ("i", onnx.TensorProto.INT64), ("b", onnx.TensorProto.BOOL))
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], [f"{name}_out"]) for name, _ in kinds], "dtypes",
        [helper.make_tensor_value_info(name, elem, [1000]) for name, elem in kinds],
        [helper.make_tensor_value_info(f"{name}_out", elem, [1000]) for name, elem in kinds],
    )
    feeds = generate_inputs(input_specs(helper.make_model(graph), {}), seed=0)
    assert feeds["f"].dtype == np.float16 and 0.8 < feeds["f"].astype(np.float64).std() < 1.2
    assert feeds["i"].dtype == np.int64 and set(np.unique(feeds["i"])) == {0, 1, 2, 3}
    assert feeds["b"].dtype == np.bool_ and 0 < feeds["b"].sum() < 1000


# -- .npz ----------------------------------------------------------------------------------------


def test_npz_inputs_are_used(cnn: Path, tmp_path: Path) -> None:
    npz = tmp_path / "inputs.npz"
    np.savez(npz, image=_image(7, batch=2))
    result = run_cli("check", str(cnn), str(cnn), "--inputs", str(npz), "--json", "-")
    assert result.exit_code == 0, result.output
    [trial] = json.loads(result.stdout)["verification"]["trials"]
    assert trial == {"label": "inputs.npz", "seed": None,
                     "inputs": [{"name": "image", "shape": [2, 3, 32, 32], "dtype": "float32"}]}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"picture": _image(0)}, "no value for model input 'image' (in inputs.npz)"),
        ({"image": _image(0), "mask": _image(1)}, "'mask' names no model input (model inputs: image)"),
        ({"image": _image(0).astype(np.float64)}, "input 'image' is float64, the model expects float32"),
        ({"image": _image(0)[:, :, :16]}, "input 'image' has shape [1,3,16,32], the model expects [?,3,32,32]"),
    ],
    ids=["missing", "misnamed", "dtype", "shape"],
)
def test_npz_mismatch_is_one_error_line(cnn: Path, tmp_path: Path, arrays: dict, message: str) -> None:
    npz = tmp_path / "inputs.npz"
    np.savez(npz, **arrays)
    _assert_one_line_error(run_cli("check", str(cnn), str(cnn), "--inputs", str(npz)), f"--inputs {npz}: {message}")


def test_unreadable_npz_and_missing_path(cnn: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    result = run_cli("check", str(cnn), str(cnn), "--inputs", str(bad))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"bnfold: error: --inputs {bad}: not a readable .npz file")
    missing = tmp_path / "absent.npz"
    _assert_one_line_error(run_cli("check", str(cnn), str(cnn), "--inputs", str(missing)),
                           f"--inputs {missing}: no such file or folder")


def test_inputs_cannot_be_combined_with_generation_options(cnn: Path, tmp_path: Path) -> None:
    npz = tmp_path / "inputs.npz"
    np.savez(npz, image=_image(0))
    _assert_one_line_error(run_cli("check", str(cnn), str(cnn), "--inputs", str(npz), "--batch", "2"),
                           "--batch shapes generated inputs; it cannot be combined with --inputs")


# -- ONNX test-data folders ----------------------------------------------------------------------


def test_each_data_set_is_a_trial_with_expected_outputs(cnn: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    for index, seed in enumerate((1, 2)):
        image = _image(seed)
        _write_tensor(data / f"test_data_set_{index}" / "input_0.pb", image, "image")
        [expected] = _reference_outputs(cnn, {"image": image})
        _write_tensor(data / f"test_data_set_{index}" / "output_0.pb", expected)  # unnamed: matched by position
    report = fold_file(cnn, FoldOptions(dry_run=True, verify_options=VerifyOptions(inputs=data)))
    assert report.exit_code == 0 and len(report.folds) == 6
    assert [t.label for t in report.verification.trials] == ["test_data_set_0", "test_data_set_1"]
    assert [(c.trial, c.name, c.passed) for c in report.verification.expected] == [
        ("test_data_set_0", "batchnormalization5_out", True),
        ("test_data_set_1", "batchnormalization5_out", True),
    ]


def test_wrong_expected_output_fails_the_fold(cnn: Path, tmp_path: Path) -> None:
    image = _image(3)
    [expected] = _reference_outputs(cnn, {"image": image})
    _write_tensor(tmp_path / "input_0.pb", image)
    _write_tensor(tmp_path / "output_0.pb", expected + 1.0, "batchnormalization5_out")
    result = run_cli(str(cnn), "--dry-run", "--inputs", str(tmp_path), "--json", "-")
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    assert all(output["passed"] for output in document["verification"]["outputs"])  # the fold itself is fine
    [against_expected] = document["verification"]["expected"]
    assert not against_expected["passed"] and against_expected["max_abs_error"] == pytest.approx(1.0, rel=1e-5)


def test_folder_without_test_data_is_an_error(cnn: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(run_cli("check", str(cnn), str(cnn), "--inputs", str(empty)),
                           f"--inputs {empty}: no test_data_set_* folders or input_*.pb files")


def test_misnamed_tensor_in_folder_is_an_error(cnn: Path, tmp_path: Path) -> None:
    _write_tensor(tmp_path / "test_data_set_0" / "input_0.pb", _image(0), "pixels")
    _assert_one_line_error(run_cli("check", str(cnn), str(cnn), "--inputs", str(tmp_path)),
                           f"--inputs {tmp_path}: no value for model input 'image' (in test_data_set_0)")


def test_too_many_unnamed_inputs_is_an_error(cnn: Path, tmp_path: Path) -> None:
    for index in range(2):
        _write_tensor(tmp_path / f"input_{index}.pb", _image(index))
    _assert_one_line_error(run_cli("check", str(cnn), str(cnn), "--inputs", str(tmp_path)),
                           f"--inputs {tmp_path / 'input_1.pb'}: the model has only 1 inputs")


def test_a_dimension_fixed_at_zero_is_fixed_not_symbolic(tmp_path: Path) -> None:
    """An input declared [0, 3] (an empty batch onnxruntime runs) is generated as declared."""
    b = GraphBuilder(seed=2)
    b.output(b.node("Relu", [b.input("x", [0, 3])]))
    model = b.model()
    assert input_specs(model, {})[0].shape == (0, 3)
    assert not guess_sizes(model, {}, None)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    assert run_cli(path, "-q").exit_code == 0


def test_a_negative_dimension_is_symbolic_as_paddle2onnx_writes_it() -> None:
    b = GraphBuilder(seed=2)
    b.output(b.node("Relu", [b.input("x", [-1, 3])]))
    model = b.model()
    assert input_specs(model, {"x": (2, 3)})[0].shape == (2, 3)
    assert input_specs(model, {}, batch=4)[0].shape == (4, 3)


def test_sizes_set_to_one_are_also_verified_wider(tmp_path: Path) -> None:
    """A Conv whose spatial sizes are symbolic with no hint: verified at 1×1 and at 32×32,
    where its borders exist; a model that cannot run at 32 keeps the 1×1 trial alone."""
    b = GraphBuilder(seed=3)
    x = b.input("x", ["N", 3, "H", "W"])
    b.output(b.batchnorm(b.conv(x, 3, 4), 4))
    path = tmp_path / "m.onnx"
    onnx.save(b.model(), str(path))
    report = fold_file(path, FoldOptions(dry_run=True))
    assert report.exit_code == 0
    assert [trial.inputs[0].shape for trial in report.verification.trials] == [(1, 3, 1, 1), (1, 3, 32, 32)]
    fixed = GraphBuilder(seed=3)  # a Reshape to a fixed size: runs at 1×1 only
    y = fixed.input("x", ["N", 3, "H", "W"])
    flat = fixed.node("Reshape", [fixed.batchnorm(fixed.conv(y, 3, 4), 4), fixed.const("shape", np.array([1, 4]))])
    fixed.output(flat)
    onnx.save(fixed.model(), str(path))
    report = fold_file(path, FoldOptions(dry_run=True))
    assert report.exit_code == 0 and len(report.verification.trials) == 1


def test_a_model_that_cannot_run_at_one_is_verified_at_the_wider_size(tmp_path: Path) -> None:
    """An unpadded 3×3 Conv has no output at 1×1: rather than exit 3, the trials run at 32."""
    b = GraphBuilder(seed=4)
    x = b.input("x", ["N", 3, "H", "W"])
    b.output(b.conv(b.batchnorm(x, 3), 3, 4, (3, 3), pads=[0, 0, 0, 0]))
    path = tmp_path / "m.onnx"
    onnx.save(b.model(), str(path))
    report = fold_file(path, FoldOptions(dry_run=True))
    assert report.exit_code == 0 and report.folds
    assert [trial.inputs[0].shape for trial in report.verification.trials] == [(1, 3, 32, 32)]
    [guess] = report.verification.guessed_sizes
    assert guess.shape == (1, 3, 32, 32) and "32" in guess.reason
