"""Folds inside If/Loop/Scan bodies are verified on their own, whether or not a trial runs them.

Each generator builds a class of models (If with folds in both branches, Loop and Scan bodies,
an If nested in a Loop body, bodies reading outer values and outer initializers) with a
symbolic batch dim. A broken fold is injected the way tests/test_attribution.py does it: a
Conv rule that corrupts the weight of chosen Convs only. The judge is onnxruntime run
independently on the original and the written model, with both If branches taken, Loops run
0..n times and batch sizes other than 1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from bnfold.options import VerifyOptions
from bnfold.pipeline import FoldOptions, FoldReport, fold_file
from bnfold.report import dump_json
from bnfold.rules import RULES, build_rules
from bnfold.rules.gemm import GemmBn
from sample_models.modelkit import DEFAULT_IR_VERSION, GraphBuilder
from tests.hostile_support import count_ops
from tests.support import run_cli, run_onnxruntime
from tests.test_attribution import CorruptingConvRule

BN = "BatchNormalization"
UNVERIFIABLE = "could not be verified on its own"


@dataclass
class BodyModel:
    """A generated model and, per body holding a fold, the BN label and Conv name of that fold."""

    model: onnx.ModelProto
    folds: dict[str, tuple[str, str]]
    """Body label → (label of the BN folded in it, name of the Conv it folds into)."""


def _value(name: str, shape: list[int | str] | None = None, elem_type: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


def _never(b: GraphBuilder, x: str) -> str:
    """A condition computed from ``x`` that is false for every generated input."""
    return b.node("Greater", [b.node("ReduceSum", [b.node("Abs", [x])], keepdims=0),
                              b.const("huge", np.array(1e30, np.float32))])


def _always(b: GraphBuilder, x: str) -> str:
    return b.node("Not", [_never(b, x)])


def _conv_bn(b: GraphBuilder, x: str, channels: int, *, weight: str | None = None,
             parameters: list[str] | None = None) -> tuple[str, str, str]:
    """Conv → BN (3×3, padded); returns the BN output, the BN's node name and the Conv's."""
    conv = b.node("Conv", [x, weight], pads=[1, 1, 1, 1]) if weight else b.conv(x, channels, channels)
    conv_name = b.nodes[-1].name
    bn = b.node(BN, [conv, *parameters]) if parameters else b.batchnorm(conv, channels)
    return bn, b.nodes[-1].name, conv_name


def if_model(seed: int, channels: int, cond: str, *, outer_weights: bool = True, expose: bool = False
             ) -> BodyModel:
    """If whose branches both hold Conv→BN on an outer runtime value. The then branch has its own
    weights; the else branch reads a weight and BN parameters of the main graph (``outer_weights``).
    ``cond``: 'input' (a bool graph input), 'never' or 'always' (computed, so the trials take one
    branch only). ``expose`` makes the outer value the branches read a graph output too."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", channels, 6, 6])
    condition = b.input("cond", [], TensorProto.BOOL) if cond == "input" else (
        _never(b, x) if cond == "never" else _always(b, x))
    weight = b.random("W_outer", [channels, channels, 3, 3]) if outer_weights else None
    parameters = b.batchnorm_parameters(channels) if outer_weights else None
    top = b.conv(x, channels, channels)
    with b.collecting() as (then_nodes, then_initializers):
        then_out, then_bn, then_conv = _conv_bn(b, top, channels)
    with b.collecting() as (else_nodes, else_initializers):
        else_bn_out, else_bn, else_conv = _conv_bn(b, top, channels, weight=weight, parameters=parameters)
        else_out = b.node("Add", [else_bn_out, x])  # reads a graph input of the main graph too
    b.nodes.append(helper.make_node(
        "If", [condition], ["y"], name="branch",
        then_branch=helper.make_graph(then_nodes, "then", [], [_value(then_out)], then_initializers),
        else_branch=helper.make_graph(else_nodes, "else", [], [_value(else_out)], else_initializers),
    ))
    b.output("y", ["N", channels, 6, 6])
    if expose:
        b.output(top, ["N", channels, 6, 6])
    return BodyModel(b.model(), {
        "If 'branch' then_branch": (f"If 'branch' then_branch / {then_bn}", then_conv),
        "If 'branch' else_branch": (f"If 'branch' else_branch / {else_bn}", else_conv),
    })


