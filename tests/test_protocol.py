"""The wire protocol in isolation: encoding, signing, replay guard, typed arguments."""

from __future__ import annotations

import time

import msgpack
import pytest
import torch

from slicebridge.bridge import protocol
from slicebridge.bridge.errors import MessageTooLarge, ProtocolError
from slicebridge.bridge.signing import ReplayGuard, Signer, new_key
from slicebridge.bridge.transport import Codec, Dropped


def roundtrip(codec: Codec, message: protocol.Message, kinds=protocol.SERVER_KINDS):
    frames = [bytes(memoryview(f)) for f in codec.pack(message)]
    return codec.unpack(frames, kinds)


def test_tensors_travel_as_raw_frames_not_in_the_header():
    codec = Codec(new_key())
    t = torch.arange(1000, dtype=torch.float32)
    frames = codec.pack(protocol.Message(protocol.RESULT, "r1", {"x": t}))
    assert len(frames) == 4  # magic, signature, header, one buffer
    assert len(frames[2]) < 200  # the header holds dtype and shape, not the data
    header = msgpack.unpackb(frames[2])
    assert header["tensors"] == [{"dtype": "float32", "shape": [1000], "nbytes": 4000}]


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int8,
        torch.uint8,
        torch.bool,
    ],
)
def test_tensor_roundtrip_is_bit_exact(dtype):
    codec = Codec(new_key())
    t = (torch.randn(3, 5, 7) * 100).to(dtype)
    if dtype.is_floating_point:
        t.view(-1)[0] = float("nan")
        t.view(-1)[1] = float("-inf")
    back = roundtrip(codec, protocol.Message(protocol.RESULT, "r", [t, {"k": t.permute(2, 0, 1)}])).body
    for got, want in [(back[0].to_torch(), t), (back[1]["k"].to_torch(), t.permute(2, 0, 1))]:
        assert got.dtype == want.dtype and got.shape == want.shape
        assert bytes(got.contiguous().view(torch.uint8).reshape(-1).numpy()) == bytes(
            want.contiguous().view(torch.uint8).reshape(-1).numpy()
        )


def test_empty_and_scalar_tensors():
    codec = Codec(new_key())
    body = roundtrip(codec, protocol.Message(protocol.RESULT, "r", [torch.empty(0, 3), torch.tensor(2.5)])).body
    assert body[0].to_torch().shape == (0, 3)
    assert body[1].to_torch().item() == 2.5


def test_wrong_key_is_dropped_as_bad_signature():
    frames = [bytes(memoryview(f)) for f in Codec(new_key()).pack(protocol.Message(protocol.RESULT, "r", 1))]
    with pytest.raises(Dropped) as info:
        Codec(new_key()).unpack(frames, protocol.SERVER_KINDS)
    assert info.value.reason == "dropped_bad_signature"


def test_altered_buffer_breaks_the_signature():
    codec = Codec(new_key())
    frames = [bytes(memoryview(f)) for f in codec.pack(protocol.Message(protocol.RESULT, "r", torch.ones(4)))]
    frames[3] = bytes([frames[3][0] ^ 1]) + frames[3][1:]
    with pytest.raises(Dropped) as info:
        codec.unpack(frames, protocol.SERVER_KINDS)
    assert info.value.reason == "dropped_bad_signature"


def test_replayed_message_is_dropped():
    codec = Codec(new_key())
    frames = [bytes(memoryview(f)) for f in codec.pack(protocol.Message(protocol.RESULT, "r", 1))]
    codec.unpack(frames, protocol.SERVER_KINDS)
    with pytest.raises(Dropped) as info:
        codec.unpack(frames, protocol.SERVER_KINDS)
    assert info.value.reason == "dropped_replay"


def test_replay_guard_refuses_stale_timestamps_and_forgets_old_ids():
    guard = ReplayGuard(window_s=10)
    now = time.time()
    assert not guard.accept("a", now - 60, now)
    assert guard.accept("b", now, now)
    assert not guard.accept("b", now, now + 1)
    assert guard.accept("c", now + 20, now + 20)  # "b" has been forgotten, and that is fine:
    assert not guard.accept("b", now, now + 20)  # its timestamp is now stale


def test_malformed_header_is_dropped_not_raised():
    key = new_key()
    codec = Codec(key)
    garbage = b"\xc1\xff not msgpack"
    frames = [protocol.MAGIC, Signer(key).sign([garbage]), garbage]
    with pytest.raises(Dropped) as info:
        codec.unpack(frames, protocol.CLIENT_KINDS)
    assert info.value.reason == "dropped_malformed"


def test_oversize_message_refused_before_sending():
    codec = Codec(new_key(), max_message_bytes=1024)
    with pytest.raises(MessageTooLarge, match="exceeds"):
        codec.pack(protocol.Message(protocol.REQUEST, "r", {"t": torch.zeros(1024)}))


