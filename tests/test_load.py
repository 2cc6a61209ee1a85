"""Load: several client processes at once over ipc and tcp loopback; nothing lost, doubled or misrouted.

Bounded in count and time: 8 clients × 200 requests per transport, 500 large echoes through
one server whose memory must stay flat, and two clients converting three checkpoints each
through one detached server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURE
from helpers.run import run_cli

from slicebridge.model.binfile import load
from slicebridge.model.compare import nmse

CLIENTS = 8
REQUESTS = 200

# Each request carries a payload unique to (client, i); the reply must be that payload, in
# order, exactly once. A misrouted reply would carry another client's tag; a lost one would
# time out; a doubled one would show up as an unexpected extra message.
ECHO_CLIENT = r"""
import json, sys, torch
from slicebridge import Bridge
env, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen = {"ok": 0, "wrong": 0}
with Bridge(env=env) as b:
    for i in range(n):
        t = torch.arange(16, dtype=torch.int64) * (i + 1)
        back = b.echo({"tag": tag, "i": i, "t": t})
        good = back["tag"] == tag and back["i"] == i and torch.equal(back["t"], t)
        seen["ok" if good else "wrong"] += 1
    extra = b.channel.socket.poll(200)  # nothing may arrive that we did not ask for
    seen["extra"] = bool(extra)
    seen["transport"] = b.server.info.endpoint.split(":")[0]
print(json.dumps(seen))
"""


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_many_clients_many_requests(slicegpt_env, transport):
    flags = ["--tcp"] if transport == "tcp" else []
    assert run_cli("server", "start", "--env", str(slicegpt_env), *flags).returncode == 0
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", ECHO_CLIENT, str(slicegpt_env), f"c{k}", str(REQUESTS)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for k in range(CLIENTS)
        ]
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err
            seen = json.loads(out.strip().splitlines()[-1])
            assert seen == {"ok": REQUESTS, "wrong": 0, "extra": False, "transport": transport}
        (status,) = json.loads(run_cli("server", "status", "--json").stdout)
        assert status["counters"].get("dropped_bad_signature", 0) == 0
        assert status["counters"].get("dropped_malformed", 0) == 0
    finally:
        run_cli("server", "stop", "--env", str(slicegpt_env))


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def test_memory_stays_flat_over_500_large_echoes(bridge):
    """4 MB tensors go through shared memory both ways; nothing may pile up in the server or /dev/shm."""
    shm_dir = Path(bridge.server.info.shm_dir)
    payload = torch.arange(1 << 20, dtype=torch.float32)
    for _ in range(50):  # warm up: allocator pools, caches
        bridge.echo(payload)
    settled = _rss_bytes(bridge.server.pid)
    for i in range(450):
        assert torch.equal(bridge.echo(payload), payload), i
    assert _rss_bytes(bridge.server.pid) < settled + (64 << 20)  # 450 × 8 MB went through
    assert list(shm_dir.glob("*.buf")) == []


CONVERT_CLIENT = r"""
import json, sys
from slicebridge import Bridge
env, out_dir, tag = sys.argv[1], sys.argv[2], sys.argv[3]
results = []
with Bridge(env=env) as b:
    for k, ckpt in enumerate(sys.argv[4:]):
        r = b.convert(ckpt, f"{out_dir}/{tag}-{k}.bin")
        results.append(r.output)
print(json.dumps(results))
"""


def test_two_clients_converting_at_once_get_correct_outputs(slicegpt_env, tmp_path):
    sources = []
    for k in range(3):
        copy = tmp_path / f"ckpt{k}"
        shutil.copytree(FIXTURE / "sliced", copy)
        sources.append(str(copy))
    reference = torch.load(FIXTURE / "reference.pt", weights_only=True)
    assert run_cli("server", "start", "--env", str(slicegpt_env)).returncode == 0
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CONVERT_CLIENT, str(slicegpt_env), str(tmp_path), tag, *sources],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for tag in ("a", "b")
        ]
        outputs = []
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            outputs += json.loads(out.strip().splitlines()[-1])
    finally:
        run_cli("server", "stop", "--env", str(slicegpt_env))
    assert len(outputs) == 6 == len(set(outputs))
    for output in outputs:
        model = load(output)["model"].float()
        with torch.no_grad():
            logits = model(reference["probe_ids"]).logits
        want = reference["logits_fp32"]
        assert nmse(logits, want) <= 1e-8
