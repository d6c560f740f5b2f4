"""Error attribution: a broken fold is named, with its error, in the report and the JSON.

The broken rule is injected through ``FoldOptions.rules``: a Conv rule that
corrupts the folded weight of chosen Convs only, so the other folds stay correct
and the search must single the bad ones out.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from rich.console import Console

from bnfold import fold_math
from bnfold.fold import fold_batchnorms
from bnfold.graph import GraphIndex
from bnfold.pipeline import FoldOptions, fold_file
from bnfold.report import dump_json, quiet_fold_line, render_fold_report
from bnfold.rules import Affine, Refusal, build_rules
from bnfold.rules.base import Absorbed
from bnfold.rules.conv import ConvBn
from bnfold.rules.gemm import GemmBn
from sample_models.generate import cnn_residual
from sample_models.modelkit import GraphBuilder
from tests.support import op_count


class CorruptingConvRule(ConvBn):
    """Folds like the Conv rule, but adds 1 to one weight element of the ``victims``."""

    name = "conv-bn-corrupting"

    def __init__(self, victims: set[str]) -> None:
        self.victims = victims

    def absorb(self, producer: onnx.NodeProto, affine: Affine, graph: GraphIndex) -> Absorbed | Refusal:
        absorbed = super().absorb(producer, affine, graph)
        if isinstance(absorbed, Refusal) or producer.name not in self.victims:
            return absorbed
        weight = absorbed.updates[0].values.copy()
        weight.flat[0] += 1.0
        return replace(absorbed, updates=[replace(absorbed.updates[0], values=weight), *absorbed.updates[1:]])


def _save(model: onnx.ModelProto, folder: Path) -> Path:
    path = folder / "model.onnx"
    onnx.save(model, path)
    return path


def _fold_with(victims: set[str], tmp_path: Path):  # noqa: ANN202 - FoldReport
    path = _save(cnn_residual(), tmp_path)
    rules = build_rules(backward=(CorruptingConvRule(victims), GemmBn()))
    return fold_file(path, FoldOptions(rules=rules)), path


def test_one_broken_fold_is_named_with_its_error(tmp_path: Path) -> None:
    report, path = _fold_with({"conv2"}, tmp_path)
    assert report.exit_code == 1 and not report.written
    assert not path.with_name("model.folded.onnx").exists()
    assert len(report.folds) == 6
    [guilty] = report.attribution.guilty
    assert guilty.batchnorms == ("batchnormalization2",)
    assert guilty.targets == ("Conv 'conv2'",)
    assert guilty.rules == ("conv-bn-corrupting",)
    assert guilty.mismatches > 0 and guilty.max_abs_error > 1e-3
    # The guilty fold alone gives an error no larger than all folds together (nothing else is wrong).
    assert guilty.max_abs_error == pytest.approx(report.verification.outputs[0].max_abs_error, rel=1e-6)
    # Bisection: far fewer partial verifications than re-folding one by one would need
    # at worst, and more than zero.
    assert 1 <= report.attribution.verifications <= 6


def test_two_broken_folds_are_both_found(tmp_path: Path) -> None:
    report, _ = _fold_with({"conv0", "conv4"}, tmp_path)
    assert report.exit_code == 1
    found = sorted(g.batchnorms for g in report.attribution.guilty)
    assert found == [("batchnormalization0",), ("batchnormalization4",)]


def test_attribution_is_in_the_json_report(tmp_path: Path) -> None:
    report, _ = _fold_with({"conv3"}, tmp_path)
    document = json.loads(dump_json(report.to_dict()))
    assert document["status"] == "not-equivalent"
    [guilty] = document["attribution"]["guilty"]
    assert guilty["batchnorms"] == ["batchnormalization3"]
    assert guilty["targets"] == ["Conv 'conv3'"]
    assert guilty["max_abs_error"] > 1e-3


def test_no_attribution_when_equivalent(tmp_path: Path) -> None:
    report = fold_file(_save(cnn_residual(), tmp_path), FoldOptions())
    assert report.exit_code == 0 and report.attribution is None


def test_may_fold_restricts_folding_to_the_named_batchnorms() -> None:
    model = cnn_residual()
    outcome = fold_batchnorms(model, may_fold={"batchnormalization1", "batchnormalization5"}.__contains__)
    assert sorted(f.batchnorm for f in outcome.folds) == ["batchnormalization1", "batchnormalization5"]
    assert op_count(model, "BatchNormalization") == 4
    assert outcome.left == []


def test_each_fold_reports_its_weight_change_and_rounding_error() -> None:
    b = GraphBuilder(seed=3)
    x = b.input("x", [1, 3, 6, 6])
    b.output(b.batchnorm(b.conv(x, 3, 4), 4))
    model = b.model()
    index = GraphIndex(model)
    conv, bn_node = model.graph.node
    weight = index.constant_value(conv.input[1])
    gamma, beta, mean, var = (index.constant_value(name) for name in bn_node.input[1:])
    s, _ = fold_math.batchnorm_affine(gamma, beta, mean, var, 1e-5)
    exact = weight.astype(np.float64) * s[:, None, None, None]

    [record] = fold_batchnorms(model).folds
    assert record.max_relative_weight_change == pytest.approx(float(np.max(np.abs(s - 1))), rel=1e-9)
    rounding = float(np.max(np.abs(exact.astype(np.float32).astype(np.float64) - exact)))
    assert record.max_rounding_error >= rounding > 0
    assert record.max_rounding_error <= np.finfo(np.float32).eps * 4  # a float32 cast, not a bug


def test_human_report_and_quiet_line_name_the_broken_fold(tmp_path: Path) -> None:
    report, _ = _fold_with({"conv1"}, tmp_path)
    assert quiet_fold_line(report).endswith("; broken by batchnormalization1 → Conv 'conv1'")
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render_fold_report(report))
    text = console.export_text()
    assert "Broken by" in text and "conv-bn-corrupting" in text