def test_unsendable_object_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="cannot send"):
        protocol.encode(protocol.Message(protocol.RESULT, "r", {"f": object()}))


def test_from_wire_checks_field_types():
    args = protocol.from_wire(protocol.SleepArgs, {"seconds": 2, "step": 0.5})
    assert args == protocol.SleepArgs(2, 0.5)
    with pytest.raises(TypeError, match="seconds: expected float, got str"):
        protocol.from_wire(protocol.SleepArgs, {"seconds": "2"})
    with pytest.raises(TypeError, match="unknown field"):
        protocol.from_wire(protocol.SleepArgs, {"sekonds": 2})
    with pytest.raises(TypeError, match="expected a map"):
        protocol.from_wire(protocol.SleepArgs, [1])
    with pytest.raises(TypeError, match="missing field 'pid'"):
        protocol.from_wire(protocol.PingResult, {})


def test_a_newer_servers_result_fields_are_left_out_and_the_result_arrives():
    """A client reading a newer server's reply (a field added since, at any depth) still gets its result;
    a request with a field the server does not know stays refused (test above)."""
    checkpoint = protocol.SlicedCheckpoint(0.25, "m_0.25.pt", "m_0.25.json", 48, 0.2, {}, None, {})
    sweep = protocol.to_wire(
        protocol.SliceResult("out", "builtin", "llama", "m", "cpu", "float32", {}, {}, None, [checkpoint], [], [], {})
    )
    sweep["added_later"] = {"x": 1}
    sweep["checkpoints"][0]["added_later"] = 1
    result = protocol.result_from_wire(protocol.SliceResult, sweep)
    assert result.checkpoints == [checkpoint] and not hasattr(result, "added_later")
    ping = protocol.result_from_wire(protocol.PingResult, {"pid": 7, "ts": 1.0, "busy": False, "queued": 0, "new": 1})
    assert ping == protocol.PingResult(7, 1.0, False, 0)
    with pytest.raises(TypeError, match="unknown field"):
        protocol.from_wire(protocol.SlicedCheckpoint, sweep["checkpoints"][0])


def test_signer_never_shows_its_key():
    key = new_key()
    assert key not in repr(Signer(key))


def test_large_tensors_go_through_shared_memory_and_leave_nothing_behind():
    from slicebridge.bridge import shm

    codec = Codec(new_key(), shared_memory=True)
    big = torch.randn(1 << 19)  # 2 MiB: over the threshold
    small = torch.arange(10)
    frames = [bytes(memoryview(f)) for f in codec.pack(protocol.Message(protocol.RESULT, "r", [big, small]))]
    assert len(frames) == 4 and len(frames[3]) == 80  # only the small tensor travels inline
    assert len(list(shm.shm_dir().glob("*.buf"))) >= 1
    back = codec.unpack(frames, protocol.SERVER_KINDS).body
    assert torch.equal(back[0].to_torch(), big) and torch.equal(back[1].to_torch(), small)
    received = back[0].to_torch()
    received.add_(1)  # the mapping is copy-on-write: writable without a copy up front
    assert torch.equal(received, big + 1)
    assert list(shm.shm_dir().glob(f"{__import__('os').getpid()}-*.buf")) == []


def test_shared_buffers_of_dead_writers_are_swept(tmp_path):
    from slicebridge.bridge import shm

    orphan = shm.shm_dir() / "999999999-abc.buf"  # no such pid
    orphan.write_bytes(b"x")
    orphan.chmod(0o600)
    assert shm.sweep() >= 1 and not orphan.exists()


def test_a_shared_buffer_of_the_wrong_size_is_refused():
    from slicebridge.bridge import shm

    name = shm.put(b"12345678")
    with pytest.raises(ProtocolError, match="holds 8 bytes, 16 announced"):
        shm.take(name, 16)
    with pytest.raises(ProtocolError, match="bad shared-memory name"):
        shm.take("../../etc/passwd", 8)


def test_a_bad_frame_leaves_no_half_message_queued():
    import zmq

    from slicebridge.bridge.transport import recv_frames, send_frames

    context = zmq.Context.instance()
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        receiver.bind("inproc://half-message")
        sender.connect("inproc://half-message")
        strided = memoryview(bytes(range(8))).cast("B")[::2]  # a buffer, but not a contiguous one
        for bad in ([b"head", strided], [b"head", 3]):
            with pytest.raises((ValueError, TypeError)):
                send_frames(sender, bad)
        send_frames(sender, [b"whole", memoryview(b"message")])
        assert receiver.poll(1000) and recv_frames(receiver) == [b"whole", b"message"]
        assert not receiver.poll(50)
    finally:
        sender.close(0)
        receiver.close(0)
