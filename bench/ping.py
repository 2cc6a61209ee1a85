"""Round trip of the bridge (``ping``) over ipc and tcp, against spawning the env's python.

Baseline: ``<slicegpt env>/bin/python -c pass`` (the cost of the seed's approach for even the
smallest remote call: a new interpreter). Subject: ``bridge.ping()`` on a warm bridge (after a
warm-up), many times per repeat; p50/p90/p99 per repeat, median and spread over repeats.

Breakdown (where a ping's time goes), measured in the same run:
- the transport floor: a bare pyzmq ROUTER in the slicegpt env echoing the very frames of a ping,
  with the client's DEALER waiting the way ``Channel`` does (poll, then recv);
- the CPU time of each side's message handling, timed in this process on the same code:
  ``new_request`` + ``Codec.pack`` (client), ``Codec.unpack`` + ``from_wire`` + the reply's
  ``pack`` (server), the reply's ``unpack`` + ``from_wire`` (client), and their parts (msgpack,
  HMAC, uuid, replay guard, typed validation).
"""

from __future__ import annotations

import os
import subprocess
import time
import timeit

from common import Context, PySpy, Row, busy_frames, percentile, ratio_summary, run_python, summary

NAME = "ping"

ZMQ_ECHO = r"""
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    frames = s.recv_multipart(copy=False)
    if len(frames) == 2 and frames[1].bytes == b"stop":
        break
    s.send_multipart(frames, copy=False)
"""


def _latencies(bridge, count: int) -> list[float]:
    out = []
    for _ in range(count):
        out.append(bridge.ping())
    return out