def loop_model(seed: int, channels: int, trips: int) -> BodyModel:
    """Loop running ``trips`` times (0: never) whose body folds a Conv→BN that reads the carried
    value, an outer runtime value and an outer weight."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", channels, 5, 5])
    count = b.const("trips", np.array(trips, dtype=np.int64))
    keep_going = b.const("keep_going", np.array(True))
    weight = b.random("W_outer", [channels, channels, 3, 3])
    top = b.node("Relu", [x])
    with b.collecting() as (nodes, initializers):
        bn_out, bn, conv = _conv_bn(b, b.node("Add", ["carried", top]), channels, weight=weight)
        carried_out = b.node("Relu", [bn_out])
        cond_out = b.node("Identity", ["cond_in"])
    body = helper.make_graph(
        nodes, "body",
        [_value("i", [], TensorProto.INT64), _value("cond_in", [], TensorProto.BOOL), _value("carried")],
        [_value(cond_out, [], TensorProto.BOOL), _value(carried_out)], initializers,
    )
    b.nodes.append(helper.make_node("Loop", [count, keep_going, x], ["y"], name="repeat", body=body))
    b.output("y", ["N", channels, 5, 5])
    return BodyModel(b.model(), {"Loop 'repeat' body": (f"Loop 'repeat' body / {bn}", conv)})


def scan_model(seed: int, channels: int, axis: int, reverse: bool) -> BodyModel:
    """Scan over axis ``axis`` of a [T, N, C, H, W] sequence (or [N, T, C, H, W]), forwards or in
    reverse, with a running sum as state; the body folds Conv→BN with outer BN parameters."""
    b = GraphBuilder(seed=seed)
    dims: list[int | str] = ["T", "N", channels, 4, 4] if axis == 0 else ["N", "T", channels, 4, 4]
    sequence = b.input("sequence", dims)
    state = b.input("state", ["N", channels, 4, 4])
    parameters = b.batchnorm_parameters(channels)
    with b.collecting() as (nodes, initializers):
        bn_out, bn, conv = _conv_bn(b, "item", channels, parameters=parameters)
        total = b.node("Add", ["sum_in", bn_out])
        step = b.node("Identity", [bn_out])
    body = helper.make_graph(nodes, "body", [_value("sum_in"), _value("item")], [_value(total), _value(step)],
                             initializers)
    b.nodes.append(helper.make_node(
        "Scan", [state, sequence], ["final", "steps"], name="scan", body=body, num_scan_inputs=1,
        scan_input_axes=[axis], scan_input_directions=[int(reverse)],
    ))
    b.output("final", ["N", channels, 4, 4])
    b.output("steps", ["T", "N", channels, 4, 4])
    return BodyModel(b.model(), {"Scan 'scan' body": (f"Scan 'scan' body / {bn}", conv)})


def nested_model(seed: int, channels: int) -> BodyModel:
    """A Loop (run twice) whose body holds an If that never takes its then branch; both branches
    fold a Conv→BN reading the Loop's carried value."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", channels, 5, 5])
    count = b.const("trips", np.array(2, dtype=np.int64))
    keep_going = b.const("keep_going", np.array(True))
    with b.collecting() as (loop_nodes, loop_initializers):
        inside = b.node("Relu", ["carried"])
        condition = _never(b, inside)
        with b.collecting() as (then_nodes, then_initializers):
            then_out, then_bn, then_conv = _conv_bn(b, inside, channels)
        with b.collecting() as (else_nodes, else_initializers):
            else_out, else_bn, else_conv = _conv_bn(b, inside, channels)
        b.nodes.append(helper.make_node(
            "If", [condition], ["chosen"], name="inner",
            then_branch=helper.make_graph(then_nodes, "then", [], [_value(then_out)], then_initializers),
            else_branch=helper.make_graph(else_nodes, "else", [], [_value(else_out)], else_initializers),
        ))
        cond_out = b.node("Identity", ["cond_in"])
    body = helper.make_graph(
        loop_nodes, "body",
        [_value("i", [], TensorProto.INT64), _value("cond_in", [], TensorProto.BOOL), _value("carried")],
        [_value(cond_out, [], TensorProto.BOOL), _value("chosen")], loop_initializers,
    )
    b.nodes.append(helper.make_node("Loop", [count, keep_going, x], ["y"], name="repeat", body=body))
    b.output("y", ["N", channels, 5, 5])
    scope = "Loop 'repeat' body / If 'inner'"
    return BodyModel(b.model(), {
        f"{scope} then_branch": (f"{scope} then_branch / {then_bn}", then_conv),
        f"{scope} else_branch": (f"{scope} else_branch / {else_bn}", else_conv),
    })


