"""Hostile or broken input on the wire (bounded fuzzing): no crash, no hang, the server keeps serving.

A raw DEALER socket sends what no well-behaved client would: random frames, signed
garbage, well-signed envelopes with random operations and argument types, oversized
messages. Each gets no reply or an ``error`` reply, never anything unsigned, and the
server answers ``ping`` afterwards. Nothing on the wire is ever unpickled: the codec
has no path to pickle at all (msgpack with a tensor extension only).
"""

from __future__ import annotations

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slicebridge import Bridge
from slicebridge.bridge import protocol
from slicebridge.bridge.connection import read_connection_file
from slicebridge.bridge.transport import Codec, admit

MAX_BYTES = 1 << 20
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
op_names = st.sampled_from(sorted(set(protocol.OPERATIONS) - {"shutdown"})) | st.text(max_size=12).filter(
    lambda name: name != "shutdown"
)


class Target:
    def __init__(self, bridge: Bridge):
        self.bridge = bridge
        self.info = read_connection_file(bridge.server.conn_path)
        self.codec = Codec(self.info.key, self.info.max_message_bytes)
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        admit(self.socket, self.info.key)  # past the handshake: each message is checked on its own
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(self.info.endpoint)

    def exchange(self, frames: list, wait_ms: int = 100, until_final: str | None = None) -> list:
        """Send raw frames; return the decoded replies (every reply must be correctly signed)."""
        self.socket.send_multipart(frames)
        replies = []
        while self.socket.poll(5000 if until_final else wait_ms):
            reply = self.codec.unpack(self.socket.recv_multipart(), protocol.SERVER_KINDS)
            replies.append(reply)
            if until_final and reply.request_id == until_final and reply.kind in protocol.FINAL_KINDS:
                break
        return replies


@pytest.fixture(scope="module")
def target(slicegpt_env):
    with Bridge(env=str(slicegpt_env), attach=False, debug_ops=False, max_message_bytes=MAX_BYTES) as bridge:
        t = Target(bridge)
        yield t
        t.socket.close()
        assert bridge.server.alive()
        assert bridge.ping() < 1.0  # still serving after everything


@SETTINGS
@given(frames=st.lists(st.binary(max_size=300), min_size=1, max_size=6))
def test_random_frames_get_no_reply(target, frames):
    assert target.exchange(frames) == []


@SETTINGS
@given(signature=st.binary(max_size=80), frames=st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_wrong_or_missing_signatures_get_no_reply(target, signature, frames):
    assert target.exchange([protocol.MAGIC, signature, *frames]) == []


@SETTINGS
@given(header=json_like)
def test_signed_garbage_headers_get_no_reply(target, header):
    packed = msgpack.packb(header, use_bin_type=True)
    assert target.exchange([protocol.MAGIC, target.codec.signer.sign([packed]), packed]) == []


@SETTINGS
@given(op=op_names, args=json_like)
def test_signed_requests_with_random_operations_and_arguments(target, op, args):
    message = protocol.Message(
        protocol.REQUEST, "fuzz-" + protocol.new_request("x", {}).request_id, {"op": op, "args": args}
    )
    replies = target.exchange(target.codec.pack(message), until_final=message.request_id)
    finals = [r for r in replies if r.request_id == message.request_id and r.kind in protocol.FINAL_KINDS]
    assert len(finals) == 1, "exactly one final reply per request"
    final = finals[0]
    if op not in protocol.OPERATIONS or protocol.OPERATIONS[op].diagnostic:
        assert final.kind == protocol.ERROR and final.body["error_type"] == "BadRequest"
    elif final.kind == protocol.ERROR:
        assert final.body["error_type"] and final.body["message"]


@SETTINGS
@given(body=json_like)
def test_signed_envelopes_with_random_bodies(target, body):
    message = protocol.Message(protocol.REQUEST, "fuzzbody", body)
    replies = target.exchange(target.codec.pack(message), until_final=message.request_id)
    assert all(r.kind == protocol.ERROR for r in replies if r.request_id == "fuzzbody")


def test_paths_that_do_not_exist_and_relative_paths(target):
    for args in (
        {"slicegpt_model": "/no/such/ckpt.pt", "output": "/tmp/never.bin"},
        {"slicegpt_model": "relative/ckpt.pt", "output": "/tmp/never.bin"},
        {"slicegpt_model": "/no/such.pt", "output": "relative.bin"},
    ):
        message = protocol.new_request("convert", args)
        (final,) = [
            r
            for r in target.exchange(target.codec.pack(message), until_final=message.request_id)
            if r.kind in protocol.FINAL_KINDS
        ]
        assert final.kind == protocol.ERROR
        assert final.body["error_type"] in ("BadRequest", "CheckpointNotFound")


def test_oversized_message_is_refused_and_the_server_lives(target):
    huge = b"\0" * (MAX_BYTES + 1024)
    header = {"v": 1, "kind": "request", "id": "x", "rid": "x", "ts": 0.0, "body": b"", "tensors": []}
    packed = msgpack.packb(header, use_bin_type=True)
    target.socket.send_multipart([protocol.MAGIC, target.codec.signer.sign([packed, huge]), packed, huge])
    assert not target.socket.poll(500)
    # zmq drops a peer that sends more than MAXMSGSIZE; a new connection is served as before
    target.socket.close()
    target.socket = zmq.Context.instance().socket(zmq.DEALER)
    admit(target.socket, target.info.key)
    target.socket.setsockopt(zmq.LINGER, 0)
    target.socket.connect(target.info.endpoint)
    assert target.bridge.ping() < 1.0


def test_drops_were_counted(target):
    counters = target.bridge.stats().counters
    assert counters.get("dropped_bad_signature", 0) > 0
    assert counters.get("dropped_malformed", 0) > 0
