"""A large tensor over the bridge (``echo``): its bandwidth against an in-process ``torch.clone``.

The tensor (float32, 64M elements = 256 MB; 4 MB in --smoke) goes to the server and comes back,
so one echo moves twice its size. Bridge bandwidth = 2 × size / echo time; copy bandwidth =
size / clone time.

Breakdown, measured in the same run: the whole echo path replayed in this process with the
product's own code and the server's settings (``new_request``'s ``dataclasses.asdict`` of the
arguments, ``Codec.pack`` and ``Codec.unpack`` each way, the server's ``asdict`` of the result over
the received buffer, ``to_torch``), so that each step's share of an echo is known; the frames that
do travel through the socket, through a bare pyzmq echo in the slicegpt env (the transport floor);
and, for reference, HMAC-SHA256 over the buffer.
"""

from __future__ import annotations

import os
import time
import traceback

from common import MB, Context, PySpy, Row, busy_frames, fmt_seconds, ratio_summary, summary
from ping import zmq_floor

NAME = "echo"


def _timed(fn):
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def replay_echo(tensor, key: str, shared_memory: bool) -> dict[str, float]:
    """Seconds of each step of one echo, replayed in this process with the product's code."""
    import dataclasses

    from slicebridge.bridge import protocol
    from slicebridge.bridge.transport import Codec

    kwargs = {"shared_memory": shared_memory} if shared_memory else {}
    client, server = Codec(key, **kwargs), Codec(key, **kwargs)
    steps = {}
    steps["client: new_request (args to their wire form)"], request = _timed(
        lambda: protocol.new_request("echo", protocol.EchoArgs(payload=tensor))
    )
    steps["client: Codec.pack"], frames = _timed(lambda: client.pack(request))
    steps["server: Codec.unpack"], received = _timed(lambda: server.unpack(frames, protocol.CLIENT_KINDS))
    payload = received.body["args"]["payload"]
    steps["server: handler (to_torch)"], back = _timed(lambda: payload.to_torch())
    import inspect

    from slicebridge.bridge.server_loop import ServerLoop

    if "asdict(result)" in inspect.getsource(ServerLoop._run_job):  # what the server does with a result
        steps["server: dataclasses.asdict of the result"], body = _timed(
            lambda: dataclasses.asdict(protocol.EchoResult(payload=back))
        )
    else:
        body = {"payload": back}
    steps["server: Codec.pack"], reply = _timed(
        lambda: server.pack(protocol.Message(protocol.RESULT, request.request_id, body))
    )
    steps["client: Codec.unpack"], message = _timed(lambda: client.unpack(reply, protocol.SERVER_KINDS))
    steps["client: to_torch"], _ = _timed(lambda: message.body["payload"].to_torch())
    socket_bytes = sum(memoryview(f if not hasattr(f, "buffer") else f.buffer).nbytes for f in frames[2:])
    steps["bytes through the socket, each way"] = float(socket_bytes)
    return steps


