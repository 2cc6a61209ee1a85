"""Asking an interpreter what it has, without the bridge: used by ``slicebridge doctor``.

The probe is a stdlib-only script run as ``python -I -c PROBE``, so it works in an env
that lacks pyzmq or msgpack (the case ``doctor`` exists to diagnose). It imports each
package the server cares about and prints one JSON object.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from slicebridge.bridge.errors import EnvNotUsable

PACKAGES = [  # (import name, label)
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("dill", "dill"),
    ("zmq", "pyzmq"),
    ("msgpack", "msgpack"),
    ("slicegpt", "slicegpt"),
]
WIRE_PACKAGES = ("pyzmq", "msgpack")

PROBE = r"""
import importlib, importlib.metadata, json, sys, warnings
warnings.simplefilter("ignore")
DISTS = {"zmq": "pyzmq"}
out = {"python": sys.version.split()[0], "executable": sys.executable, "prefix": sys.prefix,
       "packages": {}, "cuda_devices": [], "errors": {}}
for name in json.loads(sys.argv[1]):
    try:
        module = importlib.import_module(name)
    except Exception as exc:
        out["packages"][name] = None
        if not isinstance(exc, ModuleNotFoundError):
            out["errors"][name] = "%s: %s" % (type(exc).__name__, exc)
        continue
    version = getattr(module, "__version__", None)
    if not isinstance(version, str):
        try:
            version = importlib.metadata.version(DISTS.get(name, name))
        except Exception:
            version = "unknown"
    out["packages"][name] = version
if out["packages"].get("torch"):
    import torch
    if torch.cuda.is_available():
        out["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(json.dumps(out))
"""


def probe_interpreter(python: str, timeout: float = 120.0) -> dict:
    """Run the probe in ``python`` (isolated) and return its report, with labels as keys."""
    names = [name for name, _ in PACKAGES]
    try:
        done = subprocess.run(
            [python, "-I", "-c", PROBE, json.dumps(names)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONNOUSERSITE": "1"},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvNotUsable(f"could not run {python}: {exc}") from None
    if done.returncode != 0:
        raise EnvNotUsable(f"{python} could not run the probe:\n{done.stderr.strip()[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    report["packages"] = {label: report["packages"].get(name) for name, label in PACKAGES}
    return report


def probe_this_interpreter() -> dict:
    return probe_interpreter(sys.executable)


def missing_wire_packages(report: dict) -> list[str]:
    return [p for p in WIRE_PACKAGES if not report["packages"].get(p)]
