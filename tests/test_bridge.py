"""Round trips through a real server in the stand-in slicegpt env (transformers 4.41 there)."""

from __future__ import annotations

import os
import site
import stat
import sys
import sysconfig
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers

from slicebridge import Bridge
from slicebridge.bridge import protocol
from slicebridge.bridge.connection import read_connection_file
from slicebridge.bridge.errors import (
    BadRequest,
    MessageTooLarge,
    RemoteError,
    RemoteOutOfMemory,
    RequestCancelled,
    RequestTimeout,
)


def base_site_packages() -> set[str]:
    paths = set(site.getsitepackages()) | {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return {os.path.realpath(p) for p in paths}


def test_hello_reports_the_second_envs_versions(bridge, slicegpt_env):
    hello = bridge.server_hello
    assert hello.versions["transformers"] == "4.41.0"
    assert transformers.__version__.startswith("5.")  # and the base env really is another one
    assert hello.versions["torch"].startswith("2.")
    assert hello.versions["zmq"] and hello.versions["msgpack"]
    assert hello.versions["slicegpt"] is None
    assert os.path.realpath(hello.prefix) == os.path.realpath(slicegpt_env)
    assert hello.pid == bridge.server.pid != os.getpid()
    assert hello.device == "cpu" and hello.cuda_devices == []


def test_no_base_env_site_packages_leak_into_the_server(bridge, slicegpt_env):
    hello = bridge.server_hello
    server_path = {os.path.realpath(p) for p in hello.sys_path}
    leaked = server_path & base_site_packages()
    assert not leaked, f"base env site-packages on the server's sys.path: {leaked}"
    target = os.path.realpath(slicegpt_env)
    for name in ("torch", "transformers", "zmq", "msgpack", "dill"):
        assert os.path.realpath(hello.module_files[name]).startswith(target + os.sep), name
    # slicebridge itself runs from the staged copy, not from this checkout or the base env
    staged = [p for p in hello.sys_path if "/code/" in p]
    assert staged and staged[0] == hello.sys_path[0]
    checkout = os.path.realpath(Path(__file__).parent.parent)
    assert checkout not in server_path
    outside_target = [p for p in server_path if p.startswith(checkout) and not p.startswith(target)]
    assert not outside_target


def test_ping_and_stats(bridge):
    assert 0 < bridge.ping() < 1.0
    stats = bridge.stats()
    assert stats.pid == bridge.server.pid
    assert stats.counters["requests"] >= 1 and not stats.busy


def test_tensors_roundtrip_bit_exactly(bridge):
    g = torch.Generator().manual_seed(0)
    payload = {
        "fp32": torch.randn(64, 1000, generator=g),
        "fp16": torch.randn(7, 3, generator=g).half(),
        "bf16": torch.randn(5, 5, generator=g).bfloat16(),
        "ids": torch.randint(0, 128256, (2, 48), generator=g),
        "mask": torch.rand(4, 4, generator=g) > 0.5,
        "strided": torch.randn(8, 6, generator=g)[:, ::2],
        "empty": torch.empty(0),
        "nested": [torch.full((3,), float("nan")), {"deep": torch.tensor([-0.0, float("inf")])}],
        "plain": {"text": "héllo", "n": 3, "x": 0.25, "none": None, "bytes": b"\x00\x01"},
    }
    back = bridge.echo(payload)

    def same_bits(a, b):
        return (
            a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
        )

    for key in ("fp32", "fp16", "bf16", "ids", "mask", "strided", "empty"):
        assert same_bits(back[key], payload[key]), key
    assert same_bits(back["nested"][0], payload["nested"][0])
    assert same_bits(back["nested"][1]["deep"], payload["nested"][1]["deep"])
    assert back["plain"] == payload["plain"]


def test_progress_events_stream_before_the_result(bridge):
    events = []
    result = bridge.request("sleep", {"seconds": 0.4, "step": 0.05}, on_event=lambda k, b: events.append((k, b)))
    assert result.slept >= 0.4
    stages = [b for k, b in events if k == "progress"]
    assert len(stages) >= 3 and stages[-1]["done"] == stages[-1]["total"] == 0.4


def test_remote_error_carries_type_message_and_traceback(bridge):
    with pytest.raises(RemoteError) as info:
        bridge.request("fail", {"kind": "ValueError", "message": "bad thing"})
    assert info.value.error_type == "ValueError"
    assert "bad thing" in str(info.value)
    assert "handlers.py" in info.value.remote_traceback
    assert bridge.ping() < 1.0  # still serving


@pytest.mark.parametrize("kind", ["MemoryError", "CudaOutOfMemory"])
def test_out_of_memory_is_a_typed_error_and_the_server_lives(bridge, kind):
    with pytest.raises(RemoteOutOfMemory):
        bridge.request("fail", {"kind": kind})
    assert bridge.echo(7) == 7


def test_unknown_operation_and_wrong_types_are_bad_requests(bridge):
    with pytest.raises(BadRequest, match="unknown operation 'frobnicate'.*echo.*hello"):
        bridge.request("frobnicate", {})
    with pytest.raises(BadRequest, match="seconds: expected float, got str"):
        bridge.request("sleep", {"seconds": "long"})
    with pytest.raises(BadRequest, match="unknown field"):
        bridge.request("hello", {"nonsense": 1})
    assert bridge.ping() < 1.0


def test_oversize_message_is_refused_and_the_server_lives(slicegpt_env):
    with Bridge(env=str(slicegpt_env), attach=False, max_message_bytes=1 << 20) as small:
        with pytest.raises(MessageTooLarge, match="exceeds"):
            small.echo(torch.zeros(1 << 19))  # 2 MB
        assert small.echo(torch.ones(10)).sum().item() == 10


def test_ctrl_c_cancels_the_remote_request(bridge):
    timer = threading.Timer(0.5, lambda: __import__("_thread").interrupt_main())
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        bridge.request("sleep", {"seconds": 30, "step": 0.05})
    assert time.monotonic() - started < 5
    stats = bridge.stats()
    assert not stats.busy and stats.queued == 0
    assert bridge.echo("next") == "next"


def test_request_timeout_cancels_on_the_server(bridge):
    with pytest.raises(RequestTimeout, match="cancelled"):
        bridge.request("sleep", {"seconds": 30, "step": 0.05}, timeout=0.5)
    assert bridge.echo(1) == 1  # the stale cancellation reply is skipped, the next one matches


def test_request_cancelled_while_queued_never_runs(bridge):
    first = protocol.new_request("sleep", {"seconds": 0.5})
    queued = protocol.new_request("sleep", {"seconds": 5})
    bridge.channel.send(first)
    bridge.channel.send(queued)
    bridge.channel.cancel(queued.request_id)
    started = time.monotonic()
    with pytest.raises(RequestCancelled, match="before it started"):
        bridge.channel._wait(queued.request_id, "sleep", None, 10)
    assert time.monotonic() - started < 2


def test_tcp_transport_on_loopback(slicegpt_env):
    with Bridge(env=str(slicegpt_env), attach=False, transport="tcp") as tcp:
        assert tcp.server.info.endpoint.startswith("tcp://127.0.0.1:")
        assert tcp.echo(torch.arange(4)).tolist() == [0, 1, 2, 3]


def test_files_and_sockets_are_private(bridge, private_runtime_dir):
    info = read_connection_file(bridge.server.conn_path)
    assert stat.S_IMODE(os.stat(private_runtime_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(bridge.server.conn_path).st_mode) == 0o600
    socket_path = info.endpoint[len("ipc://") :]
    assert stat.S_IMODE(os.stat(socket_path).st_mode) & 0o077 == 0
    assert info.key not in Path(info.log_path).read_text()
    assert stat.S_IMODE(os.stat(info.log_path).st_mode) == 0o600


def test_owned_server_stops_with_the_bridge(slicegpt_env):
    b = Bridge(env=str(slicegpt_env), attach=False).start()
    server = b.server
    b.close()
    assert not server.alive()
    assert not server.conn_path.exists()
    assert not Path(server.info.endpoint[len("ipc://") :]).exists()


def test_the_base_interpreter_is_not_the_servers(slicegpt_env):
    assert sys.executable != str(slicegpt_env / "bin" / "python")
