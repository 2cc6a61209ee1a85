"""Reliability: faults, hostile input and load, each with nothing lost (the README's table).

Servers here run with debug operations and, where a test needs it, fault injection
(``SLICEBRIDGE_DEBUG_FAULTS``, see slicebridge/server/faults.py): pauses at the point
where an output is complete but not yet in place, raised MemoryErrors while loading.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers.paths import FIXTURE
from helpers.run import WRITE_ONE, run_cli
from helpers.waiting import interrupt_main_when, partials, wait_for

from slicebridge import Bridge
from slicebridge.bridge.connection import read_connection_file
from slicebridge.bridge.errors import RemoteOutOfMemory, ServerDied, ServerKeepsDying
from slicebridge.model.binfile import load

CHECKPOINT = FIXTURE / "sliced"


@pytest.fixture
def faulty_bridge(slicegpt_env, monkeypatch):
    """A factory of owned servers started with the given fault injection."""
    started = []

    def make(faults: str, **options) -> Bridge:
        monkeypatch.setenv("SLICEBRIDGE_DEBUG_FAULTS", faults)
        bridge = Bridge(env=str(slicegpt_env), attach=False, debug_ops=True, **options).start()
        monkeypatch.delenv("SLICEBRIDGE_DEBUG_FAULTS")  # servers started later (restarts) run clean
        started.append(bridge)
        return bridge

    yield make
    for bridge in started:
        bridge.close()


# --------------------------------------------------------------------------- faults


def test_server_killed_mid_convert_leaves_no_output_and_the_next_request_restarts(faulty_bridge, tmp_path):
    bridge = faulty_bridge("publish:pause=60")
    first_pid = bridge.server.pid
    out = tmp_path / "model.bin"

    def kill_once_written():
        if wait_for(lambda: partials(tmp_path), 30):
            os.kill(first_pid, signal.SIGKILL)

    threading.Thread(target=kill_once_written, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(ServerDied) as info:
        bridge.convert(CHECKPOINT, out)
    assert time.monotonic() - started < 35
    assert "died while serving 'convert'" in str(info.value) and "exit code -9" in str(info.value)
    assert "fault injection active" in info.value.stderr_tail
    assert not out.exists() and partials(tmp_path) == []  # the orphaned temporary was removed

    result = bridge.convert(CHECKPOINT, out)  # a fresh server, started by the bridge itself
    assert bridge.server.pid != first_pid and bridge.restarts == 1
    assert result.cache_hit is False and load(out)["method"] == "SliceGPT"


def test_a_server_that_keeps_dying_is_given_up_with_its_stderr(slicegpt_env):
    with Bridge(env=str(slicegpt_env), attach=False, max_restarts=2) as bridge:
        for _ in range(2):
            os.kill(bridge.server.pid, signal.SIGKILL)
            assert wait_for(lambda: not bridge.server.alive(), 5)
            assert bridge.echo("again") == "again"
        os.kill(bridge.server.pid, signal.SIGKILL)
        assert wait_for(lambda: not bridge.server.alive(), 5)
        with pytest.raises(ServerKeepsDying) as info:
            bridge.echo("once more")
        assert "after 2 fresh starts" in str(info.value) and "listening on" in info.value.stderr_tail


CLIENT_IN_A_LONG_REQUEST = r"""
import sys
from slicebridge import Bridge
with Bridge(env=sys.argv[1]) as b:
    print(b.server.pid, flush=True)
    b.request("sleep", {"seconds": 60, "step": 0.05})
