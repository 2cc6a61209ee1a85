"""Running slicebridge as a user would: the CLI, or a snippet, in a fresh process of the base env."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``slicebridge ARGS`` in a fresh process of the base env."""
    return subprocess.run(
        [sys.executable, "-m", "slicebridge.client.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def run_python(code: str, *args: str, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    """Run a snippet in a fresh process of the base env."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )
