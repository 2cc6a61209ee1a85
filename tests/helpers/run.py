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


# One writer of a race: ``python -c WRITE_ONE ENV OP CHECKPOINT OUTPUT`` runs ``Bridge.OP`` (convert or
# export) paused in the publish window, so that writers started together meet there; it prints
# whether it won, or the OutputExists it lost with.
WRITE_ONE = r"""
import json, os, sys
from slicebridge import Bridge
from slicebridge.model.atomic import OutputExists
os.environ["SLICEBRIDGE_DEBUG_FAULTS"] = "publish:pause=1.5"  # both sit in the publish window together
with Bridge(env=sys.argv[1], attach=False, debug_ops=True) as b:
    try:
        getattr(b, sys.argv[2])(sys.argv[3], sys.argv[4])
        print(json.dumps({"won": True}))
    except OutputExists as exc:
        print(json.dumps({"won": False, "error": str(exc)}))
"""


def run_python(code: str, *args: str, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
    """Run a snippet in a fresh process of the base env."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )
