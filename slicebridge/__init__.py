"""slicebridge: convert, export and verify SliceGPT checkpoints from your own Python env.

The heavy parts live in subpackages and are imported on first use, so that
``import slicebridge`` stays cheap and works in the slicegpt env's server too:

- ``slicebridge.bridge``  wire protocol, signing, env discovery, server lifecycle
- ``slicebridge.client``  the base-env API and CLI (``Bridge``)
- ``slicebridge.server``  what runs inside the slicegpt env
- ``slicebridge.model``   the portable sliced model (torch + transformers only)

Stdlib-only modules beside them, staged into the server too: ``errors`` (the root of the error
tree), ``settings`` (the ``SLICEBRIDGE_*`` variables), ``processes`` and ``version``.

This module re-exports the public names: ``load``, ``Bridge``, ``client``, ``__version__``,
``SlicebridgeError`` and every public error type (``from slicebridge import SparsityMismatch``).
"""

from __future__ import annotations

import importlib

from slicebridge.errors import ERROR_MODULES, SlicebridgeError
from slicebridge.version import __version__

_LAZY = {"load": "slicebridge.model.loading", "Bridge": "slicebridge.client.bridge", **ERROR_MODULES}

__all__ = ["__version__", "Bridge", "SlicebridgeError", "client", "load", *ERROR_MODULES]


def __getattr__(name: str):
    if name == "client":
        return importlib.import_module("slicebridge.client")
    if name not in _LAZY:
        raise AttributeError(f"module 'slicebridge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
