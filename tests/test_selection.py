"""``--skip PATTERN`` / ``--only PATTERN``: BNs kept out of the fold are reported as left
with the pattern that kept them; a pattern matching no BN stops the run before writing."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import bnfold
from bnfold.errors import InputError
from bnfold.precommit import main as hook
from sample_models.modelkit import GraphBuilder
from tests.installed import REPOSITORY
from tests.support import assert_one_line_error, op_count, run_cli, run_onnxruntime
from tests.test_subgraphs import _function_model, _if_model

BN = "BatchNormalization"


def conv_bn_stack(bn_names: list[str], seed: int = 0) -> onnx.ModelProto:
    """Conv → BN → Relu blocks, the i-th BN named ``bn_names[i]`` (its output ``<name>.out``)."""
    b = GraphBuilder(seed=seed)
    y = b.input("x", [1, 3, 6, 6])
    channels = 3
    for name in bn_names:
        y = b.batchnorm(b.conv(y, channels, 4), 4)
        bn = b.nodes[-1]
        bn.name = name
        bn.output[0] = f"{name}.out"
        y = b.node("Relu", [bn.output[0]])
        channels = 4
    b.output(y, [1, 4, 6, 6])
    return b.model()


def assert_equivalent(original: onnx.ModelProto, folded: onnx.ModelProto) -> None:
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 6, 6)).astype(np.float32)}
    for expected, actual in zip(run_onnxruntime(original, feeds), run_onnxruntime(folded, feeds), strict=True):
        np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=1e-3)


NAMES = st.lists(st.from_regex(r"/stage[0-3]/block[0-9]/(bn|norm)[12]", fullmatch=True), min_size=1, max_size=5,
                 unique=True)
PATTERNS = st.sampled_from(["*/bn1", "/stage0/*", "*norm*", "/stage[12]/block?/bn?", "*block[0-4]*"])


@settings(max_examples=12)
@given(names=NAMES, pattern=PATTERNS, mode=st.sampled_from(["skip", "only"]))
def test_exactly_the_selected_bns_fold_and_the_others_are_left_with_the_pattern(
    names: list[str], pattern: str, mode: str
) -> None:
    model = conv_bn_stack(names)
    matching = {name for name in names if fnmatch.fnmatchcase(name, pattern)}
    if not matching:
        with pytest.raises(InputError) as refused:
            bnfold.fold(model, **{mode: pattern})
        assert f"--{mode} {pattern} matches no BatchNormalization" in str(refused.value)
        assert all(name in str(refused.value) for name in names)
        return
    result = bnfold.fold(model, **{mode: pattern})
    kept = matching if mode == "skip" else set(names) - matching
    assert {record.batchnorm for record in result.report.left} == kept
    assert {fold.batchnorm for fold in result.report.folds} == set(names) - kept
    reason = f"skipped by --skip {pattern}" if mode == "skip" else f"not selected by --only {pattern}"
    assert all(record.reason == reason for record in result.report.left)
    assert result.model is not None and op_count(result.model, BN) == len(kept)
    assert result.report.passed
    assert_equivalent(model, result.model)


def test_a_pattern_matches_the_output_name_too_and_several_patterns_combine() -> None:
    model = conv_bn_stack(["a", "b", "c"])
    result = bnfold.fold(model, skip=["b.out", "c"])
    assert [record.batchnorm for record in result.report.left] == ["b", "c"]
    assert [record.reason for record in result.report.left] == ["skipped by --skip b.out", "skipped by --skip c"]
    only = bnfold.fold(model, only=("a", "c"))
    assert [(record.batchnorm, record.reason) for record in only.report.left] == [
        ("b", "not selected by --only a / --only c")
    ]


def test_skip_wins_over_only_for_a_bn_both_name() -> None:
    result = bnfold.fold(conv_bn_stack(["a", "b"]), only="*", skip="a")
    assert [(record.batchnorm, record.reason) for record in result.report.left] == [("a", "skipped by --skip a")]


def test_bns_in_if_branches_and_functions_match_on_their_own_node_name() -> None:
    branches = bnfold.fold(_if_model(), skip="batchnormalization1")
    assert [(r.batchnorm, r.reason) for r in branches.report.left] == [
        ("If 'branch' else_branch / batchnormalization1", "skipped by --skip batchnormalization1")
    ]
    assert [fold.batchnorm for fold in branches.report.folds] == ["If 'branch' then_branch / batchnormalization0"]
    # The function takes a weight from its caller, so it is inlined (its nodes renamed name__1);
    # a pattern still matches the name a BN had in the function.
    functions = bnfold.fold(_function_model(), only="batchnormalization1")
    assert functions.report.inlined_functions == ["Block"]
    (left,) = functions.report.left
    assert left.batchnorm.startswith("batchnormalization0") and left.reason == "not selected by --only batchnormalization1"
    (fold,) = functions.report.folds
    assert fold.batchnorm.startswith("batchnormalization1")


@pytest.fixture
def cnn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return Path(shutil.copy(REPOSITORY / "sample_models" / "cnn_residual.onnx", tmp_path / "cnn.onnx"))


def test_the_command_reports_skipped_bns_as_left_and_writes_a_verified_model(cnn: Path) -> None:
    result = run_cli(cnn.name, "--skip", "batchnormalization[13]", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["status"] == "equivalent"
    assert report["left"] == [
        {"batchnorm": "batchnormalization1", "reason": "skipped by --skip batchnormalization[13]"},
        {"batchnorm": "batchnormalization3", "reason": "skipped by --skip batchnormalization[13]"},
    ]
    assert op_count(onnx.load(cnn.with_name("cnn.folded.onnx")), BN) == 2


def test_a_pattern_matching_no_bn_is_an_error_naming_them_and_nothing_is_written(cnn: Path) -> None:
    result = run_cli(cnn.name, "--only", "conv*")
    assert_one_line_error(result, 2, "--only conv* matches no BatchNormalization",
                          "batchnormalization0, batchnormalization1")
    assert sorted(path.name for path in cnn.parent.iterdir()) == ["cnn.onnx"]


def test_each_model_of_a_batch_applies_the_selection_itself(cnn: Path) -> None:
    shutil.copy(REPOSITORY / "sample_models" / "mlp_gemm_bn.onnx", cnn.parent / "mlp.onnx")
    result = run_cli(cnn.name, "mlp.onnx", "--skip", "batchnormalization5", "--json", "-")
    document = json.loads(result.stdout)
    assert result.exit_code == 2
    cnn_result, mlp_result = document["models"]
    assert cnn_result["status"] == "equivalent"
    assert cnn_result["report"]["left"][0]["reason"] == "skipped by --skip batchnormalization5"
    assert mlp_result["status"] == "error" and "--skip batchnormalization5 matches no" in mlp_result["error"]
    assert not (cnn.parent / "mlp.folded.onnx").exists()


def test_the_pre_commit_fold_hook_takes_the_selection_too(cnn: Path) -> None:
    result = CliRunner().invoke(hook, ["fold", "--skip", "batchnormalization0", str(cnn)])
    assert result.exit_code == 1, result.output  # it wrote the folded file
    assert op_count(onnx.load(cnn.with_name("cnn.folded.onnx")), BN) == 1