def sequence_branch_model(seed: int, channels: int) -> BodyModel:
    """If whose then branch reads a sequence of the main graph (it cannot be fed on its own) and
    whose else branch reads a value of unknown rank (computed, so it can)."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", channels, 6, 6])
    condition = b.input("cond", [], TensorProto.BOOL)
    sequence = b.node("SequenceConstruct", [x, x])
    # Squeeze by axes computed at run time: shape inference cannot tell the output's rank.
    shape = b.node("Shape", [x])
    first = b.node("Slice", [shape, b.const("zero", np.array([0], np.int64)), b.const("one", np.array([1], np.int64))])
    axes = b.node("Sub", [first, first])
    mean = b.node("ReduceMean", [x], axes=[0], keepdims=1)
    unknown = b.node("Squeeze", [mean, axes])
    with b.collecting() as (then_nodes, then_initializers):
        then_out, then_bn, then_conv = _conv_bn(b, b.node("SequenceAt", [sequence, b.const("at", np.array(0, np.int64))]),
                                                channels)
    with b.collecting() as (else_nodes, else_initializers):
        restored = b.node("Unsqueeze", [unknown, b.const("axis0", np.array([0], np.int64))])
        else_bn_out, else_bn, else_conv = _conv_bn(b, restored, channels)
        else_out = b.node("Add", [else_bn_out, x])
    b.nodes.append(helper.make_node(
        "If", [condition], ["y"], name="branch",
        then_branch=helper.make_graph(then_nodes, "then", [], [_value(then_out)], then_initializers),
        else_branch=helper.make_graph(else_nodes, "else", [], [_value(else_out)], else_initializers),
    ))
    b.output("y", ["N", channels, 6, 6])
    return BodyModel(b.model(), {
        "If 'branch' then_branch": (f"If 'branch' then_branch / {then_bn}", then_conv),
        "If 'branch' else_branch": (f"If 'branch' else_branch / {else_bn}", else_conv),
    })


def ir3_if_model(seed: int, channels: int) -> BodyModel:
    """IR 3 (opset 8): every initializer is also declared as an input, in the branches too. The
    then branch, never taken, folds Conv→BN with its own weights on ``x`` plus an outer constant."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", channels, 5, 5])
    offset = b.random("offset", [1, channels, 1, 1])
    with b.collecting() as (then_nodes, then_initializers):
        then_out, then_bn, then_conv = _conv_bn(b, b.node("Add", [x, offset]), channels)
    with b.collecting() as (else_nodes, _):
        else_out = b.node("Add", [x, offset])
    declared = [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in then_initializers]
    b.nodes.append(helper.make_node(
        "If", [_never(b, x)], ["y"], name="branch",
        then_branch=helper.make_graph(then_nodes, "then", declared, [_value(then_out, ["N", channels, 5, 5])],
                                      then_initializers),
        else_branch=helper.make_graph(else_nodes, "else", [], [_value(else_out, ["N", channels, 5, 5])]),
    ))
    b.output("y", ["N", channels, 5, 5])
    return BodyModel(b.model(opset=8, ir_version=3),
                     {"If 'branch' then_branch": (f"If 'branch' then_branch / {then_bn}", then_conv)})


def linear_if_model(seed: int, features: int) -> onnx.ModelProto:
    """If never taking its then branch: MatMul → BN → Add(bias). The BN's fold creates a bias Add
    after the MatMul, which a second fold merges with the bias Add: a fold of a node that was not
    in the model."""
    b = GraphBuilder(seed=seed)
    x = b.input("x", ["N", 6])
    with b.collecting() as (then_nodes, then_initializers):
        normalized = b.batchnorm(b.node("MatMul", [x, b.random("W", [6, features])]), features)
        then_out = b.node("Add", [normalized, b.random("bias", [features])])
    with b.collecting() as (else_nodes, else_initializers):
        else_out = b.node("MatMul", [x, b.random("W", [6, features])])
    b.nodes.append(helper.make_node(
        "If", [_never(b, x)], ["y"], name="branch",
        then_branch=helper.make_graph(then_nodes, "then", [], [_value(then_out, ["N", features])], then_initializers),
        else_branch=helper.make_graph(else_nodes, "else", [], [_value(else_out, ["N", features])], else_initializers),
    ))
    b.output("y", ["N", features])
    return b.model()


# -- helpers ------------------------------------------------------------------------------------


def _save(model: onnx.ModelProto, folder: Path, *, external: bool = False) -> Path:
    path = folder / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=external, location="model.data", size_threshold=0)
    return path


def _fold(path: Path, *, broken: set[str] = frozenset(), batch: int = 3, trials: int = 1, **options: object
          ) -> FoldReport:
    """fold_file with the registry's rules, or with Conv folds into the ``broken`` Convs corrupted."""
    rules = build_rules(backward=(CorruptingConvRule(set(broken)), GemmBn())) if broken else RULES
    return fold_file(path, FoldOptions(rules=rules, verify_options=VerifyOptions(batch=batch, trials=trials),
                                       **options))


def _assert_same_outputs(original: Path, folded: Path, feeds: dict[str, np.ndarray]) -> None:
    """The two models computed independently in onnxruntime (optimizations off) agree."""
    expected = run_onnxruntime(onnx.load(str(original)), feeds)
    actual = run_onnxruntime(onnx.load(str(folded)), feeds)
    for reference, candidate in zip(expected, actual, strict=True):
        np.testing.assert_allclose(candidate, reference, atol=1e-4, rtol=1e-3)


def _images(batch: int, channels: int, size: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, channels, size, size)).astype(np.float32)


# -- broken folds where no trial goes -----------------------------------------------------------


@pytest.mark.parametrize(("cond", "broken_body"), [
    ("never", "If 'branch' then_branch"),
    ("always", "If 'branch' else_branch"),
])
@pytest.mark.parametrize("seed", [1, 2])
def test_broken_fold_in_the_branch_no_trial_takes_is_not_equivalent(
    tmp_path: Path, cond: str, broken_body: str, seed: int
) -> None:
    generated = if_model(seed, channels=2 + seed, cond=cond)
    bn_label, conv = generated.folds[broken_body]
    path = _save(generated.model, tmp_path)
    report = _fold(path, broken={conv}, trials=2)
    assert report.exit_code == 1 and report.status == "not-equivalent" and not report.written
    assert not path.with_name("model.folded.onnx").exists()
    assert report.verification.outputs[0].passed  # the model's own outputs cannot show it
    failed = [body.label for body in report.verification.bodies if not body.passed]
    assert failed == [broken_body]
    [guilty] = report.attribution.guilty
    assert guilty.batchnorms == (bn_label,) and guilty.targets == (f"Conv '{conv}'",)
    assert guilty.output.startswith(f"{broken_body} / ")


def test_broken_fold_in_a_loop_that_never_runs_is_not_equivalent(tmp_path: Path) -> None:
    generated = loop_model(seed=3, channels=3, trips=0)
    [(bn_label, conv)] = generated.folds.values()
    report = _fold(_save(generated.model, tmp_path), broken={conv})
    assert report.exit_code == 1 and not report.written
    [guilty] = report.attribution.guilty
    assert guilty.batchnorms == (bn_label,)


def test_broken_fold_in_an_if_nested_in_a_loop_body_is_named(tmp_path: Path) -> None:
    generated = nested_model(seed=4, channels=3)
    bn_label, conv = generated.folds["Loop 'repeat' body / If 'inner' then_branch"]
    report = _fold(_save(generated.model, tmp_path), broken={conv})
    assert report.exit_code == 1 and not report.written
    assert report.verification.outputs[0].passed
    [guilty] = report.attribution.guilty
    assert guilty.batchnorms == (bn_label,)


@pytest.mark.parametrize("broken", [True, False])
def test_ir3_branch_declaring_its_initializers_as_inputs_is_verified(tmp_path: Path, broken: bool) -> None:
    generated = ir3_if_model(seed=10, channels=2)
    [(bn_label, conv)] = generated.folds.values()
    report = _fold(_save(generated.model, tmp_path), broken={conv} if broken else set())
    [body] = report.verification.bodies
    assert [value.name for value in body.inputs] == ["x"]  # the outer constant is an initializer
    assert report.exit_code == int(broken) and body.passed is not broken
    if broken:
        assert report.attribution.guilty[0].batchnorms == (bn_label,)


