"""Writing artifacts atomically: a file or directory appears whole, or not at all.

Every output slicebridge writes goes through here. The bytes go to a hidden temporary
sibling (``.NAME.<id>.partial``) in the same directory, are flushed to disk, and the
temporary is renamed over the target in one step. If anything fails (a bad model, a
full disk, ``RLIMIT_FSIZE``, Ctrl-C) the temporary is removed and the target is left as
it was. Checks that need no work (directory missing or read-only, target exists
without ``overwrite``) run first, so bad input fails before any expensive step.

Paths are resolved as the shell resolves them (symlinks first, then ``..``), so an output
named through a symlink lands where the link points, and the link stays. A directory is put
in place with Linux ``renameat2``: ``RENAME_NOREPLACE`` (no-clobber: of two writers one wins,
the other gets ``OutputExists``) or, with ``overwrite``, ``RENAME_EXCHANGE`` (old and new swap
in one step); where the file system lacks it, a rename with the same checks around it.

Just before an output is put in place, ``request_scope.before_publish`` has the last word
(in the server: a cancelled request's output is discarded).

The big files of an output (weights, a ``.bin``) are written through ``StreamFile``: one stream,
straight from the caller's memory, with the disk already writing behind it, so that the one
``fsync`` per file that publishing does has little left to wait for.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from slicebridge.errors import SlicebridgeError
from slicebridge.model import request_scope
from slicebridge.processes import pid_alive


class OutputError(SlicebridgeError):
    """The output path cannot be written; nothing was written."""


class OutputExists(OutputError):
    """The output exists and ``overwrite`` was not given."""


class DiskFull(OutputError):
    """The disk (or the file size limit, or the quota) ran out while writing; nothing was written."""


def resolve(path: str | os.PathLike, follow_final: bool = True) -> Path:
    """``path`` made absolute as the shell would: ``~`` expanded, symlinks resolved before ``..``.

    ``follow_final=False`` keeps a symlink in the last place (an input is found beside its name).
    """
    path = os.path.join(os.getcwd(), os.path.expanduser(os.fspath(path)))
    head, name = os.path.split(path.rstrip(os.sep))
    if follow_final or name in ("", ".", ".."):
        return Path(os.path.realpath(path))
    return Path(os.path.realpath(head)) / name


def make_directories(path: str | os.PathLike) -> Path:
    """``mkdir -p path`` for an output directory the user named; an ``OutputError`` if it cannot be made."""
    path = resolve(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output directory {path}: {exc.strerror or exc}") from None
    return path


def check_output(path: str | os.PathLike, overwrite: bool = False, directory: bool = False) -> Path:
    """Refuse an output path that cannot be written, before any work is done."""
    path = resolve(path)
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"the output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"the output directory {parent} is not writable by you")
    try:  # access() says yes to root on read-only mounts and pseudo file systems: try for real
        with tempfile.TemporaryFile(dir=parent, prefix=".slicebridge-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot create files in the output directory {parent}: {exc.strerror}") from None
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExists(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
        if path.is_dir() != directory:
            kind = "a directory" if path.is_dir() else "a file"
            raise OutputError(f"{path} is {kind}; refusing to replace it with a {'directory' if directory else 'file'}")
    return path


def _partial_path(path: Path) -> Path:
    """``.NAME.<pid>-<random>.partial``: the writer's pid tells an orphan from work in progress."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")


