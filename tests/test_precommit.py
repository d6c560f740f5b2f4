"""``bnfold-precommit``: pairs of X.onnx / X.folded.onnx, folded only when out of date, checked whichever changed.

These run the hook's command in-process (fast); tests/test_precommit_hooks.py runs
the same hooks through pre-commit itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner, Result

from bnfold import pipeline
from bnfold.io.save import _STAGING_NAME
from bnfold.precommit import ModelPair, install_if_changed, main, model_pairs
from sample_models import generate
from tests.support import shift_first_weight, write_model_onnxruntime_cannot_run
from tests.test_cli import corrupting_fold
from tests.test_packaged_classes import overridable_weights

# One sample per class of model: Conv stack, Gemm MLP, ConvTranspose, decomposed
# Mul/Add affines, and a model where some BNs cannot be folded.
SAMPLES: dict[str, Callable[[], onnx.ModelProto]] = {
    "cnn_residual": generate.cnn_residual,
    "mlp_gemm_bn": generate.mlp_gemm_bn,
    "convtranspose_decoder": generate.convtranspose_decoder,
    "tf_style_decomposed": generate.tf_style_decomposed,
    "refused_bn": generate.refused_bn,
}


def hook(*arguments: str | Path) -> Result:
    return CliRunner().invoke(main, [str(argument) for argument in arguments])


def folded_path(model: Path) -> Path:
    return model.with_name(model.name.removesuffix(".onnx") + ".folded.onnx")


def stamp(path: Path) -> tuple[bytes, int]:
    """A file's bytes and modification time: both unchanged means it was not rewritten."""
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.fixture
def cnn(tmp_path: Path) -> Path:
    path = tmp_path / "cnn.onnx"
    onnx.save(generate.cnn_residual(), path)
    return path


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(generate.mlp_gemm_bn(), path)
    return path


def test_each_file_stands_for_its_pair_and_each_pair_comes_once() -> None:
    files = [Path("m/a.onnx"), Path("b.folded.onnx"), Path("m/a.folded.onnx"), Path("m/./a.onnx"), Path("b.onnx")]
    assert model_pairs(files) == [
        ModelPair(Path("m/a.onnx"), Path("m/a.folded.onnx")),
        ModelPair(Path("b.onnx"), Path("b.folded.onnx")),
    ]
    assert model_pairs([]) == []


def test_identical_output_leaves_the_target_untouched(tmp_path: Path) -> None:
    fresh, target = tmp_path / "fresh" / "m.folded.onnx", tmp_path / "m.folded.onnx"
    fresh.parent.mkdir()
    fresh.write_bytes(b"model")
    target.write_bytes(b"model")
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    assert install_if_changed(fresh, target) == []
    assert stamp(target) == (b"model", 1_000_000_000)


def test_different_or_missing_output_is_moved_into_place(tmp_path: Path) -> None:
    fresh, target = tmp_path / "fresh" / "m.folded.onnx", tmp_path / "m.folded.onnx"
    fresh.parent.mkdir()
    fresh.write_bytes(b"new model")
    assert install_if_changed(fresh, target) == [target]
    assert target.read_bytes() == b"new model" and not fresh.exists()
    fresh.write_bytes(b"newer model")
    assert install_if_changed(fresh, target) == [target] and target.read_bytes() == b"newer model"


def test_a_data_file_alone_differing_rewrites_model_and_data(tmp_path: Path) -> None:
    fresh, target = tmp_path / "fresh" / "m.folded.onnx", tmp_path / "m.folded.onnx"
    fresh.parent.mkdir()
    for folder, weights in ((fresh.parent, b"new weights"), (tmp_path, b"old weights")):
        (folder / "m.folded.onnx").write_bytes(b"model")
        (folder / "m.folded.onnx.data").write_bytes(weights)
    data = tmp_path / "m.folded.onnx.data"
    assert install_if_changed(fresh, target) == [target, data]
    assert data.read_bytes() == b"new weights" and target.read_bytes() == b"model"