@pytest.mark.parametrize("features", [3, 5])
def test_a_fold_of_a_node_an_earlier_fold_created_is_checked_with_its_body(tmp_path: Path, features: int) -> None:
    path = _save(linear_if_model(seed=features, features=features), tmp_path)
    report = _fold(path)
    assert report.exit_code == 0
    created = [fold.batchnorm for fold in report.folds if fold.kind != BN]
    assert created and all(label.startswith("If 'branch' then_branch / ") for label in created)
    assert [body.label for body in report.verification.bodies] == ["If 'branch' then_branch"]
    _assert_same_outputs(path, report.output, {"x": np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)})


@pytest.mark.parametrize("channels", [2, 3])
def test_a_branch_merge_inside_a_body_is_verified_with_it(tmp_path: Path, channels: int) -> None:
    """RepVGG's sum Conv3×3(x) + Conv1×1(x) in the then branch merges into one Conv (no BN): that
    rewrite is checked with its body like a fold."""
    b = GraphBuilder(seed=channels)
    x = b.input("x", ["N", channels, 5, 5])
    condition = b.input("cond", [], TensorProto.BOOL)
    with b.collecting() as (then_nodes, then_initializers):
        then_out = b.node("Add", [b.conv(x, channels, channels, (3, 3), pads=[1, 1, 1, 1]),
                                  b.conv(x, channels, channels, (1, 1))])
    with b.collecting() as (else_nodes, _):
        else_out = b.node("Neg", [x])
    b.nodes.append(helper.make_node(
        "If", [condition], ["y"], name="branch",
        then_branch=helper.make_graph(then_nodes, "then", [], [_value(then_out, ["N", channels, 5, 5])],
                                      then_initializers),
        else_branch=helper.make_graph(else_nodes, "else", [], [_value(else_out, ["N", channels, 5, 5])]),
    ))
    b.output("y", ["N", channels, 5, 5])
    path = _save(b.model(), tmp_path)
    report = _fold(path)
    assert report.exit_code == 0 and report.folds == []
    assert [merge.merged.split(" / ")[0] for merge in report.merges] == ["If 'branch' then_branch"]
    assert [body.label for body in report.verification.bodies] == ["If 'branch' then_branch"]
    for condition_value in (True, False):
        _assert_same_outputs(path, report.output, {"x": _images(3, channels, 5), "cond": np.array(condition_value)})


@pytest.mark.parametrize(("axis", "reverse"), [(0, False), (1, True)])
def test_broken_fold_in_a_scan_body_is_not_equivalent(tmp_path: Path, axis: int, reverse: bool) -> None:
    generated = scan_model(seed=5, channels=2, axis=axis, reverse=reverse)
    [(bn_label, conv)] = generated.folds.values()
    report = _fold(_save(generated.model, tmp_path), broken={conv})
    assert report.exit_code == 1
    [body] = report.verification.bodies
    assert not body.passed  # the body on its own shows it, as the Scan's outputs do
    assert report.attribution.guilty[0].batchnorms == (bn_label,)


# -- correct folds: verified on their own, and equivalent whatever runs -------------------------


