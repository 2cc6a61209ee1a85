"""The server's event loop: a ROUTER socket in front of one worker thread.

The I/O thread (the caller of :meth:`ServerLoop.run`) owns the ROUTER socket. It
verifies every message, answers heartbeats and the immediate operations (``ping``,
``stats``, ``shutdown``) at once, even while the worker is busy, queues the other
requests in arrival order, and forwards what the worker sends back to the client that
asked (each reply carries the routing identity of its request, so several clients
never see each other's replies).

The worker thread runs one handler at a time. A handler gets its typed arguments and a
:class:`RequestContext` through which it streams ``progress`` and ``log`` events and
notices cancellation. Exceptions become ``error`` replies with type, message and
traceback, and so does a reply that cannot be sent (too large, no room for it): every
request taken gets an answer and the worker lives on. A server owned by a client exits
when that client's process is gone; a detached one runs until ``shutdown`` or SIGTERM.

A client is gone when it has been silent for ``ORPHAN_TIMEOUT_S`` and the process it
named in its messages is no longer alive: a client that is paused (Ctrl-Z, a debugger,
a slow callback) keeps its request. The shared-memory buffers of replies that were not
taken are removed when the reply cannot be routed, when its client is gone, and at stop.
Only peers that know the key get past the handshake (see ``transport``); each wake-up
reads a bounded number of messages, so replies keep flowing under a flood, and dropped
messages are counted and logged as a periodic summary, never one line each.

This module is stdlib + pyzmq + msgpack; it runs in the slicegpt env.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import resource
import signal
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import zmq

from slicebridge.bridge import protocol, shm
from slicebridge.bridge.connection import (
    ConnectionInfo,
    ipc_endpoint,
    write_connection_file,
)
from slicebridge.bridge.errors import SlicebridgeError
from slicebridge.bridge.transport import Codec, Dropped, Gatekeeper, recv_frames, send_frames
from slicebridge.processes import pid_alive

log = logging.getLogger(__name__)

_OUTBOX = "inproc://slicebridge-outbox"
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)  # pyzmq's enums cost µs per use
_POLL_MS = 100
_OWNER_CHECK_S = 0.5
_PROGRESS_MIN_INTERVAL_S = 0.05
_SHUTDOWN_GRACE_S = 10.0
_SHM_SWEEP_S = 60.0  # how often shared-memory buffers nobody received are looked for
_RECEIVE_BATCH = 32  # messages read per wake-up before the replies waiting in the outbox go out
_DROP_LOG_INTERVAL_S = 10.0  # dropped messages are logged as one summary per interval
_MAX_OPEN_FILES = 65536  # the soft limit is raised towards this (the hard limit permitting)
# A client waiting for a reply sends a heartbeat every second. One silent for this long whose
# process is gone (killed, or on another machine) is an orphan: its running request is
# cancelled, its queued ones dropped, the buffers of its untaken replies removed.
ORPHAN_TIMEOUT_S = 6.0
# How torch says that a host or GPU allocation failed, when it raises a plain RuntimeError.
_ALLOCATION_FAILURES = (
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
    "CUDA out of memory",
)

Handler = Callable[[Any, "RequestContext"], Any]


class Cancelled(SlicebridgeError):
    """Raised inside a handler by :meth:`RequestContext.check_cancelled`."""


class HandlerError(SlicebridgeError):
    """An error a handler raises on purpose: its class name and message reach the user as they are.

    Subclasses name the error type the client sees (``error_type`` defaults to the class name).
    """

    error_type: str = ""


@dataclasses.dataclass
class ServerState:
    info: ConnectionInfo
    started_at: float = dataclasses.field(default_factory=time.time)
    counters: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    busy: bool = False
    queued: int = 0


class RequestContext:
    """What a handler may do besides returning: report progress, log, notice cancellation."""

    def __init__(self, request_id: str, identity: bytes, op: str, send: Callable, state: ServerState):
        self.request_id = request_id
        self.identity = identity
        self.op = op
        self.state = state
        self.cancelled = threading.Event()
        self._send = send
        self._last_progress = 0.0

    def progress(
        self, stage: str, done: float = 0, total: float | None = None, unit: str = "", message: str = ""
    ) -> None:
        now = time.monotonic()
        final = total is not None and done >= total
        if not final and now - self._last_progress < _PROGRESS_MIN_INTERVAL_S:
            return
        self._last_progress = now
        event = protocol.Progress(stage, done, total, unit, message)
        self._send(self, protocol.PROGRESS, protocol.to_wire(event))
        self.check_cancelled()

    def log(self, level: str, message: str, logger: str = "slicebridge.server") -> None:
        self._send(self, protocol.LOG, protocol.to_wire(protocol.LogRecord(level, message, logger)))

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled(f"request {self.op} was cancelled")


_current = threading.local()


def current_request() -> RequestContext | None:
    """The request the calling (worker) thread is serving, if any."""
    return getattr(_current, "ctx", None)


class _ForwardLogs(logging.Handler):
    """Sends records logged by slicebridge code during a request to that request's client."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.current = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        ctx = getattr(self.current, "ctx", None)
        if ctx is not None and record.name.startswith("slicebridge"):
            try:
                ctx.log(record.levelname, record.getMessage(), record.name)
            except Exception:  # a log event must never break the request
                pass