def _per_call(fn, number: int) -> float:
    """Seconds per call (best of 5 runs of ``number`` calls)."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number


def cpu_breakdown(number: int = 2000) -> dict[str, dict[str, float]]:
    """Seconds per ping spent in each part of the message handling (this process, same code)."""
    import dataclasses

    import msgpack

    from slicebridge.bridge import protocol
    from slicebridge.bridge.signing import ReplayGuard, Signer, new_key
    from slicebridge.bridge.transport import Codec
    from slicebridge.client.bridge import _tensors_to_torch

    key = new_key()
    client, server = Codec(key), Codec(key)
    requests = [client.pack(protocol.new_request("ping", protocol.PingArgs())) for _ in range(number * 5 + 10)]
    replies = [
        server.pack(
            protocol.Message(
                protocol.RESULT, "r" * 32, dataclasses.asdict(protocol.PingResult(os.getpid(), time.time(), False, 0))
            )
        )
        for _ in range(number * 5 + 10)
    ]
    it_req, it_rep = iter(requests), iter(replies)
    msg = protocol.new_request("ping", protocol.PingArgs())
    (header,) = protocol.encode(msg)
    signer = Signer(key)
    guard = ReplayGuard()
    ids = iter([os.urandom(16).hex() for _ in range(number * 5 + 10)])
    result_body = dataclasses.asdict(protocol.PingResult(1, 1.0, False, 0))

    parts = {
        "client: new_request + Codec.pack": lambda: client.pack(protocol.new_request("ping", protocol.PingArgs())),
        "server: Codec.unpack (verify, decode, replay guard)": lambda: server.unpack(
            next(it_req), protocol.CLIENT_KINDS
        ),
        "server: from_wire(PingArgs)": lambda: protocol.from_wire(protocol.PingArgs, {}),
        "server: PingResult + asdict + Codec.pack": lambda: server.pack(
            protocol.Message(
                protocol.RESULT, "r" * 32, dataclasses.asdict(protocol.PingResult(1, time.time(), False, 0))
            )
        ),
        "client: Codec.unpack of the reply": lambda: client.unpack(next(it_rep), protocol.SERVER_KINDS),
        "client: from_wire(PingResult) + _tensors_to_torch": lambda: _tensors_to_torch(
            protocol.from_wire(protocol.PingResult, result_body)
        ),
    }
    steps = {name: _per_call(fn, number) for name, fn in parts.items()}
    detail = {
        "uuid4().hex": lambda: __import__("uuid").uuid4().hex,
        "msgpack.packb(header)": lambda: msgpack.packb(
            {"v": 1, "kind": "request", "id": "a" * 32, "rid": "b" * 32, "ts": 1.0, "body": b"x" * 20, "tensors": []}
        ),
        "protocol.encode": lambda: protocol.encode(msg),
        "Signer.sign (HMAC-SHA256 of the header)": lambda: signer.sign([header]),
        "Signer.verify": lambda: signer.verify(b"0" * 64, [header]),
        "protocol.decode": lambda: protocol.decode(header, []),
        "ReplayGuard.accept": lambda: guard.accept(next(ids), time.time()),
    }
    inside = {name: _per_call(fn, number) for name, fn in detail.items()}
    return {"steps_s": steps, "inside_s": inside}


class ZmqEcho:
    """A bare pyzmq ROUTER in the slicegpt env that echoes every message: the transport floor."""

    def __init__(self, env_python, endpoint: str):
        self.env_python, self.endpoint = env_python, endpoint

    def __enter__(self) -> ZmqEcho:
        import zmq

        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.proc = subprocess.Popen(
            [str(self.env_python), "-I", "-c", ZMQ_ECHO, self.endpoint], stdout=subprocess.PIPE, env=env
        )
        self.proc.stdout.readline()
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)
        return self

    def round_trips(self, frames: list, count: int, warmup: int = 0) -> list[float]:
        """Seconds per round trip of ``frames``, waiting as ``Channel`` does (poll, then recv)."""
        out = []
        for i in range(count + warmup):
            started = time.perf_counter()
            self.sock.send_multipart(frames, copy=False)
            while not self.sock.poll(50):
                pass
            self.sock.recv_multipart(copy=False)
            if i >= warmup:
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
    """Round trips of ``frames`` through a bare pyzmq echo in the slicegpt env."""
    with ZmqEcho(env_python, endpoint) as echo:
        return echo.round_trips(frames, count, warmup=min(200, count))


def _row(
    ctx: Context, transport: str, per_rep: list[list[float]], spawn: list[float], breakdown: dict, profile: dict
) -> Row:
    p50s = [percentile(r, 50) for r in per_rep]
    p90s = [percentile(r, 90) for r in per_rep]
    p99s = [percentile(r, 99) for r in per_rep]
    row = Row(
        bench=NAME,
        name=f"ping_{transport}",
        what=f"bridge round trip (ping) over {transport}",
        baseline="spawn the env's python to do nothing (python -c pass)",
        unit="s",
        subject=summary(p50s),
        baseline_measured=summary(spawn),
        ratio={**ratio_summary(p50s, spawn, invert=True), "definition": "spawn time / ping p50 (speed-up)"},
        target=(
            {"text": "p50 ≤ 200 µs", "metric": "p50_s", "op": "<=", "value": 200e-6}
            if transport == "ipc"
            else {"text": "report", "metric": "p50_s", "op": None, "value": None}
        ),
        absolute={
            "p50_s": summary(p50s)["median"],
            "p90_s": summary(p90s)["median"],
            "p99_s": summary(p99s)["median"],
            "p50_per_rep_s": p50s,
            "p90_per_rep_s": p90s,
            "p99_per_rep_s": p99s,
            "pings_per_rep": len(per_rep[0]),
        },
        breakdown={**breakdown, **({"pyspy": profile} if profile else {})},
    ).judge()
    return row


def run(ctx: Context) -> list[Row]:
    from slicebridge import Bridge
    from slicebridge.bridge import protocol
    from slicebridge.bridge.connection import ipc_endpoint
    from slicebridge.bridge.transport import Codec

    reps = ctx.reps(5, smoke=2)
    count = 200 if ctx.smoke else 3000
    warmup = 50 if ctx.smoke else 500
    for _ in range(2):  # warm the file cache for the interpreter
        run_python(ctx.env_python, "pass", isolated=False)
    spawn = []

    rows = []
    ipc = ctx.bridge()
    tcp = Bridge(env=str(ctx.env_prefix), attach=False, transport="tcp").start()
    frames = Codec(ipc.server.info.key).pack(protocol.new_request("ping", protocol.PingArgs()))
    floors = {
        "ipc": ZmqEcho(ctx.env_python, ipc_endpoint("bench-zmq-echo")),
        "tcp": ZmqEcho(ctx.env_python, f"tcp://127.0.0.1:{_free_port()}"),
    }
    try:
        with floors["ipc"], floors["tcp"]:
            results = {"ipc": [], "tcp": []}
            floor = {"ipc": [], "tcp": []}
            for transport, bridge in (("ipc", ipc), ("tcp", tcp)):
                _latencies(bridge, warmup)
                floors[transport].round_trips(frames, warmup)
            for rep in range(reps):  # interleaved, so that load from others hits all alike
                spawn.append(
                    summary([run_python(ctx.env_python, "pass", isolated=False)[0] for _ in range(3)])["median"]
                )
                for transport, bridge in (("ipc", ipc), ("tcp", tcp)):
                    results[transport].append(_latencies(bridge, count))
                    floor[transport].append(floors[transport].round_trips(frames, count))
                ctx.log(
                    f"   rep {rep + 1}/{reps}: p50 ipc {percentile(results['ipc'][-1], 50) * 1e6:.0f} µs "
                    f"(bare zmq {percentile(floor['ipc'][-1], 50) * 1e6:.0f} µs), "
                    f"tcp {percentile(results['tcp'][-1], 50) * 1e6:.0f} µs "
                    f"(bare zmq {percentile(floor['tcp'][-1], 50) * 1e6:.0f} µs)"
                )

        profiles = {}
        if ctx.profile:
            out = ctx.scratch(NAME)
            server_spy = PySpy(ipc.server.pid, out / "server.txt", rate=1000)
            client_spy = PySpy(os.getpid(), out / "client.txt", rate=1000)
            with server_spy, client_spy:
                _latencies(ipc, 20000)
            profiles = {
                "server": server_spy.top(15, thread="MainThread"),
                "client": client_spy.top(15, thread="MainThread"),
            }
        try:
            cpu = cpu_breakdown(500 if ctx.smoke else 3000)
        except Exception:  # the product's internals changed: report it, keep the measurement
            import traceback

            cpu = {"steps_s": {}, "inside_s": {}, "error": traceback.format_exc(limit=3)}
    finally:
        tcp.close()

    for transport in ("ipc", "tcp"):
        floor50s = [percentile(f, 50) for f in floor[transport]]
        p50s = [percentile(r, 50) for r in results[transport]]
        over = [p - f for p, f in zip(p50s, floor50s, strict=True)]
        breakdown = {
            "zmq_floor_p50_s": summary(floor50s),
            "zmq_floor_p90_s": summary([percentile(f, 90) for f in floor[transport]]),
            "p50_above_zmq_floor_s": summary(over),
            "cpu_per_ping_s": cpu,
        }
        row = _row(ctx, transport, results[transport], spawn, breakdown, profiles if transport == "ipc" else {})
        row.absolute["p50_best_rep_s"] = min(p50s)
        if transport == "ipc" and cpu["steps_s"]:
            main = cpu["steps_s"]
            cpu_total = sum(main.values())
            p50 = row.absolute["p50_s"]
            floor50 = summary(floor50s)["median"]
            rest = summary(over)["median"] - cpu_total
            row.analysis += [
                f"p50 {p50 * 1e6:.0f} µs (best repeat {min(p50s) * 1e6:.0f} µs); a bare pyzmq echo of the same "
                f"frames in the same env, measured alternately, has p50 {floor50 * 1e6:.0f} µs [range "
                f"{min(floor50s) * 1e6:.0f}–{max(floor50s) * 1e6:.0f}]: the transport and two Python processes' "
                f"wake-ups, which moves with the machine's load as much as the ping does. Above that floor the "
                f"bridge adds {summary(over)['median'] * 1e6:.0f} µs: message handling on both sides "
                f"{cpu_total * 1e6:.0f} µs (timed in-process, below) + {rest * 1e6:.0f} µs of the server's "
                "event loop (a zmq.Poller over two sockets, dict() of its events) and cross-process cache effects "
                "(see the py-spy line).",
                "message handling per ping: " + "; ".join(f"{k} {v * 1e6:.1f} µs" for k, v in main.items()) + ".",
                "inside it: " + "; ".join(f"{k} {v * 1e6:.1f} µs" for k, v in cpu["inside_s"].items()) + ".",
                (
                    f"at this load the floor alone ({floor50 * 1e6:.0f} µs) is at or over the 200 µs budget"
                    if floor50 >= 200e-6
                    else f"at this load the floor leaves {(200e-6 - floor50) * 1e6:.0f} µs of the 200 µs budget and "
                    "the "
                    f"bridge's own message handling ({cpu_total * 1e6:.0f} µs) already exceeds that"
                    if floor50 + cpu_total > 200e-6
                    else f"the floor plus the message handling come to {(floor50 + cpu_total) * 1e6:.0f} µs: the loop "
                    "overhead above is what stands between the bridge and the target"
                )
                + f"; in the quietest repeat the bare echo took {min(floor50s) * 1e6:.0f} µs and the ping "
                f"{min(p50s) * 1e6:.0f} µs. What would move it: less Python per message on each side (its "
                "largest parts: "
                + ", ".join(
                    f"{k} {v * 1e6:.1f} µs" for k, v in sorted(cpu["inside_s"].items(), key=lambda kv: -kv[1])[:3]
                )
                + "; the body is msgpack-packed and then packed again inside the header: two packb and two "
                "unpackb per message) and a leaner server loop; the floor is set by the shared 2-CPU VM.",
            ]
            sends = {
                side: sum(p for f, p in profiles.get(side, {}).get("self", []) if f.startswith("Socket.send"))
                for side in ("server", "client")
            }
            if sends["server"] > 10:
                row.analysis.append(
                    f"py-spy takes wall-clock samples (time spent descheduled included): {sends['server']:.0f} % of "
                    f"the server's main-thread samples and {sends['client']:.0f} % of the client's are in "
                    "Socket.send. A send wakes zmq's I/O thread; with four busy threads (two per process) on two "
                    "vCPUs the sender is often descheduled right there, which is where the time above the floor "
                    "that the in-process timings do not cover goes (an interpretation of the samples)."
                )
            if profiles.get("server", {}).get("samples"):
                row.analysis.append(
                    "py-spy over 20000 pings, server (self time): " + busy_frames(profiles["server"], 6, "self")
                )
                row.analysis.append("py-spy, client (self time): " + busy_frames(profiles["client"], 6, "self"))
        rows.append(row)
    return rows


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
