"""Facts about the server's own interpreter: versions, where modules came from, devices.

``hello`` reports these so that a client can prove the server runs on the slicegpt
env's packages (transformers 4.41 there) and nothing of the base env leaked in, and in
the env it asked for: ``prefix`` (``sys.prefix``) is the env's identity, which the client
checks against what the env's python reports (venvs of one interpreter differ only there).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

# (import name, distribution name) of what the handshake reports.
REPORTED_PACKAGES = [
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("slicegpt", "slicegpt"),
    ("dill", "dill"),
    ("zmq", "pyzmq"),
    ("msgpack", "msgpack"),
]


def package_versions() -> tuple[dict, dict]:
    """Import each reported package; return its version and the file it was imported from."""
    versions, files = {}, {}
    for module_name, dist in REPORTED_PACKAGES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # not installed, or broken: reported as None
            versions[module_name], files[module_name] = None, None
            continue
        version = getattr(module, "__version__", None)
        if not isinstance(version, str):
            try:
                version = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                version = None
        versions[module_name] = version
        files[module_name] = getattr(module, "__file__", None)
    return versions, files


def cuda_devices() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def cuda_memory() -> dict:
    """What torch's CUDA allocator holds on each device, once this process has used CUDA (else nothing, and no
    device is initialised to say so): ``{"cuda:N": {"allocated", "max_allocated", "reserved"}}`` in bytes."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {}
    return {
        f"cuda:{index}": {
            "allocated": torch.cuda.memory_allocated(index),
            "max_allocated": torch.cuda.max_memory_allocated(index),
            "reserved": torch.cuda.memory_reserved(index),
        }
        for index in range(torch.cuda.device_count())
    }


def python_facts() -> dict:
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "prefix": sys.prefix,
        "sys_path": list(sys.path),
    }
