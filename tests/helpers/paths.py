"""Where the tests find things: the repository, the shared fixtures, the helper scripts, the envs."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED_FIXTURES = REPO.parent / "shared" / "fixtures"  # the official SliceGPT runs' outputs, one per family
FIXTURE = SHARED_FIXTURES / "slicegpt-llama-tiny"
HELPERS = REPO / "tests" / "helpers"  # scripts run by other interpreters
STANDIN = REPO / "tests" / "standin"  # the test stand-in of the official slicegpt package


def slicegpt_env_path() -> Path:
    """The stand-in slicegpt env: ``$SLICEBRIDGE_TEST_SLICEGPT_ENV``, else ``.envs/slicegpt``."""
    return Path(os.environ.get("SLICEBRIDGE_TEST_SLICEGPT_ENV", REPO / ".envs" / "slicegpt"))
