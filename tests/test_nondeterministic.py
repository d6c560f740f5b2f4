"""Models whose original differs from itself between runs get no verdict and no blame.

Random ops (RandomNormal, RandomUniform, their *Like forms, Bernoulli, Multinomial) and
Dropout in training mode make every comparison with the original meaningless: bnfold runs
the original twice on the same inputs, and when the runs disagree it stops with exit 3 and
one line saying so, writing nothing; ``--no-verify`` still folds. Randomness that the first
trial does not reach (a branch only a later trial takes) is caught before a failed comparison
is believed: the original then runs every other trial twice as well.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfold.inputs import generate_inputs, input_specs
from sample_models.modelkit import GraphBuilder
from tests.support import assert_one_line_error, op_count, run_cli

BN = "BatchNormalization"
SHAPE = [2, 4, 5, 5]


def _foldable(b: GraphBuilder, seed_shift: int = 0) -> str:
    """x → Conv → BN (a fold bnfold makes) → Relu."""
    x = b.input("x", SHAPE)
    return b.node("Relu", [b.batchnorm(b.conv(x, 4, 4), 4)])


def _random_attributes(seeded: bool) -> dict[str, float]:
    return {"seed": 3.0} if seeded else {}


def dropout_training(b: GraphBuilder, seeded: bool) -> None:
    y = _foldable(b)
    ratio = b.const("ratio", np.array(0.5, np.float32))
    training = b.const("training", np.array(True))
    b.output(b.node("Dropout", [y, ratio, training], **{k: int(v) for k, v in _random_attributes(seeded).items()}))


def random_normal(b: GraphBuilder, seeded: bool) -> None:
    y = _foldable(b)
    noise = b.node("RandomNormal", [], shape=SHAPE, scale=0.5, **_random_attributes(seeded))
    b.output(b.node("Add", [y, noise]))


def random_uniform_like(b: GraphBuilder, seeded: bool) -> None:
    y = _foldable(b)
    b.output(b.node("Mul", [y, b.node("RandomUniformLike", [y], low=0.5, high=1.5, **_random_attributes(seeded))]))


def random_normal_like(b: GraphBuilder, seeded: bool) -> None:
    y = _foldable(b)
    b.output(b.node("Add", [y, b.node("RandomNormalLike", [y], **_random_attributes(seeded))]))


def bernoulli(b: GraphBuilder, seeded: bool) -> None:
    y = _foldable(b)
    b.output(b.node("Mul", [y, b.node("Bernoulli", [b.node("Sigmoid", [y])], **_random_attributes(seeded))]))


def multinomial(b: GraphBuilder, seeded: bool) -> None:
    """A second, integer output drawn from the (deterministic, folded) first one."""
    y = _foldable(b)
    b.output(y)
    logits = b.node("Flatten", [y])
    samples = b.node("Multinomial", [logits], sample_size=64, dtype=TensorProto.INT64, **_random_attributes(seeded))
    b.outputs.append(helper.make_tensor_value_info(samples, TensorProto.INT64, None))


KINDS: dict[str, Callable[[GraphBuilder, bool], None]] = {
    "Dropout training_mode=1": dropout_training, "RandomNormal": random_normal,
    "RandomUniformLike": random_uniform_like, "RandomNormalLike": random_normal_like,
    "Bernoulli": bernoulli, "Multinomial": multinomial,
}


def build(kind: str, seeded: bool, seed: int = 0) -> onnx.ModelProto:
    b = GraphBuilder(seed=seed)
    KINDS[kind](b, seeded)
    return b.model(opset=15)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_a_model_that_differs_from_itself_gets_exit_3_and_nothing_written(
    tmp_path: Path, kind: str, seeded: bool
) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(build(kind, seeded), str(path))
    before = snapshot(tmp_path)
    report = tmp_path / "reports" / "r.json"
    report.parent.mkdir()
    for extra in ([], ["--keep-failed"], ["--trials", "3"], ["--json", report]):
        result = run_cli(path, *extra)
        assert_one_line_error(result, 3, "the original model is not deterministic: output ",
                              " differs between two runs ")
        assert "Broken by" not in result.stdout
        assert {name: digest for name, digest in snapshot(tmp_path).items() if not name.startswith("reports")} == before
    # The report of the failure is written (as for any failed run), no model is.
    document = json.loads(report.read_text())
    assert document["status"] == "error" and document["exit_code"] == 3 and "not deterministic" in document["error"]
    assert_one_line_error(run_cli("check", path, path), 3, "not deterministic")


@pytest.mark.parametrize("kind", KINDS)
def test_folding_without_verification_still_works(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(build(kind, seeded=False), str(path))
    result = run_cli(path, "--no-verify", "-q")
    assert result.exit_code == 0, result.output
    folded = tmp_path / "m.folded.onnx"
    onnx.checker.check_model(str(folded), full_check=True)
    model = onnx.load(str(folded))
    assert op_count(model, BN) == 0
    assert {n.op_type for n in model.graph.node} >= {n.op_type for n in build(kind, False).graph.node} - {BN}


def test_dropout_in_inference_mode_is_deterministic_and_folds_through(tmp_path: Path) -> None:
    """The check must not fire on Dropout that drops nothing (training_mode false)."""
    b = GraphBuilder(seed=4)
    y = _foldable(b)
    b.output(b.node("Dropout", [y, b.const("ratio", np.array(0.5, np.float32)), b.const("t", np.array(False))]))
    path = tmp_path / "m.onnx"
    onnx.save(b.model(opset=15), str(path))
    result = run_cli(path, "--json", "-", "--trials", "2")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "equivalent"


def _randomness_in_a_branch_only_positive_inputs_take() -> onnx.ModelProto:
    """Conv → BN, then noise from RandomNormalLike; If(sum(x) > 0): then BN + noise, else BN.

    onnxruntime seeds an unseeded random op the same way in every session of a process, but
    not at every position in a graph: the BN folded before it moves the random op, so the
    original and the folded model draw different values, which only the noisy branch adds.
    The fold is in the main graph: a fold inside the noisy branch would not be applied at
    all, since that branch, verified on its own, differs from itself.
    """
    b = GraphBuilder(seed=5)
    x = b.input("x", SHAPE)
    cond = b.node("Greater", [b.node("ReduceSum", [x], keepdims=0), b.const("zero", np.array(0.0, np.float32))])
    y = b.batchnorm(b.conv(x, 4, 4), 4)
    noise = b.node("RandomNormalLike", [y])
    noisy = helper.make_graph([helper.make_node("Add", [y, noise], ["then_out"])], "then", [],
                              [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, SHAPE)])
    quiet = helper.make_graph([helper.make_node("Identity", [y], ["else_out"])], "else", [],
                              [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, SHAPE)])
    b.output(b.node("If", [cond], then_branch=noisy, else_branch=quiet))
    return b.model(opset=15)


def test_the_second_run_reuses_the_originals_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deterministic model that verifies loads each model once: the extra run is only a run."""
    from bnfold import verify

    opened: list[str] = []
    real_open = verify.open_session
    monkeypatch.setattr(verify, "open_session", lambda path, label, provider: opened.append(label)
                        or real_open(path, label, provider))
    b = GraphBuilder(seed=6)
    b.output(_foldable(b))
    path = tmp_path / "m.onnx"
    onnx.save(b.model(), str(path))
    assert run_cli(path, "--trials", "3", "-q").exit_code == 0
    assert opened == ["original", "folded"]


def test_randomness_the_first_trial_misses_is_caught_before_any_blame(tmp_path: Path) -> None:
    model = _randomness_in_a_branch_only_positive_inputs_take()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    specs = input_specs(model, {})
    takes_noise = [float(generate_inputs(specs, seed)["x"].sum()) > 0 for seed in range(40)]
    # A first trial on the quiet branch, followed by one on the noisy branch.
    first = next(seed for seed in range(39) if not takes_noise[seed] and takes_noise[seed + 1])
    before = snapshot(tmp_path)
    result = run_cli(path, "--seed", first, "--trials", 2, "--keep-failed")
    assert_one_line_error(result, 3, "not deterministic", f"seed {first + 1}")
    assert snapshot(tmp_path) == before
    folded = tmp_path / "folded.onnx"
    assert run_cli(path, "--no-verify", "-o", folded, "-q").exit_code == 0
    assert_one_line_error(run_cli("check", path, folded, "--seed", first, "--trials", 2), 3, "not deterministic")
    assert run_cli(path, "--seed", first, "-q").exit_code == 0  # the quiet branch alone verifies
