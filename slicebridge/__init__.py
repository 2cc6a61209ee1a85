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

Importing it also lets torch's ``weights_only`` unpickler (``torch.load``'s default) run the two
functions a ``.bin`` is rebuilt with, and no other global: ``import slicebridge; torch.load(p)``
loads a ``.bin`` safely (``model.binfile.allow_rebuild_functions``). Torch is not imported for that:
when it is not imported yet, a one-shot import hook does it right after torch's own import. The
server undoes this first thing (``_strict_torch_load``): the ``.pt`` files it reads allow no rebuild.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading

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


def _allow_rebuild_functions() -> None:
    """``binfile.allow_rebuild_functions``; a failure is logged, never raised into the caller's ``import torch``."""
    try:
        importlib.import_module("slicebridge.model.binfile").allow_rebuild_functions()
    except Exception:
        import logging

        logging.getLogger(__name__).warning(
            "could not allow slicebridge's rebuild functions in torch.load; use slicebridge.load", exc_info=True
        )


class _AfterTorchImport:
    """A meta path finder that finds nothing itself: it wraps torch's loader so that, once torch has been
    imported, the rebuild functions are allowed (then it leaves ``sys.meta_path``)."""

    def __init__(self) -> None:
        self.local = threading.local()  # find_spec below searches sys.meta_path, which holds this finder too

    def find_spec(self, name: str, path=None, target=None):
        if name != "torch" or getattr(self.local, "searching", False):
            return None
        self.local.searching = True  # this thread's search; another thread's find_spec("torch") still wraps
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.local.searching = False
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenAllow(spec.loader, self)
        return spec


class _ThenAllow:
    """Torch's own loader, then ``_allow_rebuild_functions`` (the module keeps the original as its loader)."""

    def __init__(self, loader, finder: _AfterTorchImport) -> None:
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        _allow_rebuild_functions()


_HOOK = _AfterTorchImport()
if "torch" in sys.modules:
    _allow_rebuild_functions()
else:
    sys.meta_path.insert(0, _HOOK)


def _strict_torch_load() -> None:
    """Undo the above before torch is imported (the server: it reads untrusted ``.pt`` files with torch's
    ``weights_only`` unpickler, where no rebuild function of ours may run)."""
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
