"""Finding the Python interpreter of the environment the server should run in.

``env=`` may be a python executable, an env prefix directory, or a conda env name.
Names are resolved without ``conda activate``: through ``conda env list --json``
(``$CONDA_EXE``, ``conda``/``mamba``/``micromamba`` on PATH, the usual install dirs),
``$CONDA_ENVS_PATH``/``$CONDA_ENVS_DIRS``, ``~/.conda/environments.txt`` and the usual
envs dirs. When nothing matches, :class:`EnvNotFound` lists everything that was tried.

An env's identity is its interpreter plus the ``sys.prefix`` that interpreter reports
(:func:`reported_prefix`): venvs made from one Python share the binary but not the prefix.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from slicebridge.bridge.errors import EnvNotFound, EnvNotUsable

log = logging.getLogger(__name__)

_CONDA_ROOTS = ["miniconda3", "anaconda3", "miniforge3", "mambaforge", "micromamba", ".conda"]
_ENV_VARS_DROPPED = ("VIRTUAL_ENV", "__PYVENV_LAUNCHER__", "CONDA_DEFAULT_ENV", "CONDA_PROMPT_MODIFIER")
_SYSTEM_CONDA_ROOTS = [
    "/opt/conda",
    "/opt/miniconda3",
    "/opt/anaconda3",
    "/opt/miniforge3",
    "/usr/local/miniconda3",
    "/usr/local/anaconda3",
]


@dataclass(frozen=True)
class PythonEnv:
    """A resolved environment: what the user asked for, its interpreter and prefix."""

    spec: str
    python: str
    prefix: str
    how: str  # how it was found, for messages

    @property
    def name(self) -> str:
        return self.spec if os.sep not in self.spec else os.path.basename(self.prefix.rstrip(os.sep))


def python_free_environ() -> dict:
    """Our environment variables minus those that point an interpreter elsewhere (``PYTHON*``, venv)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k not in _ENV_VARS_DROPPED}


@functools.cache
def reported_prefix(python: str) -> str:
    """``sys.prefix`` (resolved) as ``python`` reports it when started the way the server is."""
    try:
        done = subprocess.run(
            [python, "-I", "-c", "import sys; print(sys.prefix)"],
            capture_output=True,
            text=True,
            timeout=60,
            env=python_free_environ(),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvNotUsable(f"could not run {python}: {exc}") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise EnvNotUsable(f"{python} could not report its sys.prefix: {done.stderr.strip()[-500:]}")
    return os.path.realpath(lines[-1])


def find_env(spec: str | os.PathLike) -> PythonEnv:
    """Resolve ``spec`` to a :class:`PythonEnv`, or raise :class:`EnvNotFound` listing what was tried."""
    spec = os.fspath(spec)
    tried: list[str] = []
    looks_like_path = os.sep in spec or spec.startswith((".", "~"))
    if not looks_like_path:
        for prefix, how in _conda_env_candidates(tried):
            if os.path.basename(os.path.normpath(prefix)) == spec or (spec == "base" and how.endswith("root")):
                python = _python_in_prefix(Path(prefix))
                if python:
                    return PythonEnv(spec, python, str(prefix), how)
                tried.append(f"{prefix} (from {how}): no bin/python in it")
        if not Path(spec).exists():
            raise EnvNotFound(spec, tried)
    found = _env_at_path(Path(spec).expanduser(), spec, tried)
    if found is None:
        raise EnvNotFound(spec, tried)
    return found


def _env_at_path(path: Path, spec: str, tried: list[str]) -> PythonEnv | None:
    if path.is_file():
        if os.access(path, os.X_OK):
            return PythonEnv(spec, str(path.absolute()), _prefix_of(path), "python executable")
        tried.append(f"{path}: a file, but not executable")
    elif path.is_dir():
        python = _python_in_prefix(path)
        if python:
            return PythonEnv(spec, python, str(path.absolute()), "env prefix directory")
        tried.append(f"{path}: a directory without bin/python")
    else:
        tried.append(f"{path}: no such file or directory")
    return None


def _prefix_of(python: Path) -> str:
    parent = python.absolute().parent
    return str(parent.parent if parent.name in ("bin", "Scripts") else parent)


def _python_in_prefix(prefix: Path) -> str | None:
    for rel in ("bin/python", "bin/python3", "python.exe"):
        candidate = prefix / rel
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate.absolute())
    return None


def _conda_executables() -> list[str]:
    found = []
    for var in ("CONDA_EXE", "MAMBA_EXE"):
        if os.environ.get(var):
            found.append(os.environ[var])
    for name in ("conda", "mamba", "micromamba"):
        exe = shutil.which(name)
        if exe:
            found.append(exe)
    home = Path.home()
    for root in [home / r for r in _CONDA_ROOTS] + [Path(r) for r in _SYSTEM_CONDA_ROOTS]:
        exe = root / "bin" / "conda"
        if exe.is_file():
            found.append(str(exe))
    return list(dict.fromkeys(found))


def _envs_dirs() -> list[Path]:
    dirs = []
    for var in ("CONDA_ENVS_PATH", "CONDA_ENVS_DIRS"):
        for part in os.environ.get(var, "").split(os.pathsep):
            if part:
                dirs.append(Path(part).expanduser())
    home = Path.home()
    dirs.append(home / ".conda" / "envs")
    dirs += [home / r / "envs" for r in _CONDA_ROOTS]
    dirs += [Path(r) / "envs" for r in _SYSTEM_CONDA_ROOTS]
    return list(dict.fromkeys(dirs))


def _conda_env_candidates(tried: list[str]):
    """Yield (prefix, how) for every conda env we can see, recording each place looked at."""
    executables = _conda_executables()
    if not executables:
        tried.append("conda: not found ($CONDA_EXE unset, no conda/mamba/micromamba on PATH)")
    for exe in executables:
        try:
            out = subprocess.run(
                [exe, "env", "list", "--json"], capture_output=True, text=True, timeout=30, check=True
            ).stdout
            envs = json.loads(out).get("envs", [])
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            tried.append(f"`{exe} env list --json`: failed ({type(exc).__name__})")
            continue
        tried.append(f"`{exe} env list --json`: {len(envs)} env(s)")
        root = Path(exe).resolve().parent.parent
        for prefix in envs:
            how = f"{exe} env list" + (" root" if Path(prefix).resolve() == root else "")
            yield prefix, how
    env_txt = Path.home() / ".conda" / "environments.txt"
    if env_txt.is_file():
        lines = [ln.strip() for ln in env_txt.read_text().splitlines() if ln.strip()]
        tried.append(f"{env_txt}: {len(lines)} env(s)")
        for prefix in lines:
            yield prefix, str(env_txt)
    else:
        tried.append(f"{env_txt}: not there")
    for envs_dir in _envs_dirs():
        if envs_dir.is_dir():
            tried.append(f"{envs_dir}/")
            for child in sorted(envs_dir.iterdir()):
                if child.is_dir():
                    yield str(child), f"envs dir {envs_dir}"
        else:
            tried.append(f"{envs_dir}/: not there")
