"""The ``SLICEBRIDGE_*`` environment variables: every setting slicebridge reads, in one place.

Each is read when it is needed (not at import), so a process that sets one before it starts a
server, or a test that sets one, is heard. A value that cannot be used raises
:class:`SettingInvalid` naming the variable. Stdlib only: the staged server reads its own here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from slicebridge.errors import SlicebridgeError


class SettingInvalid(SlicebridgeError):
    """A ``SLICEBRIDGE_*`` environment variable holds a value that cannot be used."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    meaning: str

    def raw(self) -> str:
        """The variable's value, or the default when it is unset or empty."""
        return os.environ.get(self.name) or self.default


ENV = Setting("SLICEBRIDGE_ENV", "slicegpt", "the slicegpt env used when none is named (`env=`, `--env`)")
RUNTIME_DIR = Setting(
    "SLICEBRIDGE_RUNTIME_DIR",
    "",
    "where connection files, sockets, staged code and logs live (default: "
    "`$XDG_RUNTIME_DIR/slicebridge`, else a private `<tmp>/slicebridge-<uid>`)",
)
CACHE_BYTES = Setting(
    "SLICEBRIDGE_CACHE_BYTES", "", "byte budget of the server's warm model cache (default: half of the host memory)"
)
LOG_MAX_BYTES = Setting(
    "SLICEBRIDGE_LOG_MAX_BYTES",
    str(10 * 1024 * 1024),
    "a server's log is cut to its last quarter when it grows past this many bytes",
)
ALLOW_REMOTE = Setting(
    "SLICEBRIDGE_ALLOW_REMOTE", "0", "`1` lets a tcp server listen on a non-loopback address (the key still guards it)"
)
DEBUG_OPS = Setting(
    "SLICEBRIDGE_DEBUG_OPS",
    "0",
    "`1`: new servers serve the diagnostic operations (`sleep`, `fail`) and fault injection",
)
DEBUG_FAULTS = Setting(
    "SLICEBRIDGE_DEBUG_FAULTS", "", "faults a debug server injects, `point:action=value,...` (see `server/faults.py`)"
)
CALIBRATION_MAX_BYTES = Setting(
    "SLICEBRIDGE_CALIBRATION_MAX_BYTES",
    str(1 << 30),
    "the most bytes of local calibration text a `slice` request reads (one file, and all of a directory's together)",
)
SETTINGS = (
    ENV,
    RUNTIME_DIR,
    CACHE_BYTES,
    LOG_MAX_BYTES,
    ALLOW_REMOTE,
    DEBUG_OPS,
    DEBUG_FAULTS,
    CALIBRATION_MAX_BYTES,
)


def default_env() -> str:
    return ENV.raw()


def runtime_dir_override() -> str:
    """The runtime dir the user chose, or ``""``."""
    return RUNTIME_DIR.raw()


def cache_bytes() -> int | None:
    """The model cache's budget in bytes, or None for the default."""
    return _positive_int(CACHE_BYTES) if CACHE_BYTES.raw() else None


def log_max_bytes() -> int:
    return _positive_int(LOG_MAX_BYTES)


def allow_remote() -> bool:
    return _flag(ALLOW_REMOTE)


def debug_ops() -> bool:
    return _flag(DEBUG_OPS)


def debug_faults() -> str:
    return DEBUG_FAULTS.raw()


def calibration_max_bytes() -> int:
    return _positive_int(CALIBRATION_MAX_BYTES)


def check_all() -> None:
    """Read every setting once: a server is not started with a value it would refuse in its log."""
    default_env(), runtime_dir_override(), cache_bytes(), log_max_bytes(), allow_remote(), debug_ops()
    calibration_max_bytes()


def _flag(setting: Setting) -> bool:
    value = setting.raw()
    if value not in ("0", "1"):
        raise SettingInvalid(f"{setting.name}={value!r}: use 1 (on) or 0 (off)")
    return value == "1"


def _positive_int(setting: Setting) -> int:
    value = setting.raw()
    try:
        number = int(value.replace("_", ""))
    except ValueError:
        number = 0
    if number <= 0:
        raise SettingInvalid(f"{setting.name}={value!r}: use a positive whole number of bytes")
    return number