def remove_orphaned_partials(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of ``path`` left by writers that died (SIGKILL skips their cleanup)."""
    path = Path(path)
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*-*.partial"):
        pid = candidate.name[len(path.name) + 2 :].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            _remove(candidate)
            removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path`` in one rename."""
    path = check_output(path, overwrite)
    tmp = _partial_path(path)
    try:
        yield tmp
        _fsync_file(tmp)
        request_scope.before_publish(path)
        _publish_file(tmp, path, overwrite)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise _explained(exc, path) from None
    finally:
        tmp.unlink(missing_ok=True)


def _publish_file(tmp: Path, path: Path, overwrite: bool) -> None:
    """Put ``tmp`` at ``path`` in one step; without ``overwrite``, never over a file that appeared meanwhile."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and fails if path exists: two writers cannot both win
    except FileExistsError:
        raise OutputExists(f"{path} appeared while it was being written (another writer?); not replacing it") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
            raise
        if path.exists():  # a file system without hard links: check, then rename
            raise OutputExists(f"{path} appeared while it was being written; not replacing it") from None
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory to fill; on success it takes the place of ``path``."""
    path = check_output(path, overwrite, directory=True)
    tmp = _partial_path(path)
    try:
        tmp.mkdir()
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                _fsync_file(child)
        request_scope.before_publish(path)
        _publish_directory(tmp, path, overwrite)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise _explained(exc, path) from None
    finally:
        _remove(tmp)  # the new version if it was not published, else the one it replaced


def _publish_directory(tmp: Path, path: Path, overwrite: bool) -> None:
    """Put ``tmp`` at ``path`` in one step; a replaced version is left at ``tmp``."""
    if overwrite and _exchange(tmp, path):
        return
    try:
        if not _renameat2(tmp, path, _RENAME_NOREPLACE):  # no renameat2 here: check, then rename
            if path.exists() or path.is_symlink():
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
            os.rename(tmp, path)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        raise OutputExists(f"{path} appeared while it was being written (another writer?); not replacing it") from None


def _exchange(tmp: Path, path: Path) -> bool:
    """Swap ``tmp`` and an existing ``path``; False when there is nothing to swap with."""
    try:
        if _renameat2(tmp, path, _RENAME_EXCHANGE):
            return True
    except FileNotFoundError:
        return False  # nothing (any more) at path
    if not (path.exists() or path.is_symlink()):
        return False
    old = _partial_path(path)  # no renameat2 here: move the old version aside, then rename
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(old, path)  # put the previous version back
        raise
    os.rename(old, tmp)
    return True


_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2(src, dst, flags)``; False where the C library or the file system lacks it."""
    call = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if call is None:
        return False
    if call(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never what it points to) or a directory tree, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _explained(exc: OSError, path: Path) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return DiskFull(f"no space left on the device while writing {path}; nothing was written")
    if exc.errno == errno.EDQUOT:
        return DiskFull(f"the disk quota ran out while writing {path}; nothing was written")
    if exc.errno == errno.EFBIG:
        return DiskFull(f"{path} would exceed the file size limit (ulimit -f); nothing was written")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {path}: {exc.strerror}; nothing was written")
    return OutputError(f"writing {path} failed: {exc.strerror or exc}; nothing was written")


# A streamed file is handed to the kernel in pieces of this size, each one's writeback started behind it.
WRITEBACK_BYTES = 64 * 1024**2
_SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range's dirty pages; do not wait for it


def _sync_file_range():
    """Linux's ``sync_file_range``, or None where the C library lacks it."""
    call = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if call is not None:
        call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return call


_START_WRITEBACK = _sync_file_range()


class StreamFile:
    """A new file written front to back in one stream: for the big files of an output.

    ``write`` hands the caller's buffer to the kernel as it is (no Python-side buffer, no copy), in
    pieces of ``WRITEBACK_BYTES``, and after each piece has the disk start writing it
    (``sync_file_range``): the writeback then runs while the rest is written, and the ``fsync`` of
    ``atomic_file`` / ``atomic_directory`` before publishing finds little left to do. The file is
    created with ``mode`` (under the umask), must not exist (it is a fresh temporary), and is open for
    reading too (``fd``: a writer may patch what it wrote, with ``os.pread`` / ``os.pwrite``). A failed
    write's ``OSError`` is kept in ``failure`` as well as raised: torch's archive writer reports one
    as a ``RuntimeError`` about positions.
    """

    def __init__(self, path: str | os.PathLike, mode: int = 0o666):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        self.position = 0
        self.failure: OSError | None = None

    def write(self, data) -> int:
        with memoryview(data) as view, view.cast("B") as raw:
            size = raw.nbytes
            for start in range(0, size, WRITEBACK_BYTES):
                self._write_piece(raw[start : start + WRITEBACK_BYTES])
        return size

    def _write_piece(self, piece: memoryview) -> None:
        offset, done = self.position, 0
        try:
            while done < piece.nbytes:
                done += os.write(self.fd, piece[done:])
        except OSError as exc:
            self.failure = self.failure or exc
            raise
        self.position += done
        if _START_WRITEBACK is not None:
            _START_WRITEBACK(self.fd, offset, done, _SYNC_FILE_RANGE_WRITE)

    def flush(self) -> None:
        """Nothing is buffered here (for callers that flush a file object)."""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> StreamFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
