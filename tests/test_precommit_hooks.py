"""The hooks of .pre-commit-hooks.yaml run by pre-commit itself, in a scratch git repository.

pre-commit installs the hooks the way a user's config does: it clones a repository
at a rev and pip-installs it into a virtualenv of its own. That costs a download
of bnfold's dependencies, paid once per test session: the hooks' repository is a
snapshot of this checkout as it is on disk (committed or not, as ``pre-commit
try-repo`` would take it), and every test shares one PRE_COMMIT_HOME.
(``try-repo`` itself is not used: it keeps its environments in a fresh temporary
folder, so every call would reinstall them.)

These tests are skipped only when pre-commit cannot install the hooks because the
package registry is unreachable; any other failure to install fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import shift_first_weight

CHECKOUT = Path(__file__).resolve().parent.parent
SAMPLES = CHECKOUT / "sample_models"


def _git(repository: Path, *arguments: str, environment: dict[str, str] | None = None) -> str:
    completed = subprocess.run(["git", *arguments], cwd=repository, capture_output=True, text=True, check=True,
                               env=environment or _environment())
    return completed.stdout.strip()


def _environment(**extra: str) -> dict[str, str]:
    """This process's environment without git's per-repository variables (set when the
    tests run inside a git hook), which would point every git call at the wrong repository."""
    kept = {name: value for name, value in os.environ.items() if not name.startswith("GIT_")}
    return {**kept, **extra}


def _new_repository(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _git(folder, "init", "-q")
    for key, value in (("user.name", "bnfold tests"), ("user.email", "tests@bnfold.invalid"),
                       ("commit.gpgsign", "false")):
        _git(folder, "config", key, value)
    return folder


def _snapshot_of_checkout(folder: Path) -> str:
    """Commit this checkout's files as they are on disk (tracked, and untracked but not
    ignored) into a new repository at ``folder``; its rev."""
    listed = _git(CHECKOUT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    _new_repository(folder)
    for name in filter(None, listed.split("\0")):
        source = CHECKOUT / name
        if source.is_file():  # a tracked file deleted on disk is listed but not copied
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)
    _git(folder, "add", "-A")
    _git(folder, "commit", "-q", "-m", "snapshot of the checkout under test")
    return _git(folder, "rev-parse", "HEAD")


def _registry_reachable(environment: dict[str, str]) -> bool:
    """Whether pip, configured as the hooks' install is, reaches the package registry:
    one lookup of the build backend the install needs first."""
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "setuptools", "--retries", "0", "--timeout", "15"],
        capture_output=True, env=environment,
    )
    return probe.returncode == 0


@dataclass(frozen=True)
class HookSource:
    """Where pre-commit gets bnfold's hooks from, and its environment with the shared home."""

    repository: Path
    rev: str
    environment: dict[str, str]

    def config(self, hook_args: Sequence[str] = ()) -> str:
        """A .pre-commit-config.yaml (JSON is YAML) using both hooks, each with ``hook_args``."""
        hooks = [{"id": hook, "args": list(hook_args)} for hook in ("bnfold-fold", "bnfold-check")]
        return json.dumps({"repos": [{"repo": str(self.repository), "rev": self.rev, "hooks": hooks}]}, indent=2)


def _pre_commit(repository: Path, source: HookSource, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pre_commit", *arguments, "--color", "never"], cwd=repository,
                          capture_output=True, text=True, env=source.environment)


@pytest.fixture(scope="session")
def hook_source(tmp_path_factory: pytest.TempPathFactory) -> HookSource:
    """The snapshot of this checkout with its hooks installed, once per session."""
    root = tmp_path_factory.mktemp("pre-commit")
    source = HookSource(root / "bnfold", _snapshot_of_checkout(root / "bnfold"),
                        _environment(PRE_COMMIT_HOME=str(root / "home")))
    installer = _new_repository(root / "installer")
    (installer / ".pre-commit-config.yaml").write_text(source.config())
    installed = _pre_commit(installer, source, "install-hooks")
    if installed.returncode != 0:
        if not _registry_reachable(source.environment):
            pytest.skip("pre-commit cannot install the hooks: the package registry is unreachable")
        pytest.fail(f"pre-commit install-hooks failed:\n{installed.stdout}{installed.stderr}")
    return source


