"""Large tensors through shared memory: one copy in, none out.

A tensor of at least ``THRESHOLD`` bytes does not travel through the socket. The sender
writes its bytes to a new file in the server's private tmpfs directory, and the signed
header names the file and its size. The receiver maps the file copy-on-write (no copy;
writes stay private), unlinks it, and hands out a tensor over the mapping.

The directory is made by each server with an unpredictable name (``mkdtemp`` under
``/dev/shm``, the runtime dir when there is no /dev/shm; mode 0700) and recorded in its
connection file, so no other user can take the name first or plant files in it. The server
removes the directory when it stops; :func:`sweep` removes those of servers that died.

The file's bytes are not covered by the HMAC, on purpose: hashing is what made large
transfers slow (SHA-256 runs at ~1.5 GB/s here, four passes per round trip). Their
integrity rests on the same thing the key does: the directory and the files belong to the
user and nobody else may write them (0700/0600, checked on both sides), and a process that
could rewrite them could also read the key from the connection file. The header that names
the file is signed as always. Used on one machine only: ipc, or tcp on loopback.

When a file cannot be written (the tmpfs is full: Docker's default /dev/shm is 64 MB),
:func:`put` returns None and the tensor travels through the socket instead. Files of messages that were never received
(a dropped message, a dead receiver) are removed by :func:`sweep` when their writer is gone
or after an hour.
"""

from __future__ import annotations

import atexit
import logging
import mmap
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from slicebridge.bridge.connection import runtime_dir
from slicebridge.bridge.errors import ProtocolError
from slicebridge.processes import pid_alive

log = logging.getLogger(__name__)

THRESHOLD = 1 << 20
_NAME = re.compile(r"^(\d+)-[0-9a-f]+\.buf$")
_DIR_NAME = re.compile(r"^slicebridge-(\d+)-[^/]+$")
_MAX_AGE_S = 3600.0
_counter = iter(range(1 << 62))
_own_dir: Path | None = None


def _parent() -> Path:
    tmpfs = Path("/dev/shm")
    if tmpfs.is_dir() and os.access(tmpfs, os.W_OK | os.X_OK):
        return tmpfs
    return runtime_dir()


def shm_dir() -> Path:
    """This process's own private directory (made on first use, removed at exit)."""
    global _own_dir
    if _own_dir is None:
        _own_dir = Path(tempfile.mkdtemp(prefix=f"slicebridge-{os.getpid()}-", dir=_parent()))
        atexit.register(remove_own_dir)
    return _own_dir


def remove_own_dir() -> None:
    """Remove this process's directory and every buffer still in it."""
    global _own_dir
    if _own_dir is not None:
        shutil.rmtree(_own_dir, ignore_errors=True)
        _own_dir = None


def checked_dir(path: str | os.PathLike) -> Path:
    """A peer's directory, refused unless it is a plain directory of ours that only we can enter."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ProtocolError(f"shared-memory dir {path} is unusable: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
        raise ProtocolError(f"shared-memory dir {path} is not a private directory of ours")
    return path


def put(buffer, directory: Path | None = None) -> str | None:
    """Write ``buffer`` to a new private file; return its name, or None when it cannot be written
    (the tmpfs is full, the directory gone): the caller sends the bytes through the socket then."""
    name = f"{os.getpid()}-{next(_counter):x}{os.urandom(6).hex()}.buf"
    path = (directory or shm_dir()) / name
    view = memoryview(buffer).cast("B")
    try:
        _write(path, view)
    except OSError as exc:
        log.info("cannot put %d bytes in %s (%s); they go through the socket", view.nbytes, path.parent, exc.strerror)
        return None
    return name


def _write(path: Path, view: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def take(name: str, nbytes: int, directory: Path | None = None) -> memoryview:
    """Map the named file (copy-on-write), remove it, and return its bytes."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ProtocolError(f"bad shared-memory name {name!r}")
    path = (directory or shm_dir()) / name
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


def discard(names: list[str], directory: Path | None = None) -> None:
    for name in names:
        if _NAME.match(name):
            ((directory or shm_dir()) / name).unlink(missing_ok=True)


def sweep(now: float | None = None) -> int:
    """Remove buffers in our directory whose writer is gone or that are older than an hour, and
    the directories and sockets of our servers that died; return how many buffers, dirs and sockets."""
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
    from slicebridge.bridge.leftovers import sweep_sockets

    return removed + _sweep_dead_dirs() + sweep_sockets()


def _sweep_dead_dirs() -> int:
    removed = 0
    for path in _parent().glob("slicebridge-*"):
        match = _DIR_NAME.match(path.name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if match and stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not pid_alive(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed
