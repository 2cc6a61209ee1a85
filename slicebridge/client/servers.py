"""Managing detached servers: start one per env, list them with their health, stop them.

A detached server outlives the command that started it; any number of clients attach
to it through its connection file in the runtime dir. ``Bridge(env=...)`` uses it
automatically when one is running for that env.

Starts are serialized per env (a lock in the runtime dir), so concurrent starts make one
server. A server that cannot be used through its file (it does not answer, or its file is
refused because others can read it) is stopped by signal before another takes its place,
and ``stop_all`` also stops detached server processes whose file is refused or gone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from slicebridge.bridge import protocol
from slicebridge.bridge.channel import Channel
from slicebridge.bridge.connection import detached_connection_path, read_connection_file
from slicebridge.bridge.envs import find_env
from slicebridge.bridge.errors import ConnectionFileError, ServerNotRunning, SlicebridgeError
from slicebridge.bridge.launcher import (
    ServerProcess,
    attach,
    detached_server_processes,
    detached_start_lock,
    find_detached,
    list_detached,
    start_server,
)
from slicebridge.bridge.leftovers import remove_leftovers, sweep_sockets
from slicebridge.processes import pid_alive

log = logging.getLogger(__name__)

_STATUS_TIMEOUT_S = 5.0
_STOP_WAIT_S = 15.0


@dataclass
class ServerStatus:
    connection_file: str
    state: str  # "running", "unresponsive", "refused" (file readable by others) or "stale" (process gone; file removed)
    pid: int = 0
    env: str = ""
    python: str = ""
    endpoint: str = ""
    log_path: str = ""
    uptime_s: float | None = None
    busy: bool | None = None
    queued: int | None = None
    counters: dict = field(default_factory=dict)


def start_detached(
    env: str,
    transport: str = "ipc",
    debug_ops: bool | None = None,
    max_message_bytes: int | None = None,
    ready_timeout: float = 120.0,
) -> tuple[ServerProcess, bool]:
    """Start the detached server for ``env``; returns (server, started) — started is False if one was running."""
    python_env = find_env(env)
    with detached_start_lock(python_env, ready_timeout + 2 * _STOP_WAIT_S):
        running = find_detached(python_env)
        if running is not None and _ping(running) is not None:
            return running, False
        for server in _processes_of(detached_connection_path(python_env.python)):
            _terminate(server)  # it does not answer, or its file is refused: the new file would hide it
        server = start_server(
            python_env,
            detached=True,
            transport=transport,
            debug_ops=debug_ops,
            max_message_bytes=max_message_bytes,
            ready_timeout=ready_timeout,
        )
    return server, True


def _processes_of(conn_path: Path) -> list[ServerProcess]:
    return [s for s in detached_server_processes() if s.conn_path == Path(conn_path).absolute()]


def _terminate(server: ServerProcess) -> ServerStatus:
    """Stop a detached server that cannot be asked, by signal (checked against its start time)."""
    log.warning(
        "stopping the detached server pid %d (%s) by signal: its connection file %s is refused, gone or not answered",
        server.pid,
        server.info.python,
        server.conn_path,
    )
    server.terminate(_STOP_WAIT_S)
    return ServerStatus(str(server.conn_path), "stopped", server.pid, server.info.env, server.info.python)


def _ping(server: ServerProcess, timeout: float = _STATUS_TIMEOUT_S) -> protocol.StatsResult | None:
    channel = Channel(server, heartbeat_timeout=timeout)
    try:
        body = channel.request("stats", protocol.StatsArgs(), timeout=timeout)
        return protocol.from_wire(protocol.StatsResult, body)
    except SlicebridgeError:
        return None
    finally:
        channel.close()


def status(env: str | None = None) -> list[ServerStatus]:
    """The detached servers (of ``env``, or all), removing files of servers that are gone."""
    paths = list_detached()
    if env is not None:
        wanted = detached_connection_path(find_env(env).python)
        paths = [p for p in paths if p == wanted]
    found = []
    for path in paths:
        try:
            info = read_connection_file(path)
        except ConnectionFileError as exc:
            log.warning("%s", exc)
            found += [ServerStatus(str(path), "refused", s.pid, s.info.env, s.info.python) for s in _processes_of(path)]
            continue
        item = ServerStatus(str(path), "stale", info.pid, info.env, info.python, info.endpoint, info.log_path)
        if not info.ready or not pid_alive(info.pid, info.server_start):
            if info.ready:  # it died: its socket and shm dir go with its file
                remove_leftovers(info)
            path.unlink(missing_ok=True)
            found.append(item)
            continue
        stats = _ping(ServerProcess(path, info))
        if stats is None:
            item.state = "unresponsive"
        else:
            item.state = "running"
            item.uptime_s, item.busy, item.queued = stats.uptime_s, stats.busy, stats.queued
            item.counters = stats.counters
        found.append(item)
    return found


def stop(env: str | None = None, connection_file: str | None = None) -> ServerStatus:
    """Stop a detached server: ask it to shut down, then kill it if it does not."""
    if connection_file is not None:
        path = Path(connection_file)
    else:
        path = detached_connection_path(find_env(env).python)
    server = attach(path, quiet=True)
    if server is None:
        stopped = [_terminate(s) for s in _processes_of(path)]  # behind a refused file
        path.unlink(missing_ok=True)
        if not stopped:
            raise ServerNotRunning(f"no slicebridge server is running for {env or connection_file!r}")
        return stopped[0]
    item = ServerStatus(
        str(path),
        "stopped",
        server.pid,
        server.info.env,
        server.info.python,
        server.info.endpoint,
        server.info.log_path,
    )
    channel = Channel(server, heartbeat_timeout=_STATUS_TIMEOUT_S)
    try:
        server.stop(channel, _STOP_WAIT_S)
    finally:
        channel.close()
    return item


def stop_all() -> list[ServerStatus]:
    """Stop every detached server: through its connection file, else (file refused or lost) by signal."""
    stopped = []
    for path in list_detached():
        try:
            stopped.append(stop(connection_file=str(path)))
        except ServerNotRunning:
            pass
    stopped += [_terminate(s) for s in detached_server_processes()]
    sweep_sockets()  # those of servers that were killed before this
    return stopped
