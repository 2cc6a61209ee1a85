"""The root of slicebridge's error tree, and where each public error type is defined.

Every exception slicebridge raises derives from :class:`SlicebridgeError`, so callers (and the
CLI, and a batch that goes on after one item fails) catch that one type. Errors raised in the
server come back as the same types (``bridge.errors.remote_error`` finds them here by name).
Stdlib only and imports nothing of slicebridge: every layer, and the staged server, uses it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator


class SlicebridgeError(Exception):
    """Base class of every error slicebridge raises."""


class InputNotFound(SlicebridgeError, FileNotFoundError):
    """A path given as an input (a checkpoint, a ``.bin``, an export directory) does not exist."""


# The public error types, by the module that defines them: ``slicebridge`` re-exports them
# (importing the module on first use) and a remote error of one of these names is raised as it.
PUBLIC_ERRORS: dict[str, tuple[str, ...]] = {
    "slicebridge.bridge.errors": (
        "EnvNotFound",
        "EnvNotUsable",
        "EnvMissingPackages",
        "ConnectionFileError",
        "ServerEnvMismatch",
        "ServerStartFailed",
        "ServerDied",
        "ServerKeepsDying",
        "ServerNotRunning",
        "RequestTimeout",
        "MessageTooLarge",
        "ProtocolError",
        "RemoteError",
        "BadRequest",
        "RequestCancelled",
        "RemoteOutOfMemory",
    ),
    "slicebridge.errors": ("SlicebridgeError", "InputNotFound"),
    "slicebridge.settings": ("SettingInvalid",),
    "slicebridge.model.errors": (
        "CheckpointError",
        "CheckpointNotFound",
        "AmbiguousCheckpoint",
        "NotASliceGPTCheckpoint",
        "TruncatedCheckpoint",
        "CorruptCheckpoint",
        "ImplausibleCheckpoint",
        "BaseConfigMissing",
        "BaseConfigMismatch",
        "SlicingConfigMismatch",
        "SparsityMismatch",
        "UnsupportedArchitecture",
    ),
    "slicebridge.model.atomic": ("OutputError", "OutputExists", "DiskFull"),
    "slicebridge.model.binfile": ("BinFileError", "ImplausibleBinFile", "UnsafeBinFile"),
    "slicebridge.model.export": ("ExportError",),
    "slicebridge.model.pickle_scan": ("UnreadablePickle",),
    "slicebridge.model.seed_bin": ("NotASeedModel",),
    "slicebridge.model.calibration": ("CalibrationError",),
    "slicebridge.client.slicing": ("SweepIncomplete",),
    "slicebridge.client.pool": ("PoolError",),
    "slicebridge.client.ray_pool": ("RayUnavailable",),
}
ERROR_MODULES: dict[str, str] = {name: module for module, names in PUBLIC_ERRORS.items() for name in names}


def public_error(name: str) -> type[SlicebridgeError]:
    """The public error type ``name`` (its module imported if it was not yet); ``KeyError`` if none."""
    return getattr(importlib.import_module(ERROR_MODULES[name]), name)


def error_types(root: type[SlicebridgeError] = SlicebridgeError) -> Iterator[type[SlicebridgeError]]:
    """``root`` and every subclass of it that is imported now, depth first."""
    yield root
    for sub in root.__subclasses__():
        yield from error_types(sub)


def find_error(name: str) -> type[SlicebridgeError] | None:
    """The local error type named ``name``: a public one, else one of the imported subclasses."""
    if name in ERROR_MODULES:
        try:
            return public_error(name)
        except ImportError:  # a module this env cannot import (the server's, say): no local type
            return None
    return next((cls for cls in error_types() if cls.__name__ == name and not _is_remote_twin(cls)), None)


def _is_remote_twin(cls: type) -> bool:
    """A class ``bridge.errors.register_remote_errors`` made (it derives from ``RemoteError`` too)."""
    return any(
        base.__module__ == "slicebridge.bridge.errors" and base.__name__ == "RemoteError" for base in cls.__mro__
    )
