"""Every example in the README and docs/ runs, so that no page can drift from the tool.

Conventions of the pages (each page runs top to bottom in one scratch folder holding a
copy of the repository's ``sample_models/`` and the same models again in ``models/``,
the folder a CI recipe folds; examples are written to run as-is from the repository's
root):

* ```` ```bash ```` blocks: every line is a command (``\\`` continues a line, ``#`` lines
  are comments) and must exit 0, or N when it ends with ``# exit N``. ``pip install``
  commands are not run (the test environment has them) but must install this project
  (``.`` or ``bnfold``) with extras it has; ``pytest`` is never run from here.
* ```` ```text ```` / ```` ```console ```` blocks with lines starting with ``$ ``: a
  transcript. Each command runs, must exit as said (``# exit N``), and prints what is
  shown below it (stdout, then stderr) up to the next ``$ ``, compared line by line with
  whitespace runs and rules of ``─`` collapsed and timings (``0.03s``) masked; a line
  ``…`` stands for any lines. Blocks without ``$ `` lines (schemas, sketches) are prose.
* ```` ```python ```` blocks run as scripts and must exit 0.
* ```` ```yaml ```` blocks: a GitHub Actions workflow's ``run:`` steps run as scripts in
  the scratch folder (``pip install`` lines left out); a pre-commit configuration may
  only name hooks this repository offers.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.installed import REPOSITORY, user_environment

PAGES = [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").glob("*.md"))]
EXPECTED_EXIT = re.compile(r"\s+#\s*exit (\d+)\s*$")
ELISION = "…"


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int
    """1-based line of the opening fence."""
    language: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPOSITORY)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    blocks = []
    lines = page.read_text(encoding="utf-8").splitlines()
    opened: tuple[int, str] | None = None
    body: list[str] = []
    for number, line in enumerate(lines, start=1):
        if line.startswith("```"):
            if opened is None:
                opened, body = (number, line[3:].strip()), []
            else:
                blocks.append(Block(page, opened[0], opened[1], "\n".join(body)))
                opened = None
        elif opened is not None:
            body.append(line)
    assert opened is None, f"{page}: unclosed code block at line {opened[0]}"
    return blocks


def logical_lines(text: str) -> list[str]:
    """Shell lines with ``\\`` continuations joined; blank and comment lines dropped."""
    joined = text.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def expected_exit(command: str) -> tuple[str, int]:
    match = EXPECTED_EXIT.search(command)
    return (command[: match.start()], int(match.group(1))) if match else (command, 0)


def check_pip_install(command: str, where: str) -> None:
    """``pip install .`` / ``'.[test]'`` / ``bnfold``: this project, with extras it has."""
    extras = set(importlib.metadata.metadata("bnfold").get_all("Provides-Extra") or [])
    for target in shlex.split(command)[2:]:
        if target.startswith("-"):
            continue
        match = re.fullmatch(r"(\.|bnfold)(\[([\w,-]+)\])?", target)
        assert match, f"{where}: pip installs {target!r}, not this project"
        named = set(filter(None, (match.group(3) or "").split(",")))
        assert named <= extras, f"{where}: extras {sorted(named - extras)} do not exist (have {sorted(extras)})"


def run_shell(script: str, scratch: Path, *, strict: bool = False) -> subprocess.CompletedProcess[str]:
    options = ["-e", "-o", "pipefail"] if strict else ["-o", "pipefail"]
    return subprocess.run(["bash", *options, "-c", script], cwd=scratch, env=user_environment(),
                          capture_output=True, text=True, timeout=600, check=False)


def run_command(command: str, scratch: Path, where: str) -> subprocess.CompletedProcess[str] | None:
    """Run one command of a page (None for ``pip install`` and ``pytest``, which are not run)."""
    command, exit_code = expected_exit(command)
    if command.startswith("pip install"):
        check_pip_install(command, where)
        return None
    if re.match(r"(python -m )?pytest\b", command):
        return None
    completed = run_shell(command, scratch)
    assert completed.returncode == exit_code, (
        f"{where}: `{command}` exited {completed.returncode}, the page says {exit_code}\n"
        f"{completed.stdout}\n{completed.stderr}"
    )
    return completed


def run_bash(block: Block, scratch: Path) -> None:
    for line in logical_lines(block.text):
        for command in line.split(" && "):
            run_command(command.strip(), scratch, block.where)


def normalized(line: str) -> str:
    line = re.sub(r"\b\d+\.\d\ds\b", "<seconds>", line)
    line = re.sub(r"─+", "─", line)
    return " ".join(line.split())


def matches(shown: list[str], printed: list[str]) -> bool:
    """Whether ``printed`` is ``shown``, where a ``…`` line of ``shown`` stands for any lines."""
    if not shown:
        return not printed
    if shown[0] == ELISION:
        return any(matches(shown[1:], printed[start:]) for start in range(len(printed) + 1))
    return bool(printed) and shown[0] == printed[0] and matches(shown[1:], printed[1:])


def trimmed(lines: list[str]) -> list[str]:
    while lines and not lines[-1]:
        lines = lines[:-1]
    return lines


def run_transcript(block: Block, scratch: Path) -> None:
    steps: list[tuple[str, list[str]]] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"{block.where}: output before the first `$ ` command"
            steps[-1][1].append(line)
    for command, shown in steps:
        completed = run_command(command, scratch, block.where)
        assert completed is not None, f"{block.where}: `{command}` in a transcript is not run"
        printed = trimmed([normalized(line) for line in (completed.stdout + completed.stderr).splitlines()])
        expected = trimmed([normalized(line) for line in shown])
        assert matches(expected, printed), (
            f"{block.where}: `{command}` printed (normalized):\n" + "\n".join(printed)
            + "\n\nthe page shows (normalized):\n" + "\n".join(expected)
        )


def run_python(block: Block, scratch: Path) -> None:
    completed = subprocess.run([sys.executable, "-c", block.text], cwd=scratch, env=user_environment(),
                               capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, f"{block.where}: the example failed\n{completed.stdout}\n{completed.stderr}"


def workflow_scripts(text: str) -> list[str]:
    """The ``run:`` steps of a GitHub Actions workflow, each as one script."""
    scripts = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = re.match(r"^(\s*)(- )?run: (.*)$", line)
        if not match:
            continue
        if match.group(3).strip() not in ("|", ">"):
            scripts.append(match.group(3).strip())
            continue
        indent = len(match.group(1)) + len(match.group(2) or "")
        body = []
        for following in lines[index + 1:]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            body.append(following)
        scripts.append(textwrap.dedent("\n".join(body)))
    return scripts


def offered_hooks() -> set[str]:
    text = (REPOSITORY / ".pre-commit-hooks.yaml").read_text(encoding="utf-8")
    return set(re.findall(r"^- id: (\S+)", text, re.M))


def run_yaml(block: Block, scratch: Path) -> None:
    if "steps:" in block.text:
        scripts = workflow_scripts(block.text)
        assert scripts, f"{block.where}: a workflow without run steps"
        for script in scripts:
            commands = [line for line in script.splitlines() if not line.strip().startswith("pip install")]
            for line in script.splitlines():
                if line.strip().startswith("pip install"):
                    check_pip_install(line.strip(), block.where)
            completed = run_shell("\n".join(commands), scratch, strict=True)
            assert completed.returncode == 0, f"{block.where}: the step failed\n{completed.stdout}\n{completed.stderr}"
    if "hooks:" in block.text:
        named = set(re.findall(r"- id: (\S+)", block.text))
        assert named and named <= offered_hooks(), f"{block.where}: hooks {sorted(named - offered_hooks())} do not exist"


def run_block(block: Block, scratch: Path) -> None:
    if block.language in ("bash", "sh", "shell"):
        run_bash(block, scratch)
    elif block.language in ("text", "console") and any(line.startswith("$ ") for line in block.text.splitlines()):
        run_transcript(block, scratch)
    elif block.language == "python":
        run_python(block, scratch)
    elif block.language == "yaml":
        run_yaml(block, scratch)
    else:
        assert block.language in ("text", "console"), f"{block.where}: no convention for ```{block.language}"


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """The repository's models, as a fresh checkout has them, and ``models/`` for CI recipes."""
    for folder in ("sample_models", "models"):
        (tmp_path / folder).mkdir()
        for model in (REPOSITORY / "sample_models").glob("*.onnx"):
            shutil.copy(model, tmp_path / folder / model.name)
    return tmp_path


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(REPOSITORY)) for page in PAGES])
def test_every_example_of_the_page_runs_as_shown(page: Path, scratch: Path) -> None:
    for block in fenced_blocks(page):
        run_block(block, scratch)


def test_the_readme_has_examples_of_every_kind() -> None:
    """A guard on the conventions: renaming a fence must not quietly stop the checks."""
    kinds = {block.language for block in fenced_blocks(REPOSITORY / "README.md")}
    assert {"bash", "text", "python"} <= kinds
    transcripts = [b for b in fenced_blocks(REPOSITORY / "README.md") if b.text.startswith("$ ")]
    assert len(transcripts) >= 3


def test_the_transcript_matcher_needs_the_shown_lines_in_order() -> None:
    assert matches(["a", ELISION, "c"], ["a", "b", "b", "c"])
    assert matches([ELISION], [])
    assert not matches(["a", ELISION, "c"], ["a", "b"])
    assert not matches(["a", "c"], ["a", "b", "c"])
    assert normalized("  total   0.13s  ─────") == normalized("total 10.02s ──")
