"""``slicebridge doctor``: what the base env and the slicegpt env have, and what is missing.

Reports both interpreters (python, torch, transformers, dill, pyzmq, msgpack, slicegpt,
CUDA devices) side by side, and whether the server will load checkpoints with the official
slicegpt loader: from which directory its package comes and, when discoverable (a git
checkout, or pip's record of a VCS install), at which commit. With ``fix=True`` it installs the server's two wire
packages into the slicegpt env, and nothing else; it never installs without being asked.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from dataclasses import dataclass

from slicebridge.bridge.envs import find_env
from slicebridge.bridge.errors import SlicebridgeError
from slicebridge.bridge.probe import (
    PACKAGES,
    WIRE_PACKAGES,
    missing_wire_packages,
    probe_interpreter,
    probe_this_interpreter,
)

log = logging.getLogger(__name__)

# Where the env's slicegpt package comes from, and its commit: stdlib only, run as ``python -I``.
OFFICIAL_PROBE = r"""
import importlib.metadata, importlib.util, json, os
out = {"path": None, "commit": None, "loader_module": False}
spec = importlib.util.find_spec("slicegpt")
if spec is not None:
    locations = list(spec.submodule_search_locations or [])
    package = locations[0] if locations else os.path.dirname(spec.origin or "")
    out["path"] = package
    out["loader_module"] = os.path.isfile(os.path.join(package, "hf_utils.py"))
    try:
        direct = json.loads(importlib.metadata.distribution("slicegpt").read_text("direct_url.json") or "{}")
        out["commit"] = (direct.get("vcs_info") or {}).get("commit_id")
    except Exception:
        pass
    here = package
    while out["commit"] is None and os.path.dirname(here) != here:
        git = os.path.join(here, ".git")
        if os.path.isdir(git):
            head = open(os.path.join(git, "HEAD")).read().strip()
            if head.startswith("ref: "):
                ref = head[5:]
                ref_file = os.path.join(git, ref)
                if os.path.isfile(ref_file):
                    head = open(ref_file).read().strip()
                else:
                    packed = os.path.join(git, "packed-refs")
                    lines = open(packed).read().splitlines() if os.path.isfile(packed) else []
                    head = next((l.split()[0] for l in lines if l.endswith(" " + ref)), None)
            out["commit"] = head
        here = os.path.dirname(here)
print(json.dumps(out))
"""


@dataclass
class DoctorReport:
    env_spec: str
    base: dict
    target: dict
    missing: list  # wire packages the target env lacks (after a fix, if one ran)
    fixed: list  # packages installed by --fix
    problems: list  # sentences a user can act on
    official: dict  # path, commit, loader_module: where the env's slicegpt comes from (path None: absent)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {
            "env": self.env_spec,
            "base": self.base,
            "target": self.target,
            "missing": self.missing,
            "fixed": self.fixed,
            "problems": self.problems,
            "official_loader": {**self.official, "used": self.official_used},
            "ok": self.ok,
        }

    @property
    def official_used(self) -> bool:
        """Whether ``loader="auto"`` (the default) will use slicegpt's own loader in the env."""
        return self.official.get("path") is not None and bool(self.official.get("loader_module"))

    def loader_line(self) -> str:
        where = self.official.get("path")
        if where is None:
            return (
                f"loader: builtin (the {self.env_spec} env has no slicegpt package; "
                "the official loader will not be used)"
            )
        commit = self.official.get("commit")
        at = f"at commit {commit[:12]}" if commit else "commit not discoverable (no git checkout nor VCS record)"
        if not self.official_used:
            return f"loader: builtin (slicegpt at {where} has no hf_utils module, so its loader cannot be used)"
        return f"loader: official slicegpt.hf_utils.load_sliced_model, from {where}, {at}"

    def table(self) -> str:
        rows = [("", "base env (this one)", f"{self.env_spec} env"), ("python", _py(self.base), _py(self.target))]
        for _, label in PACKAGES:
            rows.append((label, _v(self.base, label), _v(self.target, label)))
        rows.append(("CUDA devices", _cuda(self.base), _cuda(self.target)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += ["", self.loader_line()]
        if self.fixed:
            lines.append(f"\ninstalled into the {self.env_spec} env: {', '.join(self.fixed)}")
        lines += [""] + [f"problem: {p}" for p in self.problems] if self.problems else ["", "all good"]
        return "\n".join(lines)


def _py(report: dict) -> str:
    return f"{report['python']} ({report['executable']})"


def _v(report: dict, label: str) -> str:
    version = report["packages"].get(label)
    return "importable (no version metadata)" if version == "unknown" else version or "-"


def _cuda(report: dict) -> str:
    return ", ".join(report["cuda_devices"]) or "none"


def run_doctor(env: str, fix: bool = False) -> DoctorReport:
    target_env = find_env(env)
    base = probe_this_interpreter()
    target = probe_interpreter(target_env.python)
    missing = missing_wire_packages(target)
    fixed: list[str] = []
    if missing and fix:
        install_wire_packages(target_env.python, missing)
        fixed = missing
        target = probe_interpreter(target_env.python)
        missing = missing_wire_packages(target)
    problems = []
    if missing:
        problems.append(
            f"the {env} env lacks {', '.join(missing)}; install with `{target_env.python} -m pip install "
            f"{' '.join(missing)}` or run `slicebridge doctor --env {env} --fix`"
        )
    if tuple(int(x) for x in target["python"].split(".")[:2]) < (3, 10):
        problems.append(f"the {env} env has Python {target['python']}; the server needs 3.10 or newer")
    if not target["packages"].get("torch"):
        problems.append(f"the {env} env has no torch: it cannot load checkpoints")
    return DoctorReport(env, base, target, missing, fixed, problems, probe_official(target_env.python))


def probe_official(python: str) -> dict:
    """Where ``python``'s env has slicegpt from, and at which commit (``{"path": None}`` when absent)."""
    done = subprocess.run(
        [python, "-I", "-c", OFFICIAL_PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONNOUSERSITE": "1"},
    )
    if done.returncode != 0:
        log.warning("could not tell where slicegpt comes from in %s: %s", python, done.stderr.strip()[-500:])
        return {"path": None, "commit": None, "loader_module": False}
    return json.loads(done.stdout.strip().splitlines()[-1])


def install_wire_packages(python: str, packages: list[str]) -> None:
    """``python -m pip install`` the given wire packages (only pyzmq and msgpack are allowed)."""
    unknown = set(packages) - set(WIRE_PACKAGES)
    if unknown:
        raise ValueError(f"doctor --fix installs only {', '.join(WIRE_PACKAGES)}, not {', '.join(unknown)}")
    log.info("installing %s into %s", " ".join(packages), python)
    done = subprocess.run([python, "-m", "pip", "install", "--quiet", *packages], capture_output=True, text=True)
    if done.returncode != 0:
        raise SlicebridgeError(
            f"`{python} -m pip install {' '.join(packages)}` failed:\n{done.stderr.strip()[-2000:]}\n"
            "In a conda env without pip, use: conda install -p <env prefix> pyzmq msgpack-python"
        )
