"""``slicebridge doctor``: what the base env and the slicegpt env have, and what is missing.

Reports both interpreters (python, torch, transformers, dill, pyzmq, msgpack, slicegpt,
CUDA devices) side by side. With ``fix=True`` it installs the server's two wire
packages into the slicegpt env, and nothing else; it never installs without being asked.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass

from slicebridge.bridge.envs import find_env
from slicebridge.bridge.errors import SlicebridgeError
from slicebridge.bridge.probe import PACKAGES, WIRE_PACKAGES, missing_wire_packages, probe_interpreter, \
    probe_this_interpreter

log = logging.getLogger("slicebridge.doctor")


@dataclass
class DoctorReport:
    env_spec: str
    base: dict
    target: dict
    missing: list  # wire packages the target env lacks (after a fix, if one ran)
    fixed: list  # packages installed by --fix
    problems: list  # sentences a user can act on

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"env": self.env_spec, "base": self.base, "target": self.target,
                "missing": self.missing, "fixed": self.fixed, "problems": self.problems, "ok": self.ok}

    def table(self) -> str:
        rows = [("", "base env (this one)", f"{self.env_spec} env"),
                ("python", _py(self.base), _py(self.target))]
        for _, label in PACKAGES:
            rows.append((label, _v(self.base, label), _v(self.target, label)))
        rows.append(("CUDA devices", _cuda(self.base), _cuda(self.target)))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.fixed:
            lines.append(f"\ninstalled into the {self.env_spec} env: {', '.join(self.fixed)}")
        lines += [""] + [f"problem: {p}" for p in self.problems] if self.problems else ["", "all good"]
        return "\n".join(lines)


def _py(report: dict) -> str:
    return f"{report['python']} ({report['executable']})"


def _v(report: dict, label: str) -> str:
    return report["packages"].get(label) or "-"


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
    return DoctorReport(env, base, target, missing, fixed, problems)


def install_wire_packages(python: str, packages: list[str]) -> None:
    """``python -m pip install`` the given wire packages (only pyzmq and msgpack are allowed)."""
    unknown = set(packages) - set(WIRE_PACKAGES)
    if unknown:
        raise ValueError(f"doctor --fix installs only {', '.join(WIRE_PACKAGES)}, not {', '.join(unknown)}")
    log.info("installing %s into %s", " ".join(packages), python)
    done = subprocess.run([python, "-m", "pip", "install", "--quiet", *packages],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SlicebridgeError(
            f"`{python} -m pip install {' '.join(packages)}` failed:\n{done.stderr.strip()[-2000:]}\n"
            "In a conda env without pip, use: conda install -p <env prefix> pyzmq msgpack-python"
        )