@pytest.mark.parametrize("name", SAMPLES)
def test_fold_hook_creates_then_leaves_an_up_to_date_file_alone(tmp_path: Path, name: str) -> None:
    model = tmp_path / f"{name}.onnx"
    onnx.save(SAMPLES[name](), model)
    created = hook("fold", model)
    assert created.exit_code == 1, created.output
    assert created.stdout.splitlines()[0].endswith("; created")
    assert f"git add {folded_path(model)}" in created.stdout
    before = stamp(folded_path(model))
    again = hook("fold", model, folded_path(model))
    assert again.exit_code == 0, again.output
    assert again.stdout.splitlines() == [again.stdout.strip()] and again.stdout.strip().endswith("; up to date")
    assert stamp(folded_path(model)) == before
    assert hook("check", folded_path(model)).exit_code == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([model.name, folded_path(model).name])


def test_fold_hook_is_byte_deterministic_across_processes(cnn: Path) -> None:
    """Each process has its own string-hash seed: a fold depending on set or dict-of-hash
    order would rewrite the file on every commit."""
    script = Path(sys.executable).with_name("bnfold-precommit")

    def fold_with_hash_seed(seed: str) -> int:
        environment = dict(os.environ, PYTHONHASHSEED=seed)
        return subprocess.run([str(script), "fold", str(cnn)], env=environment, capture_output=True).returncode

    assert fold_with_hash_seed("1") == 1
    first = stamp(folded_path(cnn))
    assert fold_with_hash_seed("2") == 0
    assert stamp(folded_path(cnn)) == first


def test_fold_hook_rewrites_a_stale_folded_model(cnn: Path) -> None:
    assert hook("fold", cnn).exit_code == 1
    stale = folded_path(cnn).read_bytes()
    shift_first_weight(cnn, 0.5)
    result = hook("fold", "--trials", "2", cnn)
    assert result.exit_code == 1, result.output
    assert result.stdout.splitlines()[0].endswith("; updated")
    assert folded_path(cnn).read_bytes() != stale
    assert hook("check", cnn).exit_code == 0


def test_a_fold_that_is_not_equivalent_fails_and_writes_nothing(cnn: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hook("fold", cnn).exit_code == 1
    shift_first_weight(cnn, 0.5)
    before = stamp(folded_path(cnn))
    monkeypatch.setattr(pipeline, "fold_batchnorms", corrupting_fold)
    result = hook("fold", cnn)
    assert result.exit_code == 1
    assert "not written" in result.stdout and "not-equivalent" in result.stdout and "git add" not in result.stdout
    assert stamp(folded_path(cnn)) == before
    assert sorted(path.name for path in cnn.parent.iterdir()) == ["cnn.folded.onnx", "cnn.onnx"]


def test_external_data_models_compare_their_data_files_too(cnn: Path) -> None:
    onnx.save_model(onnx.load(cnn), cnn, save_as_external_data=True, location="cnn.weights", size_threshold=0)
    data = cnn.with_name("cnn.folded.onnx.data")
    created = hook("fold", cnn)
    assert created.exit_code == 1, created.output
    assert f"git add {folded_path(cnn)} {data}" in created.stdout
    before = stamp(folded_path(cnn)), stamp(data)
    assert hook("fold", cnn).exit_code == 0
    assert (stamp(folded_path(cnn)), stamp(data)) == before
    data.write_bytes(b"\0" + data.read_bytes()[1:])  # damaged weights, model file intact
    repaired = hook("fold", cnn)
    assert repaired.exit_code == 1 and repaired.stdout.splitlines()[0].endswith("; updated")
    assert data.read_bytes() == before[1][0]


def test_fold_hook_refuses_to_overwrite_the_originals_data_file(cnn: Path) -> None:
    onnx.save_model(onnx.load(cnn), cnn, save_as_external_data=True, location="cnn.folded.onnx.data",
                    size_threshold=0)
    weights = stamp(cnn.with_name("cnn.folded.onnx.data"))
    result = hook("fold", cnn)
    assert result.exit_code == 2
    assert result.stderr.startswith("bnfold: error: ") and "is the input's external data" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert stamp(cnn.with_name("cnn.folded.onnx.data")) == weights and not folded_path(cnn).exists()


def test_check_hook_runs_whichever_file_of_the_pair_changed(cnn: Path, mlp: Path) -> None:
    assert hook("fold", cnn, mlp).exit_code == 1
    shift_first_weight(mlp, 0.5)  # the original changed, its folded model is stale
    result = hook("check", cnn, folded_path(cnn), mlp)
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert len(lines) == 2  # the cnn pair, named twice, is checked once
    assert f"{cnn} vs {folded_path(cnn)}: equivalent" in lines[0]
    assert f"{mlp} vs {folded_path(mlp)}: not-equivalent" in lines[1]
    assert hook("check", folded_path(mlp)).exit_code == 1
    # The hook's args come first and reach every pair.
    assert hook("check", "--atol", "100", mlp).exit_code == 0


def test_check_hook_fails_when_either_file_of_a_pair_is_missing(cnn: Path, mlp: Path) -> None:
    orphan = folded_path(mlp)
    orphan.write_bytes(mlp.read_bytes())
    mlp.unlink()
    result = hook("check", cnn, orphan)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"bnfold: error: {folded_path(cnn)}: no such file; run `bnfold {cnn}` to create it",
        f"bnfold: error: {mlp}: no such file (the original of {orphan})",
    ]
    assert hook("fold", orphan).exit_code == 2 and not mlp.exists()


