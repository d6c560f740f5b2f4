"""The Python API: ``bnfold.fold`` and ``bnfold.check`` on in-memory models and on paths,
the same engine, reports and messages as the command, and nothing left on disk."""

from __future__ import annotations

import importlib.resources
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import bnfold
from bnfold import pipeline
from bnfold.inputs import generate_inputs, input_specs
from sample_models.generate import SAMPLES
from tests.installed import REPOSITORY
from tests.support import op_count, run_cli, run_onnxruntime, shift_first_weight, write_model_onnxruntime_cannot_run
from tests.test_cli import corrupting_fold

BN = "BatchNormalization"


@pytest.fixture(autouse=True)
def scratch_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory and the system's temporary folder, both watched for leftovers."""
    work, temporary = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    temporary.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    yield tmp_path
    assert list(temporary.iterdir()) == [], "the API left scratch files behind"


def assert_same_function(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    feeds = generate_inputs(input_specs(original, {}), seed=1)
    for expected, actual in zip(run_onnxruntime(original, feeds), run_onnxruntime(folded, feeds), strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["cnn_residual", "classifier_head_bn", "tf_style_decomposed", "legacy_opset9"])
def test_fold_takes_a_model_in_memory_and_returns_the_folded_model_leaving_the_input_alone(name: str) -> None:
    model = SAMPLES[name]()
    before = model.SerializeToString()
    result = bnfold.fold(model)
    assert model.SerializeToString() == before
    assert result.model is not None and op_count(result.model, BN) == 0
    assert_same_function(model, result.model)
    assert result.report.passed and result.report.status == "equivalent"
    document = result.report.to_dict()
    assert document["schema"] == "bnfold.fold/1" and document["status"] == "equivalent"
    assert document["input"] is None and document["output"] is None and document["written"] is False
    assert document["error"] is None
    json.dumps(document, allow_nan=False)  # strict JSON, as --json writes it
    assert list(Path.cwd().iterdir()) == []


def test_fold_of_a_path_writes_nothing_unless_given_an_output(tmp_path: Path) -> None:
    source = Path(shutil.copy(REPOSITORY / "sample_models" / "mlp_gemm_bn.onnx", "mlp.onnx"))
    in_memory = bnfold.fold(source)
    assert sorted(p.name for p in Path.cwd().iterdir()) == ["mlp.onnx"]
    assert in_memory.report.input == source and in_memory.model is not None
    written = bnfold.fold(str(source), output="out.onnx")
    assert written.report.written and Path("out.onnx").is_file()
    assert written.model is not None
    assert written.model.SerializeToString() == onnx.load("out.onnx").SerializeToString()
    assert op_count(written.model, BN) == 0


def test_the_command_reports_what_the_api_reports() -> None:
    source = Path(shutil.copy(REPOSITORY / "sample_models" / "refused_bn.onnx", "refused.onnx"))
    command = json.loads(run_cli(source, "--dry-run", "--json", "-").stdout)
    api = bnfold.fold(source, dry_run=True).report.to_dict()
    for document in (command, api):
        document.pop("timings")
    assert command == api


def test_check_compares_models_in_memory_and_raises_only_when_asked() -> None:
    original = SAMPLES["cnn_residual"]()
    folded = bnfold.fold(original).model
    assert folded is not None
    report = bnfold.check(original, folded, trials=2)
    assert report.passed and report.to_dict()["schema"] == "bnfold.check/1"
    assert report.to_dict()["original"] is None and len(report.verification.trials) == 2
    onnx.save(original, "retrained.onnx")
    shift_first_weight(Path("retrained.onnx"), 0.5)
    differs = bnfold.check("retrained.onnx", folded)
    assert not differs.passed and differs.status == "not-equivalent"
    with pytest.raises(bnfold.NotEquivalent) as raised:
        bnfold.check("retrained.onnx", folded, raise_on_mismatch=True)
    assert str(raised.value).startswith("retrained.onnx vs <folded>: not-equivalent (max |Δ| ")
    assert raised.value.exit_code == 1 and raised.value.report.to_dict() == raised.value.report.to_dict()


def test_a_fold_that_breaks_the_model_is_a_result_or_an_error_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "fold_batchnorms", corrupting_fold)
    model = SAMPLES["cnn_residual"]()
    result = bnfold.fold(model)
    assert not result.report.passed and result.report.status == "not-equivalent"
    assert result.model is not None  # the folded model, to inspect
    assert result.report.attribution is not None and result.report.attribution.guilty
    with pytest.raises(bnfold.NotEquivalent, match=r"^<model> → in memory: folded 6 of 6 .*not-equivalent") as raised:
        bnfold.fold(model, raise_on_mismatch=True)
    assert isinstance(raised.value, bnfold.BnfoldError) and not raised.value.report.passed


def unusable_model() -> onnx.ModelProto:
    """A model whose only node reads a value nothing defines: it fails onnx.checker."""
    model = SAMPLES["conv_no_bias"]()
    model.graph.node[0].input[0] = "undefined"
    return model


def test_a_bad_model_raises_the_message_the_command_prints() -> None:
    onnx.save(unusable_model(), "bad.onnx")
    command = run_cli("bad.onnx")
    with pytest.raises(bnfold.InputError) as from_path:
        bnfold.fold("bad.onnx")
    assert command.exit_code == from_path.value.exit_code == 2
    assert command.stderr == f"bnfold: error: {from_path.value}\n"
    with pytest.raises(bnfold.InputError) as in_memory:
        bnfold.fold(unusable_model())
    assert str(in_memory.value) == str(from_path.value).replace("bad.onnx", "<model>", 1)
    with pytest.raises(bnfold.InputError, match=r"^<original>: fails onnx.checker"):
        bnfold.check(unusable_model(), SAMPLES["conv_no_bias"]())


def test_onnxruntime_refusing_the_model_raises_runtime_failure() -> None:
    model = onnx.load(write_model_onnxruntime_cannot_run(Path("custom.onnx")))
    with pytest.raises(bnfold.RuntimeFailure, match="onnxruntime cannot load the original model") as raised:
        bnfold.fold(model)
    assert raised.value.exit_code == 3
    unverified = bnfold.fold(model, verify=False)
    assert unverified.report.status == "unverified" and unverified.report.passed


def test_inputs_given_as_arrays_are_checked_against_the_model() -> None:
    model = SAMPLES["mlp_gemm_bn"]()
    name = model.graph.input[0].name
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    values = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    result = bnfold.fold(model, inputs={name: values})
    assert result.report.passed
    assert [trial.label for trial in result.report.verification.trials] == ["inputs.npz"]
    with pytest.raises(bnfold.InputError, match=r"^--inputs <inputs>: 'nope' names no model input"):
        bnfold.fold(model, inputs={name: values, "nope": values})


@pytest.mark.parametrize("options, fragment", [
    ({"tol": {"nope": (1e-3, 1e-3)}}, "--tol nope: the model has no output of that name"),
    ({"atol": -1.0}, "--atol: a tolerance is a finite number >= 0"),
    ({"skip": [""]}, "--skip: patterns are non-empty strings"),
    ({"trials": 0}, "--trials must be at least 1"),
])
def test_bad_options_raise_input_errors(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(bnfold.InputError, match=fragment):
        bnfold.fold(SAMPLES["conv_no_bias"](), **options)


def test_anything_but_a_model_or_a_path_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="expected an onnx.ModelProto or a path"):
        bnfold.fold(b"not a model")  # type: ignore[arg-type]


def test_the_package_declares_its_type_hints() -> None:
    assert importlib.resources.files("bnfold").joinpath("py.typed").is_file()
