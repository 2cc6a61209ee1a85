"""What a server that did not stop on its own leaves behind: its ipc socket and its shared-memory dir.

A server removes both when it stops. One that was killed (``ServerProcess.stop`` had to, or it
crashed) cannot: ``remove_leftovers`` removes them once the server is gone, and ``sweep_sockets``
removes the sockets in the runtime dir that no live or starting server's connection file names.
Only what is plainly ours is removed: a socket (``s-*.sock`` or ``server-*.sock``) owned by us in
a private dir of ours, and a ``slicebridge-<pid>-*`` directory of the dead server's pid, owned by us,
mode 0700.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from pathlib import Path

from slicebridge.bridge.connection import ConnectionInfo, runtime_dir
from slicebridge.processes import pid_alive

log = logging.getLogger(__name__)

_SOCKET_NAME = re.compile(r"^(s-[0-9a-f]+|server-\d+)\.sock$")
_SHM_DIR_NAME = re.compile(r"^slicebridge-(\d+)-[^/]+$")


def _socket_path(info: ConnectionInfo) -> Path | None:
    if info.transport != "ipc" or not info.endpoint.startswith("ipc://"):
        return None
    return Path(info.endpoint[len("ipc://") :])


def _remove_socket(path: Path) -> bool:
    """Unlink ``path`` if it is a socket of ours, named as ours are, in a private dir of ours."""
    if not _SOCKET_NAME.match(path.name):
        return False
    try:
        parent, st = os.lstat(path.parent), os.lstat(path)
    except OSError:
        return False
    if not (stat.S_ISDIR(parent.st_mode) and parent.st_uid == os.getuid() and not parent.st_mode & 0o077):
        return False
    if not (stat.S_ISSOCK(st.st_mode) and st.st_uid == os.getuid()):
        return False
    path.unlink(missing_ok=True)
    return True


def _remove_shm_dir(directory: str, pid: int) -> bool:
    """Remove the dead server's shared-memory dir if it is its own: named for its pid, ours, 0700."""
    if not directory:
        return False
    path = Path(directory)
    match = _SHM_DIR_NAME.match(path.name)
    if not match or int(match[1]) != pid or pid_alive(pid):
        return False
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def remove_leftovers(info: ConnectionInfo) -> None:
    """Remove the socket and shared-memory dir of the server of ``info``, which must be gone."""
    if info.pid and pid_alive(info.pid, info.server_start):
        return
    removed = []
    socket = _socket_path(info)
    if socket is not None and _remove_socket(socket):
        removed.append(str(socket))
    if info.pid and _remove_shm_dir(info.shm_dir, info.pid):
        removed.append(info.shm_dir)
    if removed:
        log.info("removed what server pid %d left: %s", info.pid, ", ".join(removed))


def sweep_sockets() -> int:
    """Remove the sockets in the runtime dir that no connection file of a live or starting server names."""
    from slicebridge.bridge.connection import read_connection_file

    run_dir = runtime_dir()
    in_use = set()
    for path in [*run_dir.glob("servers/*.json"), *run_dir.glob("owned/*.json")]:
        try:
            info = read_connection_file(path)
        except Exception:  # noqa: BLE001 - an unreadable file: keep every socket, to be safe
            return 0
        if not info.ready or pid_alive(info.pid, info.server_start):
            socket = _socket_path(info)
            if socket is not None:
                in_use.add(socket.name)
    removed = 0
    for socket in run_dir.glob("*.sock"):
        if socket.name not in in_use and _remove_socket(socket):
            removed += 1
    return removed