def test_every_failure_is_one_line_and_the_worst_code_wins(tmp_path: Path, cnn: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    unrunnable = write_model_onnxruntime_cannot_run(tmp_path / "custom.onnx")
    folded = hook("fold", junk, cnn, unrunnable)
    assert folded.exit_code == 3
    errors = folded.stderr.splitlines()
    assert len(errors) == 2 and all(line.startswith("bnfold: error: ") for line in errors)
    assert f"{junk}: not an ONNX model" in errors[0] and "onnxruntime cannot load" in errors[1]
    assert folded.stdout.splitlines()[0].endswith("; created") and "Traceback" not in folded.output
    checked = hook("check", junk, cnn)
    assert checked.exit_code == 2 and len(checked.stderr.splitlines()) == 1


def test_the_hooks_refuse_json_and_check_their_options_once(cnn: Path) -> None:
    refused = hook("check", "--json", "-", cnn)
    assert refused.exit_code == 2 and "JSON report" in refused.stderr
    bad_option = hook("fold", "--trials", "0", cnn, cnn.with_name("other.onnx"))
    assert bad_option.exit_code == 2 and bad_option.stderr.count("--trials must be at least 1") == 1
    assert not folded_path(cnn).exists()


def test_an_interrupted_fold_leaves_neither_scratch_nor_partial_output(
    cnn: Path, mlp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    assert hook("fold", cnn).exit_code == 1
    monkeypatch.setattr(pipeline, "verify_equivalence", interrupted)
    result = hook("fold", cnn, mlp)
    assert result.exit_code == 130
    assert result.stderr.splitlines() == ["bnfold: interrupted; no partial output was left"]
    assert sorted(path.name for path in cnn.parent.iterdir()) == ["cnn.folded.onnx", "cnn.onnx", "mlp.onnx"]


def test_fold_hook_keeps_overridable_initializers_when_asked(tmp_path: Path) -> None:
    """Weights also listed as graph inputs fold by default; with --keep-overridable the hook
    writes a folded file that folds nothing reading them, and the check hook accepts both."""
    model = tmp_path / "exported.onnx"
    onnx.save(overridable_weights(3).model, model)
    kept = hook("fold", "--keep-overridable", model)
    assert kept.exit_code == 1, kept.output
    written = onnx.load(str(folded_path(model)))
    assert [node.op_type for node in written.graph.node].count("BatchNormalization") == sum(
        node.op_type == "BatchNormalization" for node in onnx.load(str(model)).graph.node) > 0
    assert hook("check", model).exit_code == 0
    folded = hook("fold", model)
    assert folded.exit_code == 1, folded.output
    assert not any(node.op_type == "BatchNormalization" for node in onnx.load(str(folded_path(model))).graph.node)


def test_the_scratch_folder_is_named_so_that_a_later_run_removes_it_after_a_kill(
    cnn: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hook killed outright leaves its scratch folder: named as staging folders are, the
    next run's cleanup finds it (its process is gone)."""
    seen: list[Path] = []

    def record(model: Path, options: pipeline.FoldOptions) -> pipeline.FoldReport:
        assert options.output is not None
        seen.append(options.output.parent)
        raise KeyboardInterrupt

    monkeypatch.setattr("bnfold.precommit.fold_file", record)
    assert hook("fold", cnn).exit_code == 130
    assert _STAGING_NAME.fullmatch(seen[0].name) and not seen[0].exists()
