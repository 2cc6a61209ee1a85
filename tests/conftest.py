"""Shared fixtures: the stand-in slicegpt env, a private runtime dir, servers.

Tests start real servers in the second interpreter (``make test`` builds it at
``.envs/slicegpt``; ``SLICEBRIDGE_TEST_SLICEGPT_ENV`` points elsewhere). Paths and the
ways to run the CLI are plain functions in ``helpers/`` (``helpers.paths``, ``helpers.run``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers.paths import STANDIN, slicegpt_env_path


@pytest.fixture(scope="session")
def slicegpt_env() -> Path:
    path = slicegpt_env_path()
    if not (path / "bin" / "python").exists():
        pytest.fail(f"the stand-in slicegpt env is missing at {path}: run `make test`, which builds it")
    return path


@pytest.fixture(scope="session", autouse=True)
def private_runtime_dir():
    """Every test session gets its own runtime dir (short, for ipc socket paths)."""
    path = tempfile.mkdtemp(prefix="sbt-", dir="/tmp")
    os.environ["SLICEBRIDGE_RUNTIME_DIR"] = path
    os.environ["SLICEBRIDGE_DEBUG_OPS"] = "1"
    # As the launcher does for servers: the interpreters tests start (run_slicegpt.py by hand, checks) must
    # not spin OpenMP threads against the servers on CI's two cores (eigh then runs hundreds of times slower).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def bridge(slicegpt_env):
    """An owned server in the stand-in env, shared by the tests of one module."""
    from slicebridge import Bridge

    with Bridge(env=str(slicegpt_env), attach=False, debug_ops=True) as b:
        yield b


@pytest.fixture(scope="session")
def official_env(slicegpt_env, tmp_path_factory) -> Path:
    """The stand-in env plus the test stand-in of the official ``slicegpt`` package.

    A venv without packages of its own whose ``.pth`` file adds the stand-in env's
    site-packages and ``tests/standin``: a second "slicegpt env" in which
    ``import slicegpt`` works, built in a fraction of a second.
    """
    path = tmp_path_factory.mktemp("official") / "slicegpt-official"
    python = slicegpt_env / "bin" / "python"
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(path)], check=True)
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    own = subprocess.run(
        [str(path / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(own, "slicebridge-standin.pth").write_text(f"{site_packages}\n{STANDIN}\n")
    return path
