"""Large tensors through shared memory: one copy in, none out.

A tensor of at least ``THRESHOLD`` bytes does not travel through the socket. The sender
writes its bytes to a new file in a private tmpfs directory (``/dev/shm/slicebridge-<uid>``,
mode 0700; the runtime dir when there is no /dev/shm), and the signed header names the file
and its size. The receiver maps the file copy-on-write (no copy; writes stay private),
unlinks it, and hands out a tensor over the mapping.

The file's bytes are not covered by the HMAC, on purpose: hashing is what made large
transfers slow (SHA-256 runs at ~1.5 GB/s here, four passes per round trip). Their
integrity rests on the same thing the key does: the directory and the files belong to the
user and nobody else may write them (0700/0600, checked on both sides), and a process that
could rewrite them could also read the key from the connection file. The header that names
the file is signed as always. Used on one machine only: ipc, or tcp on loopback.

Files of messages that were never received (a dropped message, a dead receiver) are removed
by :func:`sweep` when their writer is gone or after an hour.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import time
from pathlib import Path

from slicebridge.bridge.connection import ensure_private_dir, pid_alive, runtime_dir
from slicebridge.bridge.errors import ProtocolError

THRESHOLD = 1 << 20
_NAME = re.compile(r"^(\d+)-[0-9a-f]+\.buf$")
_MAX_AGE_S = 3600.0
_counter = iter(range(1 << 62))


def shm_dir() -> Path:
    tmpfs = Path("/dev/shm")
    if tmpfs.is_dir() and os.access(tmpfs, os.W_OK | os.X_OK):
        return ensure_private_dir(tmpfs / f"slicebridge-{os.getuid()}")
    return ensure_private_dir(runtime_dir() / "shm")


def put(buffer) -> str:
    """Write ``buffer`` to a new private file; return its name for the header."""
    name = f"{os.getpid()}-{next(_counter):x}{os.urandom(6).hex()}.buf"
    path = shm_dir() / name
    view = memoryview(buffer).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return name


def take(name: str, nbytes: int) -> memoryview:
    """Map the named file (copy-on-write), remove it, and return its bytes."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ProtocolError(f"bad shared-memory name {name!r}")
    path = shm_dir() / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ProtocolError(f"shared-memory buffer {name} is missing: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077 or not stat.S_ISREG(st.st_mode):
            raise ProtocolError(f"shared-memory buffer {name} is not a private file of ours")
        if st.st_size != nbytes:
            raise ProtocolError(f"shared-memory buffer {name} holds {st.st_size} bytes, {nbytes} announced")
        mapped = mmap.mmap(fd, nbytes, access=mmap.ACCESS_COPY) if nbytes else bytearray()
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return memoryview(mapped)


def discard(names: list[str]) -> None:
    for name in names:
        (shm_dir() / name).unlink(missing_ok=True)


def sweep(now: float | None = None) -> int:
    """Remove buffers whose writer is gone or that are older than an hour; return how many."""
    now = time.time() if now is None else now
    removed = 0
    for path in shm_dir().glob("*.buf"):
        match = _NAME.match(path.name)
        try:
            stale = not match or not pid_alive(int(match[1])) or now - path.stat().st_mtime > _MAX_AGE_S
        except OSError:
            continue
        if stale:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