def run(ctx: Context) -> list[Row]:
    import torch

    from slicebridge.bridge import protocol
    from slicebridge.bridge.connection import ipc_endpoint
    from slicebridge.bridge.signing import Signer, new_key
    from slicebridge.bridge.transport import Codec

    numel = (1 << 20) if ctx.smoke else (64 << 20)
    size = numel * 4
    reps = ctx.reps(5, smoke=2)
    bridge = ctx.bridge()
    tensor = torch.randn(numel, generator=torch.Generator().manual_seed(0))

    back = bridge.echo(tensor)  # warm-up, and a check that the bytes come back unchanged
    assert torch.equal(back, tensor)
    del back
    torch.clone(tensor)

    echo_s, clone_s = [], []
    for rep in range(reps):
        started = time.perf_counter()
        copy = torch.clone(tensor)
        clone_s.append(time.perf_counter() - started)
        del copy
        started = time.perf_counter()
        back = bridge.echo(tensor)
        echo_s.append(time.perf_counter() - started)
        del back
        ctx.log(f"   rep {rep + 1}/{reps}: clone {clone_s[-1] * 1e3:.1f} ms, echo {echo_s[-1] * 1e3:.1f} ms")

    profile = {}
    if ctx.profile:
        out = ctx.scratch(NAME)
        server_spy = PySpy(bridge.server.pid, out / "server.txt", rate=500)
        client_spy = PySpy(os.getpid(), out / "client.txt", rate=500)
        with server_spy, client_spy:
            for _ in range(3):
                bridge.echo(tensor)
        profile = {
            "server": server_spy.top(10, thread="slicebridge-worker"),
            "client": client_spy.top(10, thread="MainThread"),
        }

    info = bridge.server.info
    shared = bool(getattr(info, "shared_memory", False))
    breakdown: dict = {"shared_memory": shared}
    try:
        replays = [replay_echo(tensor, info.key, shared) for _ in range(3)]
        breakdown["replayed_steps_s"] = {
            k: summary([r[k] for r in replays])["median"] for k in replays[0] if not k.startswith("bytes")
        }
        breakdown["socket_bytes_each_way"] = int(replays[0]["bytes through the socket, each way"])
    except Exception:  # the product changed under us: report, do not fail the benchmark
        breakdown["replay_error"] = traceback.format_exc(limit=3)
    try:
        codec = Codec(info.key, **({"shared_memory": True} if shared else {}))
        frames = codec.pack(protocol.new_request("echo", protocol.EchoArgs(payload=tensor)))
        floor = zmq_floor(ctx.env_python, ipc_endpoint("bench-zmq-echo"), frames, 3 if not ctx.smoke else 5)
        breakdown["zmq_floor_round_trip_s"] = summary(floor)["median"]
        if shared:
            codec.discard(frames)
    except Exception:
        breakdown["zmq_floor_error"] = traceback.format_exc(limit=3)
    signer = Signer(new_key())
    raw = tensor.view(torch.uint8).numpy()
    breakdown["hmac_sha256_of_the_tensor_s"] = min(_timed(lambda: signer.sign([raw]))[0] for _ in range(3))

    bw_echo = [2 * size / s for s in echo_s]
    bw_clone = [size / s for s in clone_s]
    row = Row(
        bench=NAME,
        name=NAME,
        what=f"echo a float32 tensor of {size / MB:.0f} MB over ipc (2 × {size / MB:.0f} MB moved)",
        baseline="torch.clone of it, in-process",
        unit="B/s",
        subject=summary(bw_echo),
        baseline_measured=summary(bw_clone),
        ratio={**ratio_summary(bw_echo, bw_clone), "definition": "bridge bandwidth / clone bandwidth"},
        target={"text": "≥ 50 % of copy bandwidth", "metric": "ratio", "op": ">=", "value": 0.5},
        absolute={"echo_s": summary(echo_s), "clone_s": summary(clone_s), "tensor_bytes": size},
        breakdown={**breakdown, **({"pyspy": profile} if profile else {})},
    ).judge()
    echo_med, clone_med = summary(echo_s)["median"], summary(clone_s)["median"]
    steps = breakdown.get("replayed_steps_s", {})
    if steps:
        total = sum(steps.values())
        row.notes.append(
            f"one echo {fmt_seconds(echo_med)} (one clone {fmt_seconds(clone_med)}); replayed in one process the "
            f"same steps take {fmt_seconds(total)}: "
            + "; ".join(f"{k} {fmt_seconds(v)}" for k, v in steps.items())
            + f". The difference, {fmt_seconds(echo_med - total)}, is the socket and the hand-offs between processes "
            "less what the two processes overlap or cache better than one"
            + (
                f" (a bare zmq echo of the frames that do go through the socket takes "
                f"{fmt_seconds(breakdown['zmq_floor_round_trip_s'])})"
                if "zmq_floor_round_trip_s" in breakdown
                else ""
            )
            + "."
        )
    if steps:
        ranked = sorted(steps.items(), key=lambda kv: -kv[1])
        row.analysis.append(
            f"the echo costs {echo_med / clone_med:.1f} clones' time; the target allows 4 (twice the bytes at half "
            "the bandwidth). Largest steps, as shares of one echo: "
            + "; ".join(f"{k} {fmt_seconds(v)} ({100 * v / echo_med:.0f} %)" for k, v in ranked[:5])
            + "."
        )
        copies = {k: v for k, v in steps.items() if "asdict" in k or "wire form" in k}
        if sum(copies.values()) > 0.1 * echo_med:
            row.analysis.append(
                "turning the request's args and the handler's result into their wire form copies the tensor "
                "(dataclasses.asdict deep-copies every tensor it meets; new_request and ServerLoop._run_job): "
                f"{fmt_seconds(sum(copies.values()))} of the {fmt_seconds(echo_med)} are these two full copies. A "
                "shallow conversion ({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, recursing "
                "only into dataclasses) would drop both."
            )
        writes = {k: v for k, v in steps.items() if "Codec.pack" in k}
        if shared and sum(writes.values()) > 0.1 * echo_med:
            row.analysis.append(
                f"Codec.pack writes each large tensor into a new /dev/shm file (shm.put, one copy per direction): "
                f"{fmt_seconds(sum(writes.values()))} for both directions. Writing straight into a mapping of "
                "that file (ftruncate + mmap, then one memcpy) or letting handlers allocate their outputs in "
                "shared memory would shave part of it; the copy itself is the floor of this design."
            )
    if profile.get("server", {}).get("samples"):
        row.analysis.append("py-spy, server worker thread (self time): " + busy_frames(profile["server"], 5, "self"))
    return [row]
