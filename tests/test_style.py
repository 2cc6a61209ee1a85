"""Style: ruff's lint and format (configured in pyproject.toml) are clean over the whole tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.paths import REPO

RUFF = Path(sys.executable).with_name("ruff")


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_is_clean(command):
    assert RUFF.exists(), f"ruff is missing from {RUFF.parent}: `make test` installs it (requirements/base-env.txt)"
    done = subprocess.run([str(RUFF), *command, "."], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_module_logs_under_its_own_name():
    named = [
        f"{path.relative_to(REPO)}:{number}"
        for path in (REPO / "slicebridge").rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if line.startswith("log = ") and line != "log = logging.getLogger(__name__)"
    ]
    assert named == []
