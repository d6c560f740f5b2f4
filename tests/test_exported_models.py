"""Models exported from PyTorch (``tests/fixtures/exported``), folded end to end.

The fixtures are written by ``tests/fixtures/exported/export_models.py`` (which needs
torch; these tests do not). Each is folded through :func:`bnfold.pipeline.fold_file`
with verification on, so onnxruntime compares the written file with the original.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import pytest

from bnfold.graph import subgraphs
from bnfold.pipeline import FoldOptions, VerifyOptions, fold_file
from bnfold.rules.batchnorm import is_batchnorm
from sample_models.modelkit import GraphBuilder
from tests.support import fold_and_compare

FIXTURES = Path(__file__).parent / "fixtures" / "exported"

VARIANTS = ("classic-11-keepbn", "classic-13-nofold", "classic-17", "classic-17-keepbn", "dynamo", "dynamo-noopt")

# BatchNormalization nodes that must stay, per fixture, and the kinds of reason they have
# (fragments of them, one of which each reason contains: other rules may add their own
# refusals to the sentence); every fixture not listed folds them all.
LEFT: dict[str, tuple[int, tuple[str, ...]]] = {
    # BN→ReLU→Conv pre-activation: the first BN reads the graph input, the second a Concat that
    # the next Concat reads too; a ReLU stands between each and the Conv. The final
    # BN→Flatten→Linear folds.
    **{f"densenet-{variant}": (2, ("no foldable neighbour", "output also feeds")) for variant in VARIANTS},
    # BatchNorm1d on [N, C, L] before a Linear over L: it scales rows, the Linear mixes columns.
    **{f"mlp-{variant}": (1, ("of a rank-3 tensor, but MatMul",))
       for variant in (*VARIANTS, "dynamo-noopt-fp64")},
}


def _batchnorm_count(graph: onnx.GraphProto) -> int:
    """BatchNormalization nodes in ``graph`` and every body nested in it."""
    return sum(is_batchnorm(node) + sum(_batchnorm_count(body) for _, body in subgraphs(node)) for node in graph.node)


def _model_batchnorms(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes the model runs: in its graphs, and in each call of its model-local
    functions (one function body may stand for several BNs)."""
    return _batchnorm_count(onnx.inliner.inline_local_functions(model).graph)


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.onnx")), ids=lambda path: path.stem)
def test_exported_model_folds_every_foldable_batchnorm(path: Path, tmp_path: Path) -> None:
    output = tmp_path / "folded.onnx"
    # A batch of 3 wherever the batch is symbolic: a fold that mixed samples would show.
    report = fold_file(path, FoldOptions(output=output, verify_options=VerifyOptions(batch=3)))

    assert report.status == "equivalent" and report.written and report.problem is None
    folded = onnx.load(output)
    onnx.checker.check_model(folded, full_check=True)
    left, reasons = LEFT.get(path.stem, (0, ()))
    assert _model_batchnorms(folded) == left == len(report.left)
    assert all(any(reason in record.reason for reason in reasons) for record in report.left)
    assert report.batchnorms_folded == _model_batchnorms(onnx.load(path)) - left


def test_exported_fixtures_are_present_and_small() -> None:
    paths = sorted(FIXTURES.glob("*.onnx"))
    assert len(paths) >= 40
    assert max(path.stat().st_size for path in paths) < 200_000


def test_dynamo_zero_bias_through_castlike_of_a_runtime_value_is_a_constant() -> None:
    """The dynamo exporter writes a missing Conv bias as ``Expand(CastLike(0, x), Shape(W)[:1])``.

    CastLike reads only the type of ``x``, so the bias is constant and the BN folds.
    """
    b = GraphBuilder(seed=3)
    x = b.input("x", [1, 3, 6, 6])
    weight = b.random("W", [4, 3, 3, 3])
    count = b.node("Shape", [weight], start=0, end=1)
    zero = b.node("CastLike", [b.const("zero", np.array(0.0, np.float32)), x])
    bias = b.node("Expand", [zero, count])
    b.output(b.batchnorm(b.node("Conv", [x, weight, bias], pads=[1, 1, 1, 1]), 4))
    check = fold_and_compare(b.model())

    assert [record.rule for record in check.outcome.folds] == ["conv-bn"]
    assert [node.op_type for node in check.folded.graph.node] == ["Conv"]