@dataclass(frozen=True)
class Scratch:
    """A git repository using the hooks, with one model from sample_models/."""

    path: Path
    source: HookSource

    @property
    def model(self) -> Path:
        return self.path / "models" / "net.onnx"

    @property
    def folded(self) -> Path:
        return self.path / "models" / "net.folded.onnx"

    def use_hooks(self, hook_args: Sequence[str] = ()) -> None:
        (self.path / ".pre-commit-config.yaml").write_text(self.source.config(hook_args))

    def run(self, hook: str, *files: Path) -> subprocess.CompletedProcess[str]:
        """``pre-commit run HOOK --files FILES`` (``--all-files`` when none are given)."""
        selection = ["--files", *(str(file.relative_to(self.path)) for file in files)] if files else ["--all-files"]
        return _pre_commit(self.path, self.source, "run", hook, *selection)

    def git(self, *arguments: str) -> str:
        """git in the repository, with pre-commit's shared home for the hooks a commit runs."""
        return _git(self.path, *arguments, environment=self.source.environment)


@pytest.fixture
def scratch(tmp_path: Path, hook_source: HookSource) -> Scratch:
    repository = Scratch(_new_repository(tmp_path / "project"), hook_source)
    repository.use_hooks()
    repository.model.parent.mkdir()
    shutil.copy(SAMPLES / "cnn_residual.onnx", repository.model)
    repository.git("add", "-A")
    return repository


def _stamp(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def test_fold_hook_creates_the_folded_model_then_passes_and_leaves_it_alone(scratch: Scratch) -> None:
    created = scratch.run("bnfold-fold", scratch.model)
    assert created.returncode == 1, created.stdout
    assert "- exit code: 1" in created.stdout and "git add models/net.folded.onnx" in created.stdout
    assert scratch.folded.is_file()
    before = _stamp(scratch.folded)
    again = scratch.run("bnfold-fold", scratch.model)
    assert again.returncode == 0, again.stdout
    assert _stamp(scratch.folded) == before
    scratch.git("add", "-A")
    consistent = scratch.run("bnfold-check")  # --all-files: both files of the pair
    assert consistent.returncode == 0, consistent.stdout


def test_check_hook_catches_a_change_to_the_original_alone(scratch: Scratch) -> None:
    assert scratch.run("bnfold-fold", scratch.model).returncode == 1
    shift_first_weight(scratch.model, 0.5)
    stale = scratch.run("bnfold-check", scratch.model)
    assert stale.returncode == 1 and "- exit code: 1" in stale.stdout, stale.stdout
    assert "models/net.onnx vs models/net.folded.onnx: not-equivalent" in stale.stdout
    scratch.use_hooks(["--atol", "1e6"])  # the hook's args reach bnfold
    assert scratch.run("bnfold-check", scratch.model).returncode == 0
    scratch.use_hooks()
    updated = scratch.run("bnfold-fold", scratch.model)
    assert updated.returncode == 1 and "; updated" in updated.stdout
    assert scratch.run("bnfold-check", scratch.folded).returncode == 0


def test_check_hook_fails_when_the_folded_model_or_the_original_is_missing(scratch: Scratch) -> None:
    orphan = scratch.path / "models" / "old.folded.onnx"
    shutil.copy(SAMPLES / "mlp_gemm_bn.onnx", orphan)
    result = scratch.run("bnfold-check", scratch.model, orphan)
    assert result.returncode == 1 and "- exit code: 2" in result.stdout
    assert "models/net.folded.onnx: no such file; run `bnfold models/net.onnx` to create it" in result.stdout
    assert "models/old.onnx: no such file (the original of models/old.folded.onnx)" in result.stdout


def test_a_commit_is_blocked_until_the_folded_model_is_staged(scratch: Scratch) -> None:
    scratch.git("add", "-A")
    assert _pre_commit(scratch.path, scratch.source, "install").returncode == 0
    with pytest.raises(subprocess.CalledProcessError):
        scratch.git("commit", "-q", "-m", "add a model")
    assert scratch.folded.is_file() and scratch.git("rev-list", "--all", "--count") == "0"
    scratch.git("add", "models/net.folded.onnx")
    scratch.git("commit", "-q", "-m", "add a model and its folded twin")
    assert scratch.git("ls-files", "models").splitlines() == ["models/net.folded.onnx", "models/net.onnx"]
