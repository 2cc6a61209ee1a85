"""Round trip of the bridge (``ping``) over ipc and tcp, against spawning the env's python and against
the bound: a raw pyzmq ping between the same two kinds of process.

Peer baseline: ``<slicegpt env>/bin/python -c pass`` (the cost of the seed's approach for even the
smallest remote call: a new interpreter). Subject: ``bridge.ping()`` on a warm bridge, many times per
repeat; p50/p90/p99 per repeat, median and spread over repeats.

Bound, measured alternately with the subject in every repeat: a raw pyzmq ROUTER in a second process
of the slicegpt env's python that echoes what a plain DEALER here sends it (``send_multipart``, then a
blocking ``recv_multipart``) over the same transport, with the frames of a bridge ping (same sizes),
no signing. Target: bridge p50 ≤ 2× raw p50 and bridge p99 ≤ 3× raw p99.

Breakdown, measured in the same run:
- a middle step between the two: the same echo process doing the bridge's message handling
  (``Codec.unpack`` of the request, the ``PingResult``, ``Codec.pack`` of the reply) and this side
  doing the client's (``new_request``, ``Codec.pack``, ``Codec.unpack``, ``result_from_wire``) around
  the bridge's own frame I/O: raw → + signing and msgpack on both sides → + the server's event loop and
  the client API = the bridge;
- the CPU time of each part of a ping's message handling, timed in this thread on the same code
  (thread CPU time, the least of many batches: what the code costs without the machine's other load).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import time

from common import (
    Context,
    PySpy,
    Row,
    busy_frames,
    fmt_seconds,
    percentile,
    ratio_of_minimums,
    ratio_summary,
    run_python,
    summary,
)

NAME = "ping"

RAW_ECHO = r"""
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.bind(sys.argv[1])
print(s.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
while True:
    frames = s.recv_multipart(copy=False)
    if len(frames) == 2 and frames[1].bytes == b"stop":
        break
    s.send_multipart(frames, copy=False)
"""

# The server's message handling for a ping, without its event loop: the middle step of the breakdown.
CODEC_ECHO = r"""
import os, sys, time, zmq
sys.path.insert(0, sys.argv[2])
from slicebridge.bridge import protocol
from slicebridge.bridge.transport import Codec, recv_frames, send_frames
codec = Codec(sys.stdin.readline().strip())
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.bind(sys.argv[1])
print(s.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
while True:
    identity, *frames = recv_frames(s)
    if frames == [b"stop"]:
        break
    request = codec.unpack(frames, protocol.CLIENT_KINDS)
    protocol.from_wire(protocol.PingArgs, request.body["args"])
    result = protocol.to_wire(protocol.PingResult(os.getpid(), time.time(), False, 0))
    send_frames(s, [identity, *codec.pack(protocol.Message(protocol.RESULT, request.request_id, result))])
"""

_ROUNDS = 10  # turns per repeat: each subject's pings of a repeat are spread over its whole duration
TARGET = {
    "text": "p50 ≤ 2× raw, p99 ≤ 3× raw",
    "conditions": [{"metric": "ratio", "op": "<=", "value": 2}, {"metric": "p99_ratio", "op": "<=", "value": 3}],
}


class Echo:
    """An echo process of the slicegpt env (``RAW_ECHO`` or ``CODEC_ECHO``) and a DEALER here connected to it."""

    def __init__(self, env_python, endpoint: str, script: str = RAW_ECHO, args: tuple = (), stdin: str = ""):
        self.env_python, self.endpoint, self.script, self.args, self.stdin = env_python, endpoint, script, args, stdin

    def __enter__(self) -> Echo:
        import zmq

        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.proc = subprocess.Popen(
            [str(self.env_python), "-I", "-c", self.script, self.endpoint, *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.proc.stdin.write(self.stdin + "\n")
        self.proc.stdin.close()
        bound = self.proc.stdout.readline().strip()  # the endpoint it is bound to (tcp: the port it got)
        if not bound:
            self.proc.wait(10)
            raise RuntimeError(f"the echo process exited ({self.proc.returncode}) before binding {self.endpoint}")
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(bound)
        return self

    def round_trips(self, frames: list, count: int, warmup: int = 0) -> list[float]:
        """Seconds per round trip of ``frames``: plain pyzmq, ``send_multipart`` then a blocking ``recv_multipart``."""
        sock, out = self.sock, []
        for i in range(count + warmup):
            started = time.perf_counter()
            sock.send_multipart(frames, copy=False)
            sock.recv_multipart(copy=False)
            if i >= warmup:
                out.append(time.perf_counter() - started)
        return out

    def codec_round_trips(self, codec, me: dict, count: int) -> list[float]:
        """Seconds per ping with the client's message handling (for a ``CODEC_ECHO``), without the client API."""
        from slicebridge.bridge import protocol
        from slicebridge.bridge.transport import recv_frames, send_frames

        sock, out = self.sock, []
        for _ in range(count):
            started = time.perf_counter()
            message = protocol.new_request("ping", protocol.PingArgs())
            message.body["client"] = me
            send_frames(sock, codec.pack(message))
            reply = codec.unpack(recv_frames(sock), protocol.SERVER_KINDS)
            protocol.result_from_wire(protocol.PingResult, reply.body)
            out.append(time.perf_counter() - started)
        return out

    def __exit__(self, *exc) -> None:
        try:
            self.sock.send(b"stop")
            self.sock.close()
            self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def zmq_floor(env_python, endpoint: str, frames: list, count: int) -> list[float]:
    """Round trips of ``frames`` through a raw pyzmq echo in the slicegpt env (``echo``'s transport floor)."""
    with Echo(env_python, endpoint) as echo:
        return echo.round_trips(frames, count, warmup=min(200, count))


def _cpu_per_call(fn, prepare=None, number: int = 2000, batches: int = 15) -> float:
    """Thread CPU seconds per call of ``fn``: the least over ``batches`` batches of ``number`` calls
    (``prepare()`` before each batch, untimed)."""
    best = float("inf")
    for _ in range(batches):
        if prepare is not None:
            prepare()
        started = time.thread_time_ns()
        for _ in range(number):
            fn()
        best = min(best, (time.thread_time_ns() - started) / number / 1e9)
    return best


def cpu_parts(number: int = 2000) -> dict[str, dict[str, float]]:
    """CPU seconds per ping of each part of its message handling, both sides, timed in this thread on the
    product's code (the server's codec with shared memory on, as an ipc server has it)."""
    import zmq

    a, b = zmq.Context.instance().socket(zmq.DEALER), zmq.Context.instance().socket(zmq.ROUTER)
    b.bind("inproc://bench-ping-cpu")
    a.connect("inproc://bench-ping-cpu")
    try:
        parts = _parts(number, a, b)
        return {
            side: {name: _cpu_per_call(*part, number=number) for name, part in items.items()}
            for side, items in parts.items()
        }
    finally:
        a.close(0)
        b.close(0)


def _parts(number: int, dealer, router) -> dict[str, dict[str, tuple]]:
    """The parts ``cpu_parts`` times: ``(fn, prepare)`` each, by side."""
    from slicebridge.bridge import protocol
    from slicebridge.bridge.signing import new_key
    from slicebridge.bridge.transport import Codec

    key = new_key()
    client, server = Codec(key), Codec(key, shared_memory=True)
    me = {"pid": os.getpid(), "start": "1234.56"}
    body = protocol.to_wire(protocol.PingResult(os.getpid(), time.time(), False, 0))
    pending: dict[str, object] = {}

    def request() -> protocol.Message:
        message = protocol.new_request("ping", protocol.PingArgs())
        message.body["client"] = me
        return message

    def reply() -> list:
        return server.pack(protocol.Message(protocol.RESULT, "r" * 20, body))

    def answer() -> dict:
        protocol.from_wire(protocol.PingArgs, {})
        return protocol.to_wire(protocol.PingResult(os.getpid(), time.time(), False, 0))

    def fresh(name, make):  # unpack needs a new message each time (the replay guard)
        return lambda: pending.__setitem__(name, iter([make() for _ in range(number)]))

    return {
        "client": {
            "new_request + Codec.pack": (lambda: client.pack(request()), None),
            "Codec.unpack of the reply": (
                lambda: client.unpack(next(pending["reply"]), protocol.SERVER_KINDS),
                fresh("reply", reply),
            ),
            "result_from_wire + received_tensors": (
                lambda: protocol.received_tensors(protocol.result_from_wire(protocol.PingResult, body)),
                None,
            ),
        },
        "server": {
            "Codec.unpack of the request": (
                lambda: server.unpack(next(pending["request"]), protocol.CLIENT_KINDS),
                fresh("request", lambda: client.pack(request())),
            ),
            "from_wire(PingArgs) + PingResult + to_wire": (answer, None),
            "Codec.pack of the reply": (reply, None),
        },
        "inside": _inside_parts(client, client.pack(request()), dealer, router),
    }


def _inside_parts(codec, packed: list, dealer, router) -> dict[str, tuple]:
    """The pieces the message handling is made of (``cpu_parts``'s "inside")."""
    import msgpack

    from slicebridge.bridge import protocol
    from slicebridge.bridge.signing import ReplayGuard
    from slicebridge.bridge.transport import recv_frames, send_frames

    header = packed[2]
    header_map = msgpack.unpackb(header)
    body = msgpack.unpackb(header_map["body"])
    guard, ids = ReplayGuard(), iter(range(10**9))
    return {
        "zmq frame I/O of a ping, one way (send_frames + recv_frames, inproc)": (
            lambda: (send_frames(dealer, packed), recv_frames(router)),
            None,
        ),
        "HMAC-SHA256 of a header (a check is the same + a compare)": (lambda: codec.signer.sign([header]), None),
        "msgpack.packb of a header": (lambda: msgpack.packb(header_map, use_bin_type=True), None),
        "msgpack.unpackb of a header": (lambda: msgpack.unpackb(header, raw=False), None),
        "protocol.encode (body, header)": (lambda: protocol.encode(protocol.Message("result", "r", body)), None),
        "protocol.decode (header, body; checked)": (lambda: protocol.decode(header, []), None),
        "ReplayGuard.accept": (lambda: guard.accept(str(next(ids)), time.time()), None),
    }


def _latencies(bridge, count: int) -> list[float]:
    return [bridge.ping() for _ in range(count)]


def _loadavg() -> float:
    try:
        with open("/proc/loadavg") as fh:
            return float(fh.read().split()[0])
    except OSError:
        return float("nan")


def run(ctx: Context) -> list[Row]:
    from slicebridge import Bridge
    from slicebridge.bridge import protocol
    from slicebridge.bridge.signing import new_key
    from slicebridge.bridge.transport import Codec
    from slicebridge.processes import process_start_time

    reps = ctx.reps(10, smoke=2)
    count = 200 if ctx.smoke else 3000
    for _ in range(2):  # warm the file cache for the interpreter
        run_python(ctx.env_python, "pass", isolated=False)
    me = {"pid": os.getpid(), "start": process_start_time(os.getpid())}
    request = protocol.new_request("ping", protocol.PingArgs())
    request.body["client"] = me  # as Channel sends it: the raw ping moves the same bytes
    frames = Codec(new_key()).pack(request)
    bridges = {"ipc": ctx.bridge(), "tcp": Bridge(env=str(ctx.env_prefix), attach=False, transport="tcp").start()}
    load_start = _loadavg()
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        stack.callback(bridges["tcp"].close)
        key = new_key()
        codec = Codec(key)  # this side of the middle step
        subjects = {}
        for t, bridge in bridges.items():
            raw = stack.enter_context(Echo(ctx.env_python, _endpoint(t, "raw")))
            subjects[t] = {"raw": lambda n, raw=raw: raw.round_trips(frames, n)}
            try:
                middle = stack.enter_context(_codec_echo(ctx, t, key))
                subjects[t]["codec"] = lambda n, middle=middle: middle.codec_round_trips(codec, me, n)
            except Exception as exc:  # the product's internals changed: the middle step is left out, said so
                notes.append(f"{t}: the codec-only echo did not run ({type(exc).__name__}: {exc})")
            subjects[t]["bridge"] = lambda n, bridge=bridge: _latencies(bridge, n)
        samples, spawn = _measure(ctx, subjects, reps, count)
        profiles = _profile(ctx, bridges["ipc"]) if ctx.profile else {}
    try:
        cpu = cpu_parts(300 if ctx.smoke else 2000)
    except Exception:  # the product's internals changed: say so, keep the measurement
        import traceback

        cpu = {"error": traceback.format_exc(limit=3)}
    noise = {"loadavg_start": load_start, "loadavg_end": _loadavg(), "cpus": os.cpu_count()}
    rows = [_row(t, samples[t], spawn, cpu, noise, profiles if t == "ipc" else {}) for t in ("ipc", "tcp")]
    for row in rows:
        row.notes += notes
    return rows


def _endpoint(transport: str, kind: str) -> str:
    from slicebridge.bridge.connection import ipc_endpoint

    return ipc_endpoint(f"bench-{kind}-echo") if transport == "ipc" else "tcp://127.0.0.1:*"


def _codec_echo(ctx: Context, transport: str, key: str) -> Echo:
    """The middle step: an echo doing the server's message handling, on the server's staged code."""
    from slicebridge.bridge.launcher import stage_server_code

    return Echo(ctx.env_python, _endpoint(transport, "codec"), CODEC_ECHO, (str(stage_server_code()),), key)


def _measure(ctx: Context, subjects: dict, reps: int, count: int) -> tuple[dict, list[float]]:
    """Every subject ``count`` pings per repeat, in ``_ROUNDS`` rounds taken in turn (the order reversed
    every other round), so that the machine's load phases, which last seconds, fall alike on every
    subject of a repeat; the spawn baseline once per repeat."""
    for per_transport in subjects.values():
        for measure in per_transport.values():
            measure(max(50, count // 5))  # warm-up
    samples = {t: {kind: [] for kind in kinds} for t, kinds in subjects.items()}
    order = [(t, kind) for t, kinds in subjects.items() for kind in kinds]
    spawn = []
    for rep in range(reps):
        spawn.append(summary([run_python(ctx.env_python, "pass", isolated=False)[0] for _ in range(3)])["median"])
        runs = {key: [] for key in order}
        for turn in range(_ROUNDS):
            for t, kind in order if turn % 2 == 0 else order[::-1]:
                runs[t, kind] += subjects[t][kind](max(1, count // _ROUNDS))
        for (t, kind), run in runs.items():
            samples[t][kind].append(run)
        ctx.log(
            f"   rep {rep + 1}/{reps}: p50 "
            + ", ".join(
                f"{t} " + " / ".join(f"{kind} {percentile(samples[t][kind][-1], 50) * 1e6:.0f}" for kind in kinds)
                for t, kinds in subjects.items()
            )
            + " µs (raw / codec / bridge)"
        )
    return samples, spawn


def _profile(ctx: Context, bridge) -> dict:
    """py-spy over 20000 pings, both processes (wall-clock samples, waiting included)."""
    out = ctx.scratch(NAME)
    server_spy = PySpy(bridge.server.pid, out / "server.txt", rate=1000)
    client_spy = PySpy(os.getpid(), out / "client.txt", rate=1000)
    with server_spy, client_spy:
        _latencies(bridge, 20000)
    return {"server": server_spy.top(15, thread="MainThread"), "client": client_spy.top(15, thread="MainThread")}


def _per_rep(runs: list[list[float]]) -> dict[str, list[float]]:
    return {f"p{p}": [percentile(r, p) for r in runs] for p in (50, 90, 99)}


def _row(transport: str, runs: dict, spawn: list[float], cpu: dict, noise: dict, profile: dict) -> Row:
    stats = {kind: _per_rep(r) for kind, r in runs.items()}
    bridge, raw = stats["bridge"], stats["raw"]
    med = statistics.median
    row = Row(
        bench=NAME,
        name=f"ping_{transport}",
        what=f"bridge round trip (ping) over {transport}",
        baseline="spawn the env's python to do nothing (python -c pass)",
        unit="s",
        subject=summary(bridge["p50"]),
        baseline_measured=summary(spawn),
        ratio={**ratio_summary(bridge["p50"], spawn, invert=True), "definition": "spawn time / ping p50 (speed-up)"},
        target=(
            {"text": "p50 ≤ 200 µs", "metric": "p50_s", "op": "<=", "value": 200e-6}
            if transport == "ipc"
            else {"text": "report", "metric": "p50_s", "op": None, "value": None}
        ),
        absolute={
            "p50_s": med(bridge["p50"]),
            "p90_s": med(bridge["p90"]),
            "p99_s": med(bridge["p99"]),
            "p50_best_rep_s": min(bridge["p50"]),
            "raw_p50_s": med(raw["p50"]),
            "raw_p99_s": med(raw["p99"]),
            "raw_p50_best_rep_s": min(raw["p50"]),
            "p50_ratio_of_best_reps": ratio_of_minimums(bridge["p50"], raw["p50"]),
            "p99_ratio_of_best_reps": ratio_of_minimums(bridge["p99"], raw["p99"]),
            **{f"{kind}_{p}_per_rep_s": values for kind, s in stats.items() for p, values in s.items()},
            "pings_per_rep": len(runs["bridge"][0]),
            **noise,
        },
        breakdown={
            "p50_s": {kind: summary(s["p50"]) for kind, s in stats.items()},
            **_steps(stats),
            "cpu_per_ping_s": cpu,
            **({"pyspy": profile} if profile else {}),
        },
    )
    row.against_bound(
        "raw pyzmq ROUTER/DEALER ping of the same frames, slicegpt env's python, alternated",
        raw["p50"],
        TARGET,
        definition="bridge p50 / raw p50",
        p99_ratio=med(bridge["p99"]) / med(raw["p99"]),
    ).judge()
    row.analysis = _analysis(row, stats, cpu, profile)
    return row


def _steps(stats: dict) -> dict:
    """What each step of raw → codec → bridge adds at p50, per repeat (the steps were measured alternately)."""
    if "codec" not in stats:
        return {"added_by_the_bridge_p50_s": summary(_minus(stats["bridge"]["p50"], stats["raw"]["p50"]))}
    return {
        "added_by_signing_and_msgpack_p50_s": summary(_minus(stats["codec"]["p50"], stats["raw"]["p50"])),
        "added_by_loop_and_client_api_p50_s": summary(_minus(stats["bridge"]["p50"], stats["codec"]["p50"])),
    }


def _minus(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def _us(seconds: float) -> str:
    return fmt_seconds(seconds)


def _range(values: list[float]) -> str:
    return f"[{min(values) * 1e6:.0f}–{max(values) * 1e6:.0f}]"


def _analysis(row: Row, stats: dict, cpu: dict, profile: dict) -> list[str]:
    a, bound = row.absolute, row.bound
    bridge, raw = stats["bridge"], stats["raw"]
    lines = [
        f"p50 {_us(a['p50_s'])} {_range(bridge['p50'])} against the raw pyzmq ping's {_us(a['raw_p50_s'])} "
        f"{_range(raw['p50'])} (medians of {len(bridge['p50'])} repeats of {a['pings_per_rep']} pings each, "
        f"alternated): {bound['ratio']['value']:.2f}× (target ≤ 2×; the per-repeat ratios: median "
        f"{statistics.median(bound['ratio']['pairs']):.2f}×, {min(bound['ratio']['pairs']):.2f}–"
        f"{max(bound['ratio']['pairs']):.2f}×); p99 {_us(a['p99_s'])} against "
        f"{_us(a['raw_p99_s'])}: {bound['values']['p99_ratio']:.2f}× (target ≤ 3×). Best repeats: p50 "
        f"{_us(a['p50_best_rep_s'])} against {_us(a['raw_p50_best_rep_s'])} ({a['p50_ratio_of_best_reps']:.2f}×); "
        f"p99 {a['p99_ratio_of_best_reps']:.2f}×.",
    ]
    extra = statistics.median(_minus(bridge["p50"], raw["p50"]))
    if "codec" in stats:
        steps = row.breakdown
        lines.append(
            f"where the bridge's {_us(extra)} over raw goes at p50, measured end to end in the same run: signing "
            f"and msgpack on both sides (the bridge's Codec in a bare echo process and a bare client, its own frame "
            f"I/O) add {_us(steps['added_by_signing_and_msgpack_p50_s']['median'])} "
            f"{_range(steps['added_by_signing_and_msgpack_p50_s']['samples'])}; the server's event loop (a poller "
            "over the router and the worker's outbox, dispatch, per-client bookkeeping) and the client API "
            "(Bridge.request with its server-liveness check, Channel's wait loop, the typed result) add "
            f"{_us(steps['added_by_loop_and_client_api_p50_s']['median'])} "
            f"{_range(steps['added_by_loop_and_client_api_p50_s']['samples'])}."
        )
    if "error" not in cpu:
        handling = sum(cpu["client"].values()) + sum(cpu["server"].values())
        lines.append(
            "CPU per ping, timed in this thread on the same code (thread CPU time, least of 15 batches): "
            + "; ".join(f"{side}: " + ", ".join(f"{k} {v * 1e6:.1f} µs" for k, v in cpu[side].items()) for side in cpu)
            + f". Message handling, both sides: {handling * 1e6:.0f} µs of the {_us(extra)} extra; the rest is "
            "the loop and API glue, and all of it runs with cold caches after each wake-up on a shared machine."
        )
    lines += [_noise_line(a, bridge, raw), _bounds_line(row)] + _profile_lines(profile)
    return lines


def _noise_line(a: dict, bridge: dict, raw: dict) -> str:
    spread = (max(raw["p50"]) - min(raw["p50"])) / statistics.median(raw["p50"])
    return (
        f"noise: load average {a['loadavg_start']:.1f} at the start and {a['loadavg_end']:.1f} at the end on "
        f"{a['cpus']} CPUs (a shared machine); across repeats the raw p50 spans {_range(raw['p50'])} µs "
        f"({spread * 100:.0f} % of its median), the bridge's {_range(bridge['p50'])} µs; p99s: raw "
        f"{_range(raw['p99'])}, bridge {_range(bridge['p99'])} µs. Minimums are the least disturbed figures."
    )


def _bounds_line(row: Row) -> str:
    met = row.bound.get("met")
    return (
        "what bounds it: a round trip crosses six threads (client thread → its zmq I/O thread → the server's I/O "
        "thread → the server's Python thread, and back), raw or not; the bridge adds no hand-off to that (a ping "
        "is answered on the server's I/O thread, never queued to the worker; the client waits on its own "
        "socket), so its extra is Python CPU per message on each side, signed with HMAC-SHA256 and checked "
        "against replays. "
        + (
            "Both targets are met."
            if met
            else "What would move it further: the wire format packs the body and then the header around it (two "
            "msgpack passes each way), and every frame is a separate zmq call: one header frame and a C codec "
            "would take most of what is left, at the price of a protocol change."
        )
    )


def _profile_lines(profile: dict) -> list[str]:
    if not profile.get("server", {}).get("samples"):
        return []
    return [
        "py-spy over 20000 pings (wall-clock samples, time descheduled included), server (self time): "
        + busy_frames(profile["server"], 6, "self"),
        "py-spy, client (self time): " + busy_frames(profile["client"], 6, "self"),
    ]