@pytest.mark.parametrize(("external", "expose"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("seed", [11, 12])
def test_correct_folds_in_both_branches_hold_for_either_condition(tmp_path: Path, seed: int, external: bool,
                                                                  expose: bool) -> None:
    generated = if_model(seed, channels=3, cond="input", expose=expose)
    path = _save(generated.model, tmp_path, external=external)
    report = _fold(path, batch=3, trials=2)
    assert report.exit_code == 0 and report.written
    assert sorted(body.label for body in report.verification.bodies) == sorted(generated.folds)
    assert all(body.passed and len(body.outputs) == 1 for body in report.verification.bodies)
    else_inputs = {value.name: value for value in next(
        body for body in report.verification.bodies if body.label == "If 'branch' else_branch").inputs}
    assert set(else_inputs) == {"conv0_out", "x"}  # outer runtime values; the outer weights are constants
    assert else_inputs["x"].shape == (3, 3, 6, 6) and else_inputs["x"].source == "input of the model"
    folded = report.output
    assert count_ops(onnx.load(str(folded)), BN) == 0
    for batch in (2, 5):
        for condition in (True, False):
            _assert_same_outputs(path, folded, {"x": _images(batch, 3, 6), "cond": np.array(condition)})


@pytest.mark.parametrize("trips", [0, 3])
def test_loop_body_folds_are_verified_whatever_the_trip_count(tmp_path: Path, trips: int) -> None:
    generated = loop_model(seed=6, channels=2, trips=trips)
    path = _save(generated.model, tmp_path)
    report = _fold(path)
    assert report.exit_code == 0
    [body] = report.verification.bodies
    assert body.label == "Loop 'repeat' body" and body.passed
    sources = {value.name: value.source for value in body.inputs}
    assert sources["i"] == sources["carried"] == "first run of Loop 'repeat'"
    assert sources["relu0_out"] == "computed by the model"
    _assert_same_outputs(path, report.output, {"x": _images(4, 2, 5)})


@pytest.mark.parametrize(("axis", "reverse"), [(0, False), (0, True), (1, False)])
def test_scan_body_folds_are_verified_on_a_slice(tmp_path: Path, axis: int, reverse: bool) -> None:
    generated = scan_model(seed=8, channels=3, axis=axis, reverse=reverse)
    path = _save(generated.model, tmp_path)
    report = _fold(path, batch=2)
    assert report.exit_code == 0
    [body] = report.verification.bodies
    item = next(value for value in body.inputs if value.name == "item")
    assert item.shape == (2, 3, 4, 4) if axis == 1 else len(item.shape) == 4
    rng = np.random.default_rng(0)
    shape = (5, 3, 3, 4, 4) if axis == 0 else (3, 5, 3, 4, 4)
    feeds = {"sequence": rng.standard_normal(shape).astype(np.float32),
             "state": rng.standard_normal((3, 3, 4, 4)).astype(np.float32)}
    _assert_same_outputs(path, report.output, feeds)


def test_if_nested_in_a_loop_body_is_verified_on_values_the_loop_computes(tmp_path: Path) -> None:
    generated = nested_model(seed=9, channels=2)
    path = _save(generated.model, tmp_path)
    report = _fold(path)
    assert report.exit_code == 0
    assert sorted(body.label for body in report.verification.bodies) == sorted(generated.folds)
    for body in report.verification.bodies:
        assert {value.source for value in body.inputs} == {"computed by Loop 'repeat' body"}
    _assert_same_outputs(path, report.output, {"x": _images(3, 2, 5)})


# -- bodies that cannot be verified on their own ------------------------------------------------


def test_a_body_that_cannot_run_on_its_own_keeps_its_batchnorms_with_the_reason(tmp_path: Path) -> None:
    generated = sequence_branch_model(seed=13, channels=3)
    path = _save(generated.model, tmp_path)
    report = _fold(path)
    assert report.exit_code == 0 and report.status == "equivalent"
    then_bn, _ = generated.folds["If 'branch' then_branch"]
    else_bn, _ = generated.folds["If 'branch' else_branch"]
    [left] = report.left
    assert left.batchnorm == then_bn and UNVERIFIABLE in left.reason and "not a tensor" in left.reason
    assert [fold.batchnorm for fold in report.folds] == [else_bn]
    # The else branch reads a value whose rank shape inference cannot tell: its real value is used.
    [body] = report.verification.bodies
    assert body.label == "If 'branch' else_branch" and body.passed
    [unverified] = report.verification.unverified_bodies
    assert unverified.label == "If 'branch' then_branch" and unverified.withheld == (then_bn,)
    assert count_ops(onnx.load(str(report.output)), BN) == 1
    for condition in (True, False):
        _assert_same_outputs(path, report.output, {"x": _images(2, 3, 6), "cond": np.array(condition)})


def test_a_branch_returning_a_sequence_keeps_its_batchnorms(tmp_path: Path) -> None:
    """Both branches fold a Conv→BN and return it wrapped in a sequence: their outputs cannot be
    compared as tensors, so neither is verified on its own and no fold is applied."""
    b = GraphBuilder(seed=19)
    x = b.input("x", ["N", 2, 4, 4])
    condition = b.input("cond", [], TensorProto.BOOL)
    branches = {}
    for where in ("then", "else"):
        with b.collecting() as (nodes, initializers):
            out, _, _ = _conv_bn(b, x, 2)
            wrapped = b.node("SequenceConstruct", [out])
        sequence_type = helper.make_tensor_sequence_value_info(wrapped, TensorProto.FLOAT, None)
        branches[f"{where}_branch"] = helper.make_graph(nodes, where, [], [sequence_type], initializers)
    b.nodes.append(helper.make_node("If", [condition], ["wrapped"], name="branch", **branches))
    b.nodes.append(helper.make_node("SequenceAt", ["wrapped", b.const("at", np.array(0, np.int64))], ["y"]))
    b.output("y", ["N", 2, 4, 4])
    report = _fold(_save(b.model(), tmp_path))
    assert report.exit_code == 0 and report.folds == [] and len(report.left) == 2
    assert all(UNVERIFIABLE in left.reason and "is not a tensor" in left.reason for left in report.left)


def test_a_body_that_differs_from_itself_keeps_its_batchnorms_and_blames_nothing(tmp_path: Path) -> None:
    """Conv→BN then random noise in the branch a trial may take: run on its own twice, that branch
    disagrees with itself, so its fold cannot be verified and is not applied; the rest is."""
    b = GraphBuilder(seed=20)
    x = b.input("x", ["N", 2, 4, 4])
    condition = b.input("cond", [], TensorProto.BOOL)
    top = b.node("Relu", [b.batchnorm(b.conv(x, 2, 2), 2)])
    with b.collecting() as (then_nodes, then_initializers):
        noisy_bn = b.batchnorm(b.conv(top, 2, 2), 2)
        noisy = b.node("Add", [noisy_bn, b.node("RandomNormalLike", [noisy_bn])])
    with b.collecting() as (else_nodes, _):
        quiet = b.node("Neg", [top])
    b.nodes.append(helper.make_node(
        "If", [condition], ["y"], name="branch",
        then_branch=helper.make_graph(then_nodes, "then", [], [_value(noisy, ["N", 2, 4, 4])], then_initializers),
        else_branch=helper.make_graph(else_nodes, "else", [], [_value(quiet, ["N", 2, 4, 4])]),
    ))
    b.output("y", ["N", 2, 4, 4])
    report = _fold(_save(b.model(), tmp_path), trials=3)
    assert report.exit_code == 0 and report.attribution is None
    assert [fold.batchnorm for fold in report.folds] == ["batchnormalization0"]
    [left] = report.left
    assert left.batchnorm.startswith("If 'branch' then_branch / ") and "not deterministic" in left.reason


def test_no_verify_still_folds_every_body(tmp_path: Path) -> None:
    generated = sequence_branch_model(seed=14, channels=2)
    report = _fold(_save(generated.model, tmp_path), verify=False)
    assert report.status == "unverified" and report.left == [] and len(report.folds) == 2


def _function_in_a_branch_model(seed: int) -> onnx.ModelProto:
    """A model-local function with Conv→BN, called only inside an If branch."""
    b = GraphBuilder(seed=seed)
    with b.collecting() as (function_nodes, _):
        weight = b.random("Wf", [2, 2, 1, 1], as_node=True)
        out = b.batchnorm(b.node("Conv", ["inp", weight]), 2, constant_nodes=True)
    block = helper.make_function("local", "Block", ["inp"], [out], function_nodes,
                                 opset_imports=[helper.make_opsetid("", 17)])
    x = b.input("x", ["N", 2, 4, 4])
    condition = b.input("cond", [], TensorProto.BOOL)
    then_branch = helper.make_graph([helper.make_node("Block", [x], ["called"], domain="local", name="call")],
                                    "then", [], [_value("called")])
    else_branch = helper.make_graph([helper.make_node("Neg", [x], ["negated"])], "else", [], [_value("negated")])
    b.nodes.append(helper.make_node("If", [condition], ["y"], name="branch", then_branch=then_branch,
                                    else_branch=else_branch))
    graph = helper.make_graph(b.nodes, "main", b.inputs, [_value("y", ["N", 2, 4, 4])], b.initializers)
    return helper.make_model(graph, functions=[block], ir_version=DEFAULT_IR_VERSION,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])


def test_a_function_no_trial_is_sure_to_run_keeps_its_batchnorms(tmp_path: Path) -> None:
    report = _fold(_save(_function_in_a_branch_model(15), tmp_path))
    assert report.exit_code == 0 and report.folds == []
    [left] = report.left
    assert left.batchnorm.startswith("function 'Block' / ") and "does not call it" in left.reason


# -- reports ------------------------------------------------------------------------------------


def test_json_report_lists_the_bodies_verified_and_not(tmp_path: Path) -> None:
    generated = sequence_branch_model(seed=16, channels=2)
    document = json.loads(dump_json(_fold(_save(generated.model, tmp_path)).to_dict()))
    [body] = document["verification"]["bodies"]
    assert body["label"] == "If 'branch' else_branch" and body["passed"] is True
    assert body["outputs"][0]["passed"] is True
    assert {value["source"] for value in body["inputs"]} == {"computed by the model", "input of the model"}
    [unverified] = document["verification"]["unverified_bodies"]
    assert unverified["label"] == "If 'branch' then_branch" and "not a tensor" in unverified["reason"]


def test_cli_shows_bodies_and_exits_by_them(tmp_path: Path) -> None:
    path = _save(if_model(17, channels=2, cond="never").model, tmp_path)
    result = run_cli(path, "--batch", "2", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "If 'branch' then_branch, verified on its own" in result.stdout
    assert "If 'branch' else_branch, verified on its own" in result.stdout


def test_installed_cli_withholds_unverifiable_body_and_verifies_the_rest(tmp_path: Path) -> None:
    executable = shutil.which("bnfold") or str(Path(sys.executable).with_name("bnfold"))
    path = _save(sequence_branch_model(seed=18, channels=3).model, tmp_path)
    completed = subprocess.run([executable, str(path), "--batch", "4", "--json", "-"],
                               capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    assert document["status"] == "equivalent" and len(document["folds"]) == 1
    [left] = document["left"]
    assert UNVERIFIABLE in left["reason"]
    assert [body["label"] for body in document["verification"]["bodies"]] == ["If 'branch' else_branch"]
    written = Path(document["output"])
    for condition in (True, False):
        _assert_same_outputs(path, written, {"x": _images(4, 3, 6), "cond": np.array(condition)})


@pytest.mark.parametrize("else_reads_the_outer_weight", [True, False])
def test_a_branch_that_redefines_an_outer_name_is_left_as_it_is(tmp_path: Path,
                                                                else_reads_the_outer_weight: bool) -> None:
    """A then-branch with its own initializer 'W', named like the main graph's: the checker
    accepts it, but onnxruntime reads the outer 'W' in the branch. A fold into the branch's own
    'W' would change nothing that runs while claiming a fold; the branch is left with the reason,
    and the main graph's fold keeps the branch's reads intact."""
    b = GraphBuilder(seed=17)
    x = b.input("x", ["N", 3, 5, 5])
    condition = b.input("cond", [], TensorProto.BOOL)
    outer_weight = b.random("W", [3, 3, 3, 3])
    top = b.batchnorm(b.node("Conv", [x, outer_weight], pads=[1] * 4), 3)
    with b.collecting() as (then_nodes, then_initializers):
        inner_weight = b.random("W_inner", [3, 3, 3, 3])
        then_out = b.batchnorm(b.node("Conv", [x, inner_weight], pads=[1] * 4), 3)
    for tensor in then_initializers:
        if tensor.name == inner_weight:
            tensor.name = outer_weight
    then_nodes[0].input[1] = outer_weight
    with b.collecting() as (else_nodes, _):
        else_out = b.node("Relu", [b.node("Conv", [x, outer_weight], pads=[1] * 4)
                                   if else_reads_the_outer_weight else x])
    b.nodes.append(helper.make_node(
        "If", [condition], ["y"], name="branch",
        then_branch=helper.make_graph(then_nodes, "then", [], [_value(then_out)], then_initializers),
        else_branch=helper.make_graph(else_nodes, "else", [], [_value(else_out)]),
    ))
    b.output(top, ["N", 3, 5, 5])
    b.output("y", ["N", 3, 5, 5])
    model = b.model()
    onnx.checker.check_model(model, full_check=True)
    path = _save(model, tmp_path)
    report = _fold(path, batch=2)
    assert report.exit_code == 0 and report.written
    [left] = report.left
    assert left.batchnorm.startswith("If 'branch' then_branch") and f"redefines '{outer_weight}'" in left.reason
    for batch in (1, 3):
        for condition_value in (True, False):
            _assert_same_outputs(path, report.output, {"x": _images(batch, 3, 5), "cond": np.array(condition_value)})
