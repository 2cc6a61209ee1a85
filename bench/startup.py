"""Server start-up: from ``Bridge(...).start()`` to a finished handshake, and what it is spent on.

Subject: ``Bridge(env, attach=False).start()`` (stage the code, spawn the env's python, boot, bind,
write the connection file, the client notices ``ready``, then ``hello``, which imports torch,
transformers and dill in the server to report their versions). ``start_server`` is wrapped in
this process to split "ready" from "hello". Baseline: ``python -c pass`` in the env.

Where it goes: ``python -X importtime`` of what the server imports before it is ready (zmq,
msgpack, slicebridge.server.main) and of what ``hello`` imports (torch, transformers, dill), and the
gap between the server's "listening" log line and the client noticing it (the client polls the
connection file with a back-off of up to 50 ms).
"""

from __future__ import annotations

import datetime
import os
import re
import time

from common import Context, Row, ratio_summary, run_python, summary

NAME = "startup"


def importtime(python, code: str) -> dict[str, float]:
    """Cumulative import seconds of each top-level module imported by ``code`` (python -X importtime)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run(
        [str(python), "-I", "-X", "importtime", "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    out = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\S.*)$", line)
        if m and not m.group(3).startswith(" "):
            out[m.group(3)] = out.get(m.group(3), 0.0) + int(m.group(2)) / 1e6
    return out


def _listening_at(log_path: str) -> float | None:
    """Wall-clock time of the server's 'listening on' log line."""
    try:
        text = open(log_path, encoding="utf-8", errors="replace").read()
    except OSError:
        return None
    m = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO slicebridge.server .*listening on", text, re.M)
    if not m:
        return None
    return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run(ctx: Context) -> list[Row]:
    import slicebridge.client.bridge as client_bridge
    from slicebridge import Bridge
    from slicebridge.bridge.launcher import stage_server_code

    starts = ctx.reps(5, smoke=1)
    spawn = [run_python(ctx.env_python, "pass", isolated=False)[0] for _ in range(max(starts, 3))]

    marks: dict[str, float] = {}
    original = client_bridge.start_server

    def timed_start_server(*args, **kwargs):
        started = time.perf_counter()
        server = original(*args, **kwargs)
        marks["ready"] = time.perf_counter() - started
        marks["noticed_wall"] = time.time()
        return server

    totals, ready, hello, notice_lag = [], [], [], []
    client_bridge.start_server = timed_start_server
    try:
        for i in range(starts):
            marks.clear()
            started = time.perf_counter()
            bridge = Bridge(env=str(ctx.env_prefix), attach=False)
            bridge.start()
            total = time.perf_counter() - started
            try:
                totals.append(total)
                ready.append(marks["ready"])
                hello.append(total - marks["ready"])
                listening = _listening_at(bridge.server.info.log_path)
                if listening is not None:
                    notice_lag.append(marks["noticed_wall"] - listening)
            finally:
                bridge.close()
            ctx.log(f"   start {i + 1}/{starts}: {total:.2f}s (ready {ready[-1]:.2f}s, hello {hello[-1]:.2f}s)")
    finally:
        client_bridge.start_server = original

    code_dir = stage_server_code()
    boot = importtime(
        ctx.env_python,
        f"import sys; sys.path.insert(0, {str(code_dir)!r}); import zmq, msgpack; import slicebridge.server.main",
    )
    hello_imports = importtime(ctx.env_python, "import torch, transformers, dill")
    stage_s = min(_timed(stage_server_code) for _ in range(3))

    med = lambda xs: summary(xs)["median"] if xs else float("nan")  # noqa: E731
    boot_keys = {k: v for k, v in boot.items() if k in ("zmq", "msgpack", "slicebridge.server.main")}
    hello_keys = {k: v for k, v in hello_imports.items() if k in ("torch", "transformers", "dill")}
    row = Row(
        bench=NAME,
        name=NAME,
        what="server start-up: Bridge(env).start() to a finished hello",
        baseline="python -c pass in the env",
        unit="s",
        subject=summary(totals),
        baseline_measured=summary(spawn),
        ratio={**ratio_summary(totals, spawn), "definition": "start-up time / bare interpreter start"},
        target={"text": "report", "metric": "ratio", "op": None, "value": None},
        absolute={"ready_s": summary(ready), "hello_s": summary(hello)},
        breakdown={
            "python_start_s": med(spawn),
            "stage_code_s": stage_s,
            "boot_imports_s (python -X importtime, cumulative)": boot_keys,
            "hello_imports_s (python -X importtime, cumulative)": hello_keys,
            "client_notices_ready_after_s": med(notice_lag),
        },
    ).judge()
    row.notes.append(
        f"ready after {med(ready):.2f}s: interpreter start {med(spawn) * 1e3:.0f} ms, server imports before "
        "ready "
        + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in boot_keys.items())
        + f", staging the code {stage_s * 1e3:.0f} ms, the client noticed 'ready' {med(notice_lag) * 1e3:.0f} ms "
        f"after the server logged it. hello took {med(hello):.2f}s, nearly all imports: "
        + ", ".join(f"{k} {v:.2f}s" for k, v in hello_keys.items())
        + "."
    )
    return [row]


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started
