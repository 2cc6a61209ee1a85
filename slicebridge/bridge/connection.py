"""Connection files and the per-user runtime directory.

A connection file says how to reach one server and holds the key its messages are
signed with, so it is written atomically with mode 0600 inside a runtime directory of
mode 0700 that belongs to the user. The client writes it before starting a server;
the server fills in its endpoint, pid and ``ready`` once it is listening.

Runtime directory: ``$SLICEBRIDGE_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/slicebridge``,
else ``<tmp>/slicebridge-<uid>``. When that last one is already there and not a private
directory of ours (another user's, a symlink, open to others), an unpredictably named one
of ours, ``<tmp>/slicebridge-<uid>-XXXXXXXX`` (0700), is used instead and found again by
later processes. Detached servers' files live in ``servers/`` there, one per env identity
(interpreter + ``sys.prefix``), next to the lock that serializes their start.

Servers are told apart from a reused pid by their start time (``server_start``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from slicebridge import settings
from slicebridge.bridge.envs import reported_prefix
from slicebridge.bridge.errors import ConnectionFileError
from slicebridge.bridge.protocol import DEFAULT_MAX_MESSAGE_BYTES, PROTOCOL_VERSION
from slicebridge.bridge.signing import SIGNATURE_SCHEME

log = logging.getLogger(__name__)

# Unix socket paths are limited to 107 bytes on Linux.
_MAX_IPC_PATH = 100
_claimed: dict[Path, Path] = {}  # <tmp>/<name> that was not ours -> the private dir used instead


@dataclass
class ConnectionInfo:
    """Everything a client needs to reach and authenticate with one server."""

    key: str
    transport: str = "ipc"  # "ipc" or "tcp"
    ip: str = "127.0.0.1"
    endpoint: str = ""  # filled in by the server once bound
    signature_scheme: str = SIGNATURE_SCHEME
    protocol: int = PROTOCOL_VERSION
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    env: str = ""  # what the user asked for ("slicegpt")
    python: str = ""  # the server's interpreter
    prefix: str = ""  # the env's sys.prefix as that interpreter reports it (resolved): its identity
    log_path: str = ""  # the server's stdout/stderr
    detached: bool = False
    owner_pid: int = 0  # a client-owned server exits when this process is gone
    owner_start: str = ""  # the owner's start time, against pid reuse
    debug_ops: bool = False
    shared_memory: bool = True  # large tensors through /dev/shm (same machine only)
    shm_dir: str = ""  # the server's private, unpredictably named directory for them (bridge.shm)
    pid: int = 0  # filled in by the server
    server_start: str = ""  # the server's start time (filled in by it), against pid reuse
    ready: bool = False
    started_at: float = field(default_factory=time.time)

    def public(self) -> dict:
        """The fields that may be shown or logged: everything but the key."""
        data = dataclasses.asdict(self)
        data.pop("key")
        return data


def runtime_dir() -> Path:
    """The per-user runtime directory, created with mode 0700 and checked to be ours."""
    override = settings.runtime_dir_override()
    if override:
        return ensure_private_dir(Path(override))
    if os.environ.get("XDG_RUNTIME_DIR"):
        return ensure_private_dir(Path(os.environ["XDG_RUNTIME_DIR"]) / "slicebridge")
    return private_tmp_dir(Path(tempfile.gettempdir()), f"slicebridge-{os.getuid()}")


def private_tmp_dir(tmp: Path, name: str) -> Path:
    """``tmp/name`` as a private dir of ours; if someone else put something there, one of ours
    named ``tmp/name-XXXXXXXX`` (a warning says so once)."""
    path = tmp / name
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConnectionFileError(f"cannot create the runtime dir {path}: {exc.strerror}") from None
    problem = _not_private(path)
    if problem is None:
        return ensure_private_dir(path)
    chosen = _claimed.get(path)
    if chosen is None or _not_private(chosen) is not None:
        chosen = _claimed[path] = _find_or_make_private(tmp, name)
        log.warning(
            "%s %s; using the private directory %s instead (set SLICEBRIDGE_RUNTIME_DIR to choose one)",
            path,
            problem,
            chosen,
        )
    return chosen


def _not_private(path: Path) -> str | None:
    """Why ``path`` is not a directory only we can use, or None if it is one."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be examined ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        return "is not a plain directory"
    if st.st_uid != os.getuid():
        return f"belongs to uid {st.st_uid}"
    if st.st_mode & 0o077:
        return f"is open to others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _find_or_make_private(tmp: Path, name: str) -> Path:
    """The oldest ``tmp/name-*`` that is ours and private (made here: by its ``.made`` stamp), else a new one.

    No lock is taken in the shared ``tmp`` (another user could hold it). A new dir is made under a
    hidden name (mkdtemp), stamped, and renamed into place, so it never appears without its stamp.
    Every process then picks the dir whose stamp is oldest (dirs made before stamps came first, then
    by name) and removes its own if it was not picked, so that processes starting together agree on one.
    """
    found = _oldest_private(tmp, name)
    if found is not None:
        return found
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-staging-", dir=tmp))
    os.close(os.open(staging / _MADE_STAMP, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    for _ in range(100):
        ours = tmp / f"{name}-{secrets.token_hex(4)}"
        try:
            os.rename(staging, ours)  # fails on another's entry (sticky tmp) and on a non-empty dir
        except OSError:
            continue
        if _not_private(ours) is not None:  # replaced an empty dir of someone else's? never use it
            continue
        break
    else:
        shutil.rmtree(staging, ignore_errors=True)
        raise ConnectionFileError(f"cannot create a private runtime dir in {tmp}")
    chosen = _oldest_private(tmp, name) or ours
    if chosen != ours:
        shutil.rmtree(ours, ignore_errors=True)
    return chosen


_MADE_STAMP = ".made"


def _oldest_private(tmp: Path, name: str) -> Path | None:
    """The ``tmp/name-*`` of ours to use (see ``_find_or_make_private``), or None if there is none."""
    ranked = []
    for candidate in tmp.glob(f"{name}-*"):
        if _not_private(candidate) is not None:
            continue
        try:
            made = os.lstat(candidate / _MADE_STAMP).st_mtime_ns
        except OSError:
            made = 0  # made before stamps (or by the lock-taking version): in use already
        ranked.append((made, candidate.name, candidate))
    return min(ranked)[2] if ranked else None


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ConnectionFileError(f"runtime dir {path} is not a plain directory; remove it")
    if st.st_uid != os.getuid():
        raise ConnectionFileError(
            f"runtime dir {path} belongs to uid {st.st_uid}, not to you; "
            "set SLICEBRIDGE_RUNTIME_DIR to a directory of your own"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def servers_dir() -> Path:
    return ensure_private_dir(runtime_dir() / "servers")


def detached_connection_path(python: str) -> Path:
    """Where the detached server of the env of ``python`` keeps its connection file: one per
    (interpreter, reported ``sys.prefix``), so venvs of one interpreter get servers of their own."""
    identity = f"{os.path.realpath(python)}\0{reported_prefix(python)}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return servers_dir() / f"server-{digest}.json"


def ipc_endpoint(name: str) -> str:
    """An ipc:// endpoint for a socket file in the runtime dir (or a short private dir)."""
    path = runtime_dir() / f"{name}.sock"
    if len(str(path)) > _MAX_IPC_PATH:
        short = private_tmp_dir(Path("/tmp"), f"sb-{os.getuid()}")
        path = short / f"{name[:16]}.sock"
    return f"ipc://{path}"


def write_connection_file(info: ConnectionInfo, path: Path) -> Path:
    """Write ``info`` to ``path`` atomically, readable only by the owner."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(dataclasses.asdict(info), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_connection_file(path: Path) -> ConnectionInfo:
    """Read a connection file, refusing one that others can read."""
    path = Path(path)
    try:
        st = os.stat(path)
        text = path.read_text()
    except FileNotFoundError:
        raise ConnectionFileError(f"connection file {path} does not exist") from None
    except OSError as exc:
        raise ConnectionFileError(f"cannot read connection file {path}: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise ConnectionFileError(
            f"connection file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
            "it holds a signing key, so it is refused (`slicebridge server stop --all` stops its server)."
        )
    try:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(ConnectionInfo)}
        return ConnectionInfo(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError) as exc:
        raise ConnectionFileError(f"connection file {path} is malformed: {exc}") from None
