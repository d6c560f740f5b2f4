"""Running the installed ``bnfold`` commands as a user's shell or CI job does: a separate
process whose stdout and stderr are pipes (not a terminal), environment as given."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(sys.executable).parent
"""Where this environment installed ``bnfold`` and ``bnfold-precommit``."""
REPOSITORY = Path(__file__).resolve().parent.parent


def user_environment(**overrides: str) -> dict[str, str]:
    """The environment of a CI job: this environment's commands first on PATH, and none of
    the variables that would make rich think it draws on a terminal of some width."""
    environment = {
        key: value for key, value in os.environ.items()
        if key not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "NO_COLOR")
    }
    environment["PATH"] = f"{SCRIPTS}{os.pathsep}{environment.get('PATH', '')}"
    environment.update(overrides)
    return environment


def run_installed(*args: object, cwd: Path, env: dict[str, str] | None = None,
                  command: str = "bnfold") -> subprocess.CompletedProcess[str]:
    """``bnfold ARGS...`` (or another installed command) with stdout and stderr piped."""
    return subprocess.run(
        [str(SCRIPTS / command), *(str(arg) for arg in args)],
        cwd=cwd, env=env or user_environment(), capture_output=True, text=True, timeout=600, check=False,
    )
