"""The client's end of the bridge: one DEALER socket, requests, events, heartbeats.

:meth:`Channel.request` sends a request and waits for its final ``result`` or
``error``, handing ``progress``/``log`` events to a callback on the way. While it
waits it watches the server twice: the process itself (a SIGKILLed server is noticed
within a poll interval) and heartbeats (a server that stops answering for
``heartbeat_timeout`` seconds is declared dead). Either way it raises
:class:`ServerDied` with the tail of the server's stderr. Ctrl-C while waiting sends
``cancel`` for the request, waits briefly for the server to confirm, and re-raises.

Requests and heartbeats name this process (pid and start time), so the server keeps a
request whose client is paused (Ctrl-Z, a debugger, a slow ``on_event``) rather than
gone; and time this client itself was not running does not count as the server's silence.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import zmq

from slicebridge.bridge import protocol
from slicebridge.bridge.errors import RequestTimeout, ServerDied, remote_error
from slicebridge.bridge.launcher import ServerProcess
from slicebridge.bridge.transport import Codec, Dropped, admit, recv_frames, send_frames
from slicebridge.processes import process_start_time

log = logging.getLogger(__name__)

EventCallback = Callable[[str, Any], None]
_POLL_MS = 50
_CANCEL_GRACE_S = 5.0


class Channel:
    def __init__(self, server: ServerProcess, heartbeat_interval: float = 1.0, heartbeat_timeout: float = 10.0):
        self.server = server
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        info = server.info
        shared = info.shared_memory and bool(info.shm_dir)
        self.codec = Codec(info.key, info.max_message_bytes, shared_memory=shared, shm_dir=info.shm_dir or None)
        self._me = {"pid": os.getpid(), "start": process_start_time(os.getpid())}
        self._context = zmq.Context.instance()
        self.socket = self._context.socket(zmq.DEALER)
        admit(self.socket, info.key)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, info.max_message_bytes + 65536)
        self.socket.setsockopt(zmq.RCVTIMEO, _POLL_MS)  # a receive waits this long at most (see _wait)
        self.socket.connect(info.endpoint)
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.socket.close(linger=0)
            self.closed = True

    def send(self, message: protocol.Message) -> None:
        send_frames(self.socket, self.codec.pack(message))

    def request(
        self, op: str, args: Any = None, on_event: EventCallback | None = None, timeout: float | None = None
    ) -> Any:
        """Send ``op`` with ``args`` and return the result body (raises the remote error)."""
        message = protocol.new_request(op, args)
        message.body["client"] = self._me
        self.send(message)
        try:
            return self._wait(message.request_id, op, on_event, timeout)
        except KeyboardInterrupt:
            self._cancel_and_drain(message.request_id, op)
            raise

    def cancel(self, request_id: str) -> None:
        self.send(protocol.Message(protocol.CANCEL, request_id, {}))

    def _cancel_and_drain(self, request_id: str, op: str) -> None:
        """After Ctrl-C: ask the server to stop the request and wait (briefly) until it has."""
        try:
            self.cancel(request_id)
            self._wait(request_id, op, None, _CANCEL_GRACE_S)
        except Exception:  # the request ended one way or another; the server is free
            pass

    def _wait(self, request_id: str, op: str, on_event: EventCallback | None, timeout: float | None) -> Any:
        now = time.monotonic()
        deadline = now + timeout if timeout else None
        last_heard = last_turn = now
        next_heartbeat = now + self.heartbeat_interval
        while True:
            now = time.monotonic()
            if now - last_turn > 2 * self.heartbeat_interval:  # this process was paused, not the server
                last_heard, next_heartbeat = now, now
            last_turn = now
            message = self._receive()  # waits up to _POLL_MS: a blocking receive, no poll before it
            if message is not None:
                last_heard = time.monotonic()
                if message.request_id == request_id:
                    if message.kind == protocol.RESULT:
                        return message.body
                    if message.kind == protocol.ERROR:
                        body = message.body if isinstance(message.body, dict) else {}
                        raise remote_error(
                            str(body.get("error_type", "RemoteError")),
                            str(body.get("message", "")),
                            str(body.get("traceback", "")),
                        )
                    if message.kind in (protocol.PROGRESS, protocol.LOG) and on_event is not None:
                        on_event(message.kind, message.body)
                continue
            now = time.monotonic()
            if not self.server.alive():
                code = self.server.exit_code()
                raise ServerDied(
                    f"the slicebridge server (pid {self.server.pid}) died while serving {op!r}"
                    + (f" (exit code {code})" if code is not None else ""),
                    self.server.stderr_tail(),
                    code,
                )
            if now - last_heard > self.heartbeat_timeout:
                raise ServerDied(
                    f"the slicebridge server (pid {self.server.pid}) stopped answering: no reply or "
                    f"heartbeat for {self.heartbeat_timeout:.0f}s while serving {op!r}",
                    self.server.stderr_tail(),
                )
            if deadline is not None and now > deadline:
                self.cancel(request_id)
                raise RequestTimeout(f"{op!r} did not finish within {timeout}s; it was cancelled")
            if now >= next_heartbeat:
                self.send(protocol.Message(protocol.HEARTBEAT, request_id, {"client": self._me}))
                next_heartbeat = now + self.heartbeat_interval

    def _receive(self) -> protocol.Message | None:
        """The next message from the server; None when none came within _POLL_MS or it was dropped."""
        try:
            frames = recv_frames(self.socket)  # bytes: large tensors come through shared memory
        except zmq.Again:
            return None
        try:
            return self.codec.unpack(frames, protocol.SERVER_KINDS)
        except Dropped as dropped:
            log.warning("dropped a message from the server: %s", dropped)
            return None