"""


def test_killed_client_detached_server_cancels_its_work_and_serves_others(slicegpt_env):
    assert run_cli("server", "start", "--env", str(slicegpt_env), env={"SLICEBRIDGE_DEBUG_OPS": "1"}).returncode == 0
    try:
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT_IN_A_LONG_REQUEST, str(slicegpt_env)], stdout=subprocess.PIPE, text=True
        )
        server_pid = int(client.stdout.readline())
        with Bridge(env=str(slicegpt_env)) as other:
            assert other.server.pid == server_pid and not other.owns_server
            assert wait_for(lambda: other.stats().busy, 10)
            client.kill()
            client.wait()
            started = time.monotonic()
            assert other.echo("served") == "served"  # queued behind the orphan, which gets cancelled
            assert time.monotonic() - started < 15
            stats = other.stats()
            assert stats.counters.get("orphans_cancelled") == 1 and not stats.busy
    finally:
        run_cli("server", "stop", "--env", str(slicegpt_env))


@pytest.mark.parametrize("fault, words", [("MemoryError", "host memory"), ("CudaOutOfMemory", "GPU memory")])
def test_out_of_memory_while_loading_keeps_the_server_and_its_cache_sound(faulty_bridge, tmp_path, fault, words):
    bridge = faulty_bridge(f"load:raise={fault}*1")
    with pytest.raises(RemoteOutOfMemory, match=words):
        bridge.convert(CHECKPOINT, tmp_path / "a.bin")
    assert bridge.cache_info().entries == []  # nothing half-loaded was kept
    assert not (tmp_path / "a.bin").exists() and partials(tmp_path) == []
    result = bridge.convert(CHECKPOINT, tmp_path / "a.bin")
    assert result.cache_hit is False and bridge.restarts == 0
    assert len(bridge.cache_info().entries) == 1


def test_ctrl_c_during_a_convert_cancels_it_and_writes_nothing(faulty_bridge, tmp_path):
    bridge = faulty_bridge("publish:pause=60")

    interrupt_main_when(lambda: partials(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        bridge.convert(CHECKPOINT, tmp_path / "model.bin")
    assert wait_for(lambda: not bridge.stats().busy, 5)
    assert not (tmp_path / "model.bin").exists() and partials(tmp_path) == []
    assert bridge.echo("free") == "free" and bridge.restarts == 0


FILE_SIZE_LIMITED = r"""
import json, resource, sys
from slicebridge import Bridge
from slicebridge.model.atomic import OutputError
resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, resource.RLIM_INFINITY))  # the server inherits it
with Bridge(env=sys.argv[1], attach=False) as b:
    try:
        b.convert(sys.argv[2], sys.argv[3])
        print(json.dumps({"error": None}))
    except OutputError as exc:
        print(json.dumps({"error": str(exc), "alive": b.echo("still here") == "still here"}))
"""


def test_a_full_disk_fails_cleanly(slicegpt_env, tmp_path):
    out = tmp_path / "model.bin"  # 1.7 MB, over the 500 kB limit
    done = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMITED, str(slicegpt_env), str(CHECKPOINT), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "file size limit" in seen["error"] and "nothing was written" in seen["error"]
    assert seen["alive"] is True
    assert list(tmp_path.iterdir()) == []


def test_two_clients_converting_to_one_path_one_wins_never_a_mix(slicegpt_env, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(CHECKPOINT, other)
    pt = other / "Meta-Llama-3-tiny_0.25.pt"
    tensors = torch.load(pt, weights_only=True)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 2  # a different model, same shapes
    torch.save(tensors, pt)
    out = tmp_path / "shared.bin"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITE_ONE, str(slicegpt_env), "convert", str(src), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for src in (CHECKPOINT, other)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(r["won"] for r in results) == [False, True]
    loser = next(r for r in results if not r["won"])
    assert "appeared while it was being written" in loser["error"] or "already exists" in loser["error"]
    winner_source = [CHECKPOINT, other][[r["won"] for r in results].index(True)]
    head = load(out)["model"].state_dict()["lm_head.weight"]
    expected = torch.load(winner_source / "Meta-Llama-3-tiny_0.25.pt", weights_only=True)["lm_head.weight"]
    assert torch.equal(head, expected)  # the whole file is the winner's
    assert partials(tmp_path) == []


# --------------------------------------------------------------------------- security


def test_tcp_binds_loopback_unless_told_otherwise(slicegpt_env, monkeypatch):
    from slicebridge.bridge.envs import find_env
    from slicebridge.bridge.launcher import start_server

    monkeypatch.delenv("SLICEBRIDGE_ALLOW_REMOTE", raising=False)
    with pytest.raises(ValueError, match="loopback only"):
        start_server(find_env(str(slicegpt_env)), transport="tcp", ip="0.0.0.0")


def test_a_connection_file_others_can_read_is_refused(bridge, tmp_path):
    from slicebridge.bridge.errors import ConnectionFileError

    leaked = tmp_path / "leaked.json"
    shutil.copy(bridge.server.conn_path, leaked)
    leaked.chmod(0o644)
    with pytest.raises(ConnectionFileError, match="readable by others"):
        Bridge(connection_file=leaked).start()
    assert read_connection_file(bridge.server.conn_path).key  # the real one is fine