class _Caller(NamedTuple):
    """Whom to answer: all that an immediate operation, or an error before a request is queued, needs
    (a ping costs no ``RequestContext``, whose Event alone takes 2 µs to make)."""

    request_id: str
    identity: bytes


@dataclasses.dataclass
class _Job:
    ctx: RequestContext
    args: Any


@dataclasses.dataclass
class _Client:
    """What the server knows of one client connection (a routing identity)."""

    last_heard: float
    pid: int = 0  # the client's process and its start time, as its messages say
    start: str = ""
    buffers: list = dataclasses.field(default_factory=list)  # shm buffers of replies sent, maybe untaken

    def note_process(self, body: Any) -> None:
        facts = body.get("client") if isinstance(body, dict) else None
        if isinstance(facts, dict) and isinstance(facts.get("pid"), int) and isinstance(facts.get("start"), str):
            self.pid, self.start = facts["pid"], facts["start"]

    def process_alive(self) -> bool:
        return bool(self.pid) and pid_alive(self.pid, self.start)


def is_out_of_memory(exc: BaseException) -> bool:
    return (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or (isinstance(exc, RuntimeError) and any(text in str(exc) for text in _ALLOCATION_FAILURES))
    )


class ServerLoop:
    """Serves requests on the endpoint described by a connection file until told to stop."""

    def __init__(
        self,
        conn_path: Path,
        info: ConnectionInfo,
        handlers: dict[str, Handler],
        runtime_facts: Callable[[], dict] = dict,
        on_out_of_memory: Callable[[], None] = lambda: None,
    ):
        self.conn_path = Path(conn_path)
        self.on_out_of_memory = on_out_of_memory
        # ``hello`` is answered by the I/O thread, never queued behind work: its facts (which
        # import torch) are gathered once by a warm-up thread; hellos that arrive before
        # that is done wait in _pending_hellos.
        self._runtime_facts = runtime_facts
        self._facts: dict | None = None
        self._facts_ready = threading.Event()
        self._pending_hellos: list[_Caller] = []
        self.info = info
        self.handlers = handlers
        self.state = ServerState(info)
        info.shm_dir = str(shm.shm_dir()) if info.shared_memory else ""
        self.codec = Codec(
            info.key, info.max_message_bytes, shared_memory=info.shared_memory, shm_dir=info.shm_dir or None
        )
        self.context = zmq.Context.instance()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._jobs_cv = threading.Condition()
        self._running: _Job | None = None
        self._stopping = threading.Event()
        self._forward_logs = _ForwardLogs()
        self._socket_path: str | None = None
        self._clients: dict[bytes, _Client] = {}
        self._thread_sockets = threading.local()  # each worker thread's PUSH socket to the outbox
        self._drops: collections.Counter = collections.Counter()  # since the last summary in the log
        self._next_drop_log = 0.0
        self._refused_logged = 0
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def bind(self) -> None:
        """Bind the ROUTER socket and tell clients (through the connection file) that we are ready."""
        self.gatekeeper = Gatekeeper(self.context, self.info.key)
        router = self.context.socket(zmq.ROUTER)
        Gatekeeper.guard(router)
        router.setsockopt(zmq.LINGER, 1000)
        router.setsockopt(zmq.MAXMSGSIZE, self.info.max_message_bytes + 65536)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable reply raises: its buffers can go
        if self.info.transport == "tcp":
            router.bind(f"tcp://{self.info.ip}:*")
        else:
            endpoint = self.info.endpoint or ipc_endpoint(f"server-{os.getpid()}")
            self._socket_path = endpoint[len("ipc://") :]
            old_umask = os.umask(0o177)
            try:
                router.bind(endpoint)
            finally:
                os.umask(old_umask)
            os.chmod(self._socket_path, 0o600)
        self.router = router
        self.info.endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.info.pid = os.getpid()
        self.info.ready = True
        self.outbox = self.context.socket(zmq.PULL)
        self.outbox.bind(_OUTBOX)
        write_connection_file(self.info, self.conn_path)
        log.info(
            "listening on %s (pid %d, %s)",
            self.info.endpoint,
            self.info.pid,
            "detached" if self.info.detached else f"owned by pid {self.info.owner_pid}",
        )

    def run(self) -> None:
        _raise_open_files_limit()
        # Before bind announces "ready": a SIGTERM from then on is a clean stop, never a kill that
        # leaves the socket and the shared-memory dir behind.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stopping.set())
        self.bind()
        logging.getLogger("slicebridge").addHandler(self._forward_logs)
        threading.Thread(target=self._warm_up, name="slicebridge-warm-up", daemon=True).start()
        worker = self._worker = threading.Thread(target=self._work, name="slicebridge-worker", daemon=True)
        worker.start()
        try:
            self._serve()
        finally:
            self._shut_down(worker)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.outbox, zmq.POLLIN)
        next_owner_check = 0.0
        next_sweep = 0.0
        while not self._stopping.is_set():
            events = dict(poller.poll(_POLL_MS))
            if self.outbox in events:
                self._flush_outbox()
            if self.router in events:
                self._receive()
            if self._pending_hellos and self._facts_ready.is_set():
                for ctx in self._pending_hellos:
                    self._answer_hello(ctx)
                self._pending_hellos.clear()
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + _SHM_SWEEP_S
                shm.sweep()
            if now >= next_owner_check:
                next_owner_check = now + _OWNER_CHECK_S
                self._check_health(now)

    def _check_health(self, now: float) -> None:
        """Twice a second: orphaned clients, the drop summary, the worker, the owner."""
        self._cancel_orphans(now)
        if now >= self._next_drop_log:
            self._log_drops(now)
        if not self._worker.is_alive():
            log.error("the worker thread died; exiting so that clients see a dead server, not a silent one")
            self._stopping.set()
        if self.info.owner_pid and not pid_alive(self.info.owner_pid, self.info.owner_start):
            log.info("owner pid %d is gone; exiting", self.info.owner_pid)
            self._stopping.set()

    def _shut_down(self, worker: threading.Thread) -> None:
        log.info("shutting down")
        with self._jobs_cv:
            pending, self._jobs = list(self._jobs), collections.deque()
            if self._running is not None:
                self._running.ctx.cancelled.set()
            self._jobs_cv.notify_all()
        for job in pending:
            self._send_error(job.ctx, "RequestCancelled", "the server is shutting down")
        worker.join(_SHUTDOWN_GRACE_S)
        self._flush_outbox()
        self.router.close(linger=1000)
        self.outbox.close(linger=0)
        self.gatekeeper.close()
        shm.remove_own_dir()  # with the buffers of replies nobody took
        if self._socket_path:
            Path(self._socket_path).unlink(missing_ok=True)
        try:
            self.conn_path.unlink(missing_ok=True)
        except OSError:
            pass
        log.info("stopped")

    # ------------------------------------------------------------------ receiving

    def _receive(self) -> None:
        # Frames arrive as bytes: tensors of 1 MiB or more come through shared memory, so
        # copying the rest is cheaper than zmq.Frame objects. One recv per wake-up is typical;
        # the EVENTS check (no exception) says whether more are waiting. At most a batch is
        # read before the loop flushes the outbox again: a flood never holds up the replies.
        for _ in range(_RECEIVE_BATCH):
            frames = recv_frames(self.router)
            self._handle(frames[0], frames[1:])
            if not self.router.getsockopt(_EVENTS) & _POLLIN:
                return

    def _handle(self, identity: bytes, rest: list) -> None:
        try:
            message = self.codec.unpack(rest, protocol.CLIENT_KINDS)
        except Dropped as dropped:
            self.state.counters[dropped.reason] += 1
            self._drops[dropped.reason] += 1
            return
        self.state.counters["received"] += 1
        client = self._client(identity)
        client.last_heard = time.monotonic()
        client.note_process(message.body)
        if message.kind == protocol.HEARTBEAT:
            self._send_now(identity, protocol.Message(protocol.HEARTBEAT, message.request_id, {}))
        elif message.kind == protocol.CANCEL:
            self._cancel(message.request_id)
        else:
            self._accept_request(identity, message)

    def _accept_request(self, identity: bytes, message: protocol.Message) -> None:
        caller = _Caller(message.request_id, identity)
        body = message.body
        if not isinstance(body, dict) or not isinstance(body.get("op"), str):
            return self._send_error(caller, "BadRequest", "a request needs an 'op' name and 'args' map")
        op_name = body["op"]
        operation = protocol.OPERATIONS.get(op_name)
        if (
            operation is None
            or (operation.diagnostic and not self.info.debug_ops)
            or (not operation.immediate and op_name not in self.handlers)
        ):
            known = sorted(
                n
                for n, o in protocol.OPERATIONS.items()
                if (o.immediate or n in self.handlers) and (self.info.debug_ops or not o.diagnostic)
            )
            return self._send_error(
                caller, "BadRequest", f"unknown operation {op_name!r}; this server knows {', '.join(known)}"
            )
        try:
            args = protocol.from_wire(operation.args, body.get("args", {}))
        except TypeError as exc:
            return self._send_error(caller, "BadRequest", str(exc))
        self.state.counters["requests"] += 1
        if operation.immediate:
            return self._answer_immediately(caller, op_name)
        if self._stopping.is_set():
            return self._send_error(caller, "RequestCancelled", "the server is shutting down")
        ctx = RequestContext(message.request_id, identity, op_name, self._send_from_worker, self.state)
        with self._jobs_cv:
            self._jobs.append(_Job(ctx, args))
            self.state.queued = len(self._jobs)
            self._jobs_cv.notify()

    def _warm_up(self) -> None:
        try:
            self._facts = self._runtime_facts()
        except Exception as exc:  # reported to every hello instead of hanging them
            log.exception("gathering the runtime facts failed")
            self._facts = {"error": f"{type(exc).__name__}: {exc}"}
        self._facts_ready.set()

    def _answer_hello(self, ctx: _Caller) -> None:
        facts = self._facts or {}
        if "error" in facts:
            return self._send_error(ctx, "ServerBroken", f"the server cannot describe itself: {facts['error']}")
        result = {**facts, "started_at": self.state.started_at, "detached": self.info.detached}
        self._send_now(ctx.identity, protocol.Message(protocol.RESULT, ctx.request_id, result))

    def _answer_immediately(self, ctx: _Caller, op_name: str) -> None:
        state = self.state
        if op_name == "hello":
            if self._facts_ready.is_set():
                self._answer_hello(ctx)
            else:
                self._pending_hellos.append(ctx)
            return
        if op_name == "ping":
            result = protocol.PingResult(os.getpid(), time.time(), state.busy, state.queued)
        elif op_name == "stats":
            result = protocol.StatsResult(
                os.getpid(),
                time.time() - state.started_at,
                dict(state.counters),
                state.busy,
                state.queued,
                self.info.detached,
            )
        else:  # shutdown
            result = protocol.ShutdownResult(os.getpid())
            self._stopping.set()
        self._send_now(ctx.identity, protocol.Message(protocol.RESULT, ctx.request_id, protocol.to_wire(result)))

    def _client(self, identity: bytes) -> _Client:
        client = self._clients.get(identity)
        if client is None:
            client = self._clients[identity] = _Client(time.monotonic())
        return client

    def _log_drops(self, now: float) -> None:
        """One summary line for the messages dropped and the connections refused since the last."""
        refused = self.gatekeeper.refused - self._refused_logged
        self._refused_logged += refused
        self.state.counters["refused_connections"] = self.gatekeeper.refused
        if self._drops or refused:
            log.warning(
                "in the last %.0fs: dropped %d message(s) (%s), refused %d connection(s) without the key",
                _DROP_LOG_INTERVAL_S,
                sum(self._drops.values()),
                ", ".join(f"{n} {reason}" for reason, n in sorted(self._drops.items())) or "none",
                refused,
            )
            self._drops.clear()
            self._next_drop_log = now + _DROP_LOG_INTERVAL_S

    def _cancel_orphans(self, now: float) -> None:
        """Cancel the work of clients that went silent and whose process is gone (Paranoid Pirate)."""
        for client in self._clients.values():
            client.buffers = [name for name in client.buffers if os.path.exists(os.path.join(self.info.shm_dir, name))]
        silent = {identity for identity, c in self._clients.items() if now - c.last_heard > ORPHAN_TIMEOUT_S}
        gone = {identity for identity in silent if not self._clients[identity].process_alive()}
        with self._jobs_cv:
            busy = {job.ctx.identity for job in self._jobs}
            running = self._running
            if running is not None:
                busy.add(running.ctx.identity)
            for job in [j for j in self._jobs if j.ctx.identity in gone]:
                self._jobs.remove(job)
                self.state.counters["orphans_dropped"] += 1
            self.state.queued = len(self._jobs)
            if running is not None and running.ctx.identity in gone and not running.ctx.cancelled.is_set():
                log.warning("the client of %s is gone; cancelling it", running.ctx.op)
                running.ctx.cancelled.set()
                self.state.counters["orphans_cancelled"] += 1
        for identity in silent:
            client = self._clients[identity]
            if identity in gone:
                self.codec.discard_names(client.buffers)
                client.buffers = []
            if identity in gone or (identity not in busy and not client.buffers):
                del self._clients[identity]  # gone, or idle with nothing waiting for it

    def _cancel(self, request_id: str) -> None:
        with self._jobs_cv:
            for job in list(self._jobs):
                if job.ctx.request_id == request_id:
                    self._jobs.remove(job)
                    self.state.queued = len(self._jobs)
                    self._send_error(job.ctx, "RequestCancelled", "cancelled before it started")
                    return
            if self._running is not None and self._running.ctx.request_id == request_id:
                self._running.ctx.cancelled.set()
                log.info("cancelling %s", self._running.ctx.op)

    # ------------------------------------------------------------------ sending

    def _send_now(self, identity: bytes, message: protocol.Message) -> None:
        """Send from the I/O thread."""
        self._route([identity, *self.codec.pack(message)])

    def _flush_outbox(self) -> None:
        while True:
            try:
                frames = self.outbox.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._route(frames)

    def _route(self, frames: list) -> None:
        """Send ``[identity, *packed]``; a reply its client cannot take has its buffers removed."""
        names = self.codec.shared_names(frames[1:])
        try:
            send_frames(self.router, frames, _NOBLOCK)
        except zmq.ZMQError:  # EHOSTUNREACH: the client is gone; EAGAIN: it does not read
            self.codec.discard_names(names)
            self.state.counters["undeliverable"] += 1
            return
        self.state.counters["sent"] += 1
        if names:
            self._client(bytes(frames[0])).buffers.extend(names)

    def _send_from_worker(self, ctx: RequestContext | _Caller, kind: str, body: Any) -> None:
        """Send from the worker thread, through the inproc outbox to the I/O thread."""
        frames = self.codec.pack(protocol.Message(kind, ctx.request_id, body))
        sock = getattr(self._thread_sockets, "push", None)
        if sock is None:
            sock = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 5000)
            sock.connect(_OUTBOX)
            self._thread_sockets.push = sock
        send_frames(sock, [ctx.identity, *frames])

    def _send_error(self, ctx: RequestContext | _Caller, error_type: str, message: str, tb: str = "") -> None:
        body = protocol.to_wire(protocol.ErrorInfo(error_type, message, tb))
        self.state.counters["errors"] += 1
        if threading.current_thread() is threading.main_thread():
            self._send_now(ctx.identity, protocol.Message(protocol.ERROR, ctx.request_id, body))
        else:
            self._send_from_worker(ctx, protocol.ERROR, body)

    # ------------------------------------------------------------------ the worker

    def _work(self) -> None:
        while True:
            with self._jobs_cv:
                while not self._jobs and not self._stopping.is_set():
                    self._jobs_cv.wait(0.5)
                if self._stopping.is_set() and not self._jobs:
                    return
                job = self._jobs.popleft()
                self._running = job
                self.state.queued = len(self._jobs)
                self.state.busy = True
            try:
                self._run_job(job)
            except Exception:  # not even an error reply could be sent; the worker lives on
                log.exception("answering %s failed", job.ctx.op)
            finally:
                with self._jobs_cv:
                    self._running = None
                    self.state.busy = False

    def _run_job(self, job: _Job) -> None:
        ctx = job.ctx
        handler = self.handlers[ctx.op]
        self._forward_logs.current.ctx = ctx
        _current.ctx = ctx
        started = time.perf_counter()
        try:
            result = handler(job.args, ctx)
            self._send_from_worker(ctx, protocol.RESULT, protocol.to_wire(result))
        except Cancelled as exc:
            self._send_error(ctx, "RequestCancelled", str(exc))
        except Exception as exc:  # every failure, sending the result included, becomes an error reply
            if is_out_of_memory(exc):  # host or CUDA
                self._out_of_memory(ctx, exc)
            else:
                error_type = getattr(exc, "error_type", "") or type(exc).__name__
                log.debug("%s failed: %s", ctx.op, exc)
                self._send_error(ctx, error_type, str(exc), traceback.format_exc())
        except KeyboardInterrupt:
            self._send_error(ctx, "RequestCancelled", "interrupted")
        else:
            self.state.counters["completed"] += 1
            log.debug("%s done in %.3fs", ctx.op, time.perf_counter() - started)
        finally:
            self._forward_logs.current.ctx = None
            _current.ctx = None

    def _out_of_memory(self, ctx: RequestContext, exc: BaseException) -> None:
        where = "GPU" if type(exc).__name__ == "OutOfMemoryError" or "CUDA" in str(exc) else "host"
        tb = traceback.format_exc()
        # Still inside the except clause, the exception keeps the failed request's frames alive, and with them what
        # it had allocated (a model half moved to the GPU): clear their locals, so that freeing below frees it.
        traceback.clear_frames(exc.__traceback__)
        del exc
        try:
            self.on_out_of_memory()
        except Exception:  # freeing memory is best effort
            log.exception("freeing memory after an out-of-memory error failed")
        self._send_error(
            ctx,
            "OutOfMemory",
            f"the server ran out of {where} memory serving {ctx.op}; it freed what it could and "
            "keeps serving (the warm cache keeps what fits SLICEBRIDGE_CACHE_BYTES; device='cpu' "
            "avoids the GPU's limit)",
            tb,
        )


def _raise_open_files_limit() -> None:
    """Lift the soft limit on open files towards the hard one: connections must not starve the work."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, _MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
