"""Finding the slicegpt env (names, prefixes, executables), and envs that cannot run the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.run import run_cli

from slicebridge import Bridge
from slicebridge.bridge.envs import find_env
from slicebridge.bridge.errors import EnvMissingPackages, EnvNotFound


@pytest.fixture
def no_conda(monkeypatch, tmp_path):
    """A clean slate: no conda on PATH, an empty home, no envs dirs."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    for var in ("CONDA_EXE", "MAMBA_EXE", "CONDA_ENVS_PATH", "CONDA_ENVS_DIRS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_prefix_directory_and_python_executable(slicegpt_env):
    by_prefix = find_env(str(slicegpt_env))
    assert by_prefix.python == str(slicegpt_env / "bin" / "python")
    by_exe = find_env(str(slicegpt_env / "bin" / "python"))
    assert Path(by_exe.prefix) == slicegpt_env and by_exe.how == "python executable"


def test_conda_name_from_an_envs_dir(slicegpt_env, no_conda, monkeypatch):
    envs = no_conda / "envs"
    envs.mkdir()
    (envs / "slicegpt").symlink_to(slicegpt_env)
    monkeypatch.setenv("CONDA_ENVS_PATH", str(envs))
    env = find_env("slicegpt")
    assert Path(env.python).resolve() == (slicegpt_env / "bin" / "python").resolve()
    assert "envs dir" in env.how


def test_conda_name_from_conda_env_list(slicegpt_env, no_conda, monkeypatch):
    fake_conda = no_conda / "conda"
    fake_conda.write_text(f"#!/bin/sh\necho '{json.dumps({'envs': ['/nonexistent/root', str(slicegpt_env)]})}'\n")
    fake_conda.chmod(0o755)
    monkeypatch.setenv("CONDA_EXE", str(fake_conda))
    env = find_env(slicegpt_env.name)
    assert env.python == str(slicegpt_env / "bin" / "python")
    assert "env list" in env.how


def test_a_name_beats_a_same_named_folder_in_the_cwd(slicegpt_env, no_conda, monkeypatch):
    (no_conda / "work" / "slicegpt").mkdir(parents=True)  # e.g. the user's code checkout
    monkeypatch.chdir(no_conda / "work")
    envs = no_conda / "envs"
    envs.mkdir()
    (envs / "slicegpt").symlink_to(slicegpt_env)
    monkeypatch.setenv("CONDA_ENVS_PATH", str(envs))
    assert find_env("slicegpt").how.startswith("envs dir")


def test_not_found_lists_what_was_tried(no_conda):
    with pytest.raises(EnvNotFound) as info:
        find_env("nosuchenv")
    message = str(info.value)
    assert "'nosuchenv'" in message and "conda: not found" in message
    assert "/.conda/envs/: not there" in message and "environments.txt" in message
    with pytest.raises(EnvNotFound, match="no such file or directory"):
        find_env("/no/such/prefix")
    (no_conda / "empty").mkdir()
    with pytest.raises(EnvNotFound, match="without bin/python"):
        find_env(str(no_conda / "empty"))


def test_cli_reports_a_missing_env_in_one_sentence(no_conda):
    done = run_cli("hello", "--env", "nosuchenv", env={"HOME": os.environ["HOME"], "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert done.stderr.startswith("slicebridge: error: could not find a Python environment for 'nosuchenv'")
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def bare_env(tmp_path_factory):
    """A real venv with pip but without pyzmq and msgpack."""
    path = tmp_path_factory.mktemp("bare") / "bare-env"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path


def test_env_without_wire_packages_gets_the_exact_install_command(bare_env):
    with pytest.raises(EnvMissingPackages) as info:
        Bridge(env=str(bare_env), attach=False).start()
    python = str(bare_env / "bin" / "python")
    assert info.value.missing == ["pyzmq", "msgpack"]
    assert f"{python} -m pip install pyzmq msgpack" in str(info.value)
    assert str(bare_env) in str(info.value)


def test_doctor_reports_both_envs(slicegpt_env):
    done = run_cli("doctor", "--env", str(slicegpt_env), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["target"]["packages"]["transformers"] == "4.41.0"
    assert report["base"]["packages"]["transformers"].startswith("5.")
    for side in ("base", "target"):
        assert set(report[side]["packages"]) == {"torch", "transformers", "dill", "pyzmq", "msgpack", "slicegpt"}
        assert report[side]["cuda_devices"] == []
    assert report["ok"] and report["missing"] == []
    table = run_cli("doctor", "--env", str(slicegpt_env)).stdout
    assert "4.41.0" in table and "CUDA devices" in table


def test_doctor_fix_installs_the_wire_packages_only_when_asked(bare_env):
    report = json.loads(run_cli("doctor", "--env", str(bare_env), "--json").stdout)
    assert report["missing"] == ["pyzmq", "msgpack"] and not report["ok"]
    assert any("--fix" in p for p in report["problems"])
    fixed = run_cli("doctor", "--env", str(bare_env), "--fix", "--json", timeout=600)
    report = json.loads(fixed.stdout)
    assert report["fixed"] == ["pyzmq", "msgpack"] and report["missing"] == []
    assert report["target"]["packages"]["torch"] is None  # nothing else was installed
    with Bridge(env=str(bare_env), attach=False) as b:  # and now the server starts there
        assert b.server_hello.versions["torch"] is None
        assert b.echo([1, "two"]) == [1, "two"]
