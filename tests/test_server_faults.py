"""Faults after a request is taken, and what a server leaves in shared memory (real servers).

A reply that cannot be sent is an error reply and the worker lives on; a full /dev/shm sends
large tensors through the socket; nobody can stop a server by taking its shared-memory name;
replies nobody takes are removed; a paused client keeps its request; a failed CPU allocation
comes back as ``OutOfMemory``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURE
from helpers.waiting import wait_for

from slicebridge import Bridge
from slicebridge.bridge import protocol
from slicebridge.bridge.errors import MessageTooLarge, RemoteOutOfMemory

CHECKPOINT = FIXTURE / "sliced" / "Meta-Llama-3-tiny_0.25.pt"
BASE = FIXTURE / "base"

# A client that sends one large echo, waits until the reply is there, and dies without taking it.
KILLED_CLIENT = """
import os, sys, torch
from slicebridge.bridge import protocol
from slicebridge.bridge.channel import Channel
from slicebridge.bridge.launcher import attach
channel = Channel(attach(sys.argv[1]))
channel.send(protocol.new_request("echo", protocol.EchoArgs(payload=torch.ones(1 << 20))))
channel.socket.poll(20000)
os.kill(os.getpid(), 9)
"""

# Runs inside a private mount namespace whose /dev/shm is an 8 MB tmpfs.
SMALL_SHM = """
import os, sys, torch
from slicebridge import Bridge
from slicebridge.bridge import protocol
env, checkpoint, base = sys.argv[1:4]
with Bridge(env=env, attach=False, debug_ops=True) as b:
    big = torch.randn(3 << 20)  # 12 MB, over the whole tmpfs
    assert torch.equal(b.echo(big), big)
    reply = b.request("reference", protocol.ReferenceArgs(
        slicegpt_model=checkpoint, base_model=base, inputs=[torch.randint(0, 1000, (16, 256))]))
    logits = reply.logits[0]
    assert logits.shape == (16, 256, 1000) and torch.isfinite(logits).all()  # 16 MB of logits
    print("ok", logits.numel() * 4, b.stats().counters.get("undeliverable", 0), flush=True)
"""


def server_buffers(bridge: Bridge) -> list[Path]:
    """Shared-memory files the server wrote that nobody has taken."""
    return sorted(Path(bridge.server.info.shm_dir).glob(f"{bridge.server.pid}-*.buf"))


def test_a_reply_too_large_to_send_is_an_error_and_the_server_serves_on(slicegpt_env):
    # 8 MB of logits for a 32 KB request, on a server whose messages may be 2 MiB: before, the
    # worker thread died on packing the reply and every later request waited forever.
    with Bridge(env=str(slicegpt_env), attach=False, max_message_bytes=2 << 20) as b:
        args = protocol.ReferenceArgs(
            slicegpt_model=str(CHECKPOINT), base_model=str(BASE), inputs=[torch.randint(0, 1000, (8, 256))]
        )
        with pytest.raises(MessageTooLarge, match="exceeds the bridge's maximum"):
            b.request("reference", args, timeout=120)
        assert b.request("echo", protocol.EchoArgs(payload="still serving"), timeout=30).payload == "still serving"
        assert b.stats().counters["errors"] == 1


def test_a_full_dev_shm_sends_large_tensors_through_the_socket(slicegpt_env, tmp_path):
    script = tmp_path / "small_shm.py"
    script.write_text(SMALL_SHM)
    command = (
        f"mount -t tmpfs -o size=8m tmpfs /dev/shm && exec {sys.executable} {script} {slicegpt_env} {CHECKPOINT} {BASE}"
    )
    try:
        done = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", command],
            capture_output=True,
            text=True,
            timeout=180,
        )
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if done.returncode != 0 and ("unshare" in done.stderr.split(":")[0] or "mount" in done.stderr[:200]):
        pytest.skip(f"the kernel refuses a private mount namespace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok 16384000")


@pytest.fixture()
def squatted_shm_name():
    """``/dev/shm/slicebridge-<uid>``, as another local user would make it: theirs, mode 0777."""
    path = Path("/dev/shm") / f"slicebridge-{os.getuid()}"
    try:
        uid = pwd.getpwnam("sbsquatter").pw_uid
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "sbsquatter"], check=True)
        uid = pwd.getpwnam("sbsquatter").pw_uid
    before = path.lstat() if path.exists() else None  # left by an older slicebridge: lend it, then restore
    path.mkdir(exist_ok=True)
    path.chmod(0o777)
    os.chown(path, uid, uid)
    yield path
    if before is None:
        shutil.rmtree(path)
    else:
        os.chown(path, before.st_uid, before.st_gid)
        path.chmod(stat.S_IMODE(before.st_mode))


def test_a_squatted_shared_memory_name_does_not_stop_a_server(slicegpt_env, squatted_shm_name):
    with Bridge(env=str(slicegpt_env), attach=False) as b:
        big = torch.randn(1 << 20)  # 4 MB: through shared memory
        assert torch.equal(b.echo(big), big)
        shm_dir = Path(b.server.info.shm_dir)
        st = shm_dir.lstat()
        assert shm_dir.parent == Path("/dev/shm") and shm_dir != squatted_shm_name
        assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    assert not shm_dir.exists()  # removed at stop


def test_replies_nobody_takes_are_removed_and_the_server_leaves_nothing_at_stop(slicegpt_env):
    with Bridge(env=str(slicegpt_env), attach=False, debug_ops=True) as b:
        clients = [subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(b.server.conn_path)]) for _ in range(5)]
        for client in clients:
            assert client.wait(60) == -signal.SIGKILL
        # each dead client's 4 MB reply is removed once the server knows it is gone (at most ~7 s)
        assert wait_for(lambda: not server_buffers(b), 20), server_buffers(b)
        assert b.ping() < 1.0
        clients = [subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, str(b.server.conn_path)]) for _ in range(2)]
        for client in clients:
            client.wait(60)
        shm_dir = Path(b.server.info.shm_dir)
    assert not shm_dir.exists()  # stopping at once: the untaken replies went with the directory


def test_a_paused_client_keeps_its_request(bridge):
    # The caller's on_event blocks for 7 s (a debugger, Ctrl-Z, a slow callback): no heartbeats.
    # The server must not cancel the request (its client's process lives), and the client must
    # not call a server dead whose silence was its own.
    paused = []

    def slow_callback(kind, body):
        if not paused:
            paused.append(kind)
            time.sleep(7.0)

    with Bridge(connection_file=bridge.server.conn_path, heartbeat_timeout=3.0) as client:
        result = client.request("sleep", protocol.SleepArgs(seconds=8.0, step=0.2), on_event=slow_callback)
    assert paused and not result.cancelled and result.slept >= 8.0
    assert bridge.stats().counters.get("orphans_cancelled", 0) == 0


def test_a_failed_cpu_allocation_is_out_of_memory(bridge):
    try:
        torch.empty(1 << 60, dtype=torch.uint8)  # what torch says when the host has no room
    except RuntimeError as exc:
        message = str(exc)
    with pytest.raises(RemoteOutOfMemory, match="ran out of host memory"):
        bridge.request("fail", protocol.FailArgs(kind="RuntimeError", message=message))
    assert bridge.echo("still serving") == "still serving"
