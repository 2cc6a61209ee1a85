"""Server lifecycle: detached servers and their clients, dead servers, dead clients, forged messages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
from helpers.run import run_cli

from slicebridge import Bridge
from slicebridge.bridge import protocol
from slicebridge.bridge.connection import detached_connection_path, read_connection_file
from slicebridge.bridge.errors import ServerDied
from slicebridge.bridge.signing import Signer, new_key
from slicebridge.bridge.transport import Codec, admit
from slicebridge.processes import pid_alive

# A client process: attaches to the env's detached server, checks N echo round trips
# (each payload unique to this client), and prints what it saw as JSON.
CLIENT = r"""
import json, sys, torch
from slicebridge import Bridge
env, tag, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Bridge(env=env) as b:
    ok = 0
    for i in range(n):
        t = torch.full((64,), float(i)) + hash(tag) % 1000
        back = b.echo({"tag": tag, "i": i, "t": t})
        ok += back["tag"] == tag and back["i"] == i and torch.equal(back["t"], t)
    b.request("sleep", {"seconds": 0.3, "step": 0.1})
    print(json.dumps({"pid": b.server_hello.pid, "owned": b.owns_server, "ok": ok}))
"""


def start_client(env: Path, tag: str, n: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(env), tag, str(n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_detached_server_serves_clients_one_after_another_and_at_once(slicegpt_env):
    started = run_cli("server", "start", "--env", str(slicegpt_env), "--json")
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout)
    pid = info["pid"]
    try:
        again = run_cli("server", "start", "--env", str(slicegpt_env), "--json")
        assert json.loads(again.stdout)["started"] is False and json.loads(again.stdout)["pid"] == pid

        for tag in ("first", "second"):  # one after the other
            seen = finish(start_client(slicegpt_env, tag, 20))
            assert seen == {"pid": pid, "owned": False, "ok": 20}

        clients = [start_client(slicegpt_env, f"c{i}", 50) for i in range(3)]  # at the same time
        for seen in map(finish, clients):
            assert seen == {"pid": pid, "owned": False, "ok": 50}

        status = run_cli("server", "status", "--json")
        (entry,) = json.loads(status.stdout)
        assert entry["state"] == "running" and entry["pid"] == pid
        assert entry["counters"]["requests"] >= 5 * 22
        assert entry["counters"].get("dropped_bad_signature", 0) == 0
    finally:
        stopped = run_cli("server", "stop", "--env", str(slicegpt_env))
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped: pid {pid}" in stopped.stdout
    assert not pid_alive(pid)
    assert not Path(info["connection_file"]).exists()
    status = run_cli("server", "status")
    assert "no detached slicebridge server is running" in status.stdout
    again = run_cli("server", "stop", "--env", str(slicegpt_env))
    assert again.returncode == 1 and "no slicebridge server is running" in again.stderr
    assert "Traceback" not in again.stderr


def test_sigkilled_server_makes_a_waiting_client_raise_with_the_stderr_tail(slicegpt_env):
    b = Bridge(env=str(slicegpt_env), attach=False).start()
    try:
        pid = b.server.pid
        threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
        started = time.monotonic()
        with pytest.raises(ServerDied) as info:
            b.request("sleep", {"seconds": 60, "step": 0.1})
        assert time.monotonic() - started < 5
        assert f"pid {pid}" in str(info.value) and "exit code -9" in str(info.value)
        assert "listening on" in info.value.stderr_tail  # the server's own log lines
        assert "server stderr" in str(info.value)
    finally:
        b.close()


def test_client_of_a_detached_server_notices_its_death(slicegpt_env):
    assert run_cli("server", "start", "--env", str(slicegpt_env)).returncode == 0
    info = read_connection_file(detached_connection_path(str(slicegpt_env / "bin" / "python")))
    b = Bridge(env=str(slicegpt_env)).start()
    try:
        assert not b.owns_server and b.server.pid == info.pid
        threading.Timer(0.5, os.kill, (info.pid, signal.SIGKILL)).start()
        started = time.monotonic()
        with pytest.raises(ServerDied, match="died while serving"):
            b.request("sleep", {"seconds": 60, "step": 0.1})
        assert time.monotonic() - started < 5
    finally:
        b.close()
        run_cli("server", "stop", "--env", str(slicegpt_env))


def test_a_frozen_server_is_caught_by_missed_heartbeats(slicegpt_env):
    b = Bridge(env=str(slicegpt_env), attach=False, heartbeat_timeout=2.0).start()
    pid = b.server.pid
    try:
        threading.Timer(0.3, os.kill, (pid, signal.SIGSTOP)).start()
        started = time.monotonic()
        with pytest.raises(ServerDied, match="stopped answering"):
            b.request("sleep", {"seconds": 60, "step": 0.1})
        assert time.monotonic() - started < 6
    finally:
        os.kill(pid, signal.SIGKILL)
        b.close()


OWNER = r"""
import sys, time
from slicebridge import Bridge
b = Bridge(env=sys.argv[1], attach=False).start()
print(b.server.pid, flush=True)
time.sleep(600)
"""


def test_owned_server_exits_when_its_client_is_killed(slicegpt_env):
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(slicegpt_env)], stdout=subprocess.PIPE, text=True)
    server_pid = int(owner.stdout.readline())
    assert pid_alive(server_pid)
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 10
    while pid_alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not pid_alive(server_pid)


def raw_dealer(endpoint: str, key: str) -> zmq.Socket:
    """A bare socket past the handshake (it knows the key): what it sends is checked message by message."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    admit(sock, key)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def test_wrongly_signed_or_replayed_messages_get_no_reply(bridge):
    info = read_connection_file(bridge.server.conn_path)
    before = bridge.stats().counters
    sock = raw_dealer(info.endpoint, info.key)
    try:
        ping = protocol.new_request("ping", {})
        forged = Codec(new_key()).pack(ping)  # signed with another key
        sock.send_multipart(forged)
        unsigned = [protocol.MAGIC, b"", *forged[2:]]
        sock.send_multipart(unsigned)
        assert not sock.poll(1000), "a forged message got a reply"

        good = Codec(info.key).pack(protocol.new_request("ping", {}))
        sock.send_multipart(good)
        assert sock.poll(5000), "a correctly signed message got no reply"
        reply = Codec(info.key).unpack(sock.recv_multipart(), protocol.SERVER_KINDS)
        assert reply.kind == protocol.RESULT and reply.body["pid"] == bridge.server.pid
        sock.send_multipart(good)  # the same message again: a replay
        assert not sock.poll(1000), "a replayed message got a reply"
    finally:
        sock.close()
    after = bridge.stats().counters
    assert after.get("dropped_bad_signature", 0) - before.get("dropped_bad_signature", 0) == 2
    assert after.get("dropped_replay", 0) - before.get("dropped_replay", 0) == 1
    assert bridge.echo("still serving") == "still serving"


def test_signature_covers_the_whole_message():
    key = new_key()
    frames = Codec(key).pack(protocol.new_request("ping", {}))
    assert Signer(key).verify(frames[1], frames[2:])
    assert not Signer(key).verify(frames[1], [frames[2] + b" "])
