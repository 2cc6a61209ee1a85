"""Settings in one place (``slicebridge.settings``), and an env resolved once per process.

The ``SLICEBRIDGE_*`` variables are read only through the settings module, a value that cannot
be used is refused in a sentence naming the variable before any server starts, and
``client.bridge_for`` asks conda about an env name once, not on every call.
"""

from __future__ import annotations

import ast
import os
import re
import stat

import pytest
from helpers.paths import REPO
from helpers.run import run_cli, run_python

from slicebridge import settings

PACKAGE = REPO / "slicebridge"


def test_every_variable_slicebridge_reads_is_a_setting():
    """Any ``SLICEBRIDGE_*`` name in the code is one of ``SETTINGS``, and only the settings module
    reads the environment for one."""
    known = {setting.name for setting in settings.SETTINGS}
    named, readers = set(), set()
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        named |= set(re.findall(r"SLICEBRIDGE_[A-Z_]+[A-Z]", text))
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"SLICEBRIDGE_[A-Z_]+", node.value)
            ):
                readers.add(str(path.relative_to(PACKAGE)))
    assert named <= known, named - known
    assert readers <= {"settings.py"}
    assert all(setting.meaning and setting.name.startswith("SLICEBRIDGE_") for setting in settings.SETTINGS)


def test_the_readmes_settings_table_lists_every_setting_once():
    section = (REPO / "README.md").read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(SLICEBRIDGE_[A-Z_]+)` \|", section, flags=re.MULTILINE)
    assert sorted(rows) == sorted(setting.name for setting in settings.SETTINGS)


@pytest.mark.parametrize(
    ("name", "value", "advice"),
    [
        ("SLICEBRIDGE_DEBUG_OPS", "yes", "use 1 (on) or 0 (off)"),
        ("SLICEBRIDGE_CACHE_BYTES", "lots", "use a positive whole number of bytes"),
        ("SLICEBRIDGE_LOG_MAX_BYTES", "-5", "use a positive whole number of bytes"),
    ],
)
def test_a_bad_setting_is_refused_in_a_sentence_before_a_server_starts(slicegpt_env, name, value, advice):
    done = run_cli("hello", "--env", str(slicegpt_env), env={name: value})
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == f"slicebridge: error: {name}={value!r}: {advice}"


@pytest.fixture
def conda_with_a_named_env(tmp_path, slicegpt_env):
    """A ``conda`` (``$CONDA_EXE``) whose ``env list --json`` names the stand-in env ``sbt-named``
    and writes a line to a log each time it runs."""
    named = tmp_path / "envs" / "sbt-named"
    named.parent.mkdir()
    named.symlink_to(slicegpt_env, target_is_directory=True)
    log = tmp_path / "conda-calls.log"
    conda = tmp_path / "conda"
    conda.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho \'{{"envs": ["{named}"]}}\'\n')
    conda.chmod(conda.stat().st_mode | stat.S_IXUSR)
    return conda, log


def test_bridge_for_resolves_an_env_name_once(conda_with_a_named_env):
    """``conda env list`` ran on every call (before the cache was looked at), and once more in ``start``."""
    conda, log = conda_with_a_named_env
    code = (
        "from slicebridge import client\n"
        "first = client.bridge_for('sbt-named')\n"
        "assert client.bridge_for('sbt-named') is first and client.bridge_for('sbt-named') is first\n"
        "client.close()\n"
    )
    done = run_python(code, env={**os.environ, "CONDA_EXE": str(conda)})
    assert done.returncode == 0, done.stderr
    assert log.read_text().splitlines() == ["env list --json"]
