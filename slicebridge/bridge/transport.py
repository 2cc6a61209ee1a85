"""Turning messages into signed ZeroMQ frames and back, for both ends of the bridge.

``Codec.pack`` gives ``[MAGIC, signature, header, *buffers]``; ``Codec.unpack`` checks
the magic, the size limit, the signature and the replay guard before it decodes
anything, and raises :class:`Dropped` with a reason for the caller's counters.
Nothing here ever unpickles.
"""

from __future__ import annotations

from typing import Sequence

from slicebridge.bridge import protocol, shm
from slicebridge.bridge.errors import ProtocolError
from slicebridge.bridge.signing import ReplayGuard, Signer


class Dropped(Exception):
    """A received message was refused; ``reason`` names the counter to bump."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


def _buffer(frame):
    """The bytes of a received frame without copying (zmq.Frame or bytes)."""
    return getattr(frame, "buffer", frame)


class Codec:
    def __init__(self, key: str, max_message_bytes: int = protocol.DEFAULT_MAX_MESSAGE_BYTES,
                 replay_window_s: float = 300.0, shared_memory: bool = False):
        self.signer = Signer(key)
        self.guard = ReplayGuard(replay_window_s)
        self.max_message_bytes = max_message_bytes
        self.shared_memory = shared_memory

    def pack(self, message: protocol.Message) -> list:
        frames = protocol.encode(message, self.max_message_bytes, shared=shm.put if self.shared_memory else None,
                                 shared_threshold=shm.THRESHOLD)
        return [protocol.MAGIC, self.signer.sign(frames), *frames]

    @staticmethod
    def discard(packed: list) -> None:
        """Remove the shared-memory buffers of a packed message that will not be sent."""
        shm.discard(protocol.shared_names(packed[2:]))

    def unpack(self, frames: Sequence, accepted_kinds: frozenset) -> protocol.Message:
        if len(frames) < 3 or bytes(_buffer(frames[0])) != protocol.MAGIC:
            raise Dropped("dropped_malformed", "not a slicebridge message")
        payload = [_buffer(f) for f in frames[2:]]
        size = sum(memoryview(p).nbytes for p in payload)
        if size > self.max_message_bytes:
            raise Dropped("dropped_oversize", f"{size} bytes")
        if not self.signer.verify(_buffer(frames[1]), payload):
            raise Dropped("dropped_bad_signature")
        try:
            message = protocol.decode(payload[0], payload[1:], self.max_message_bytes,
                                      shm.take if self.shared_memory else None)
        except ProtocolError as exc:
            raise Dropped("dropped_malformed", str(exc)) from None
        if message.kind not in accepted_kinds:
            raise Dropped("dropped_malformed", f"unexpected kind {message.kind!r}")
        if not self.guard.accept(message.msg_id, message.ts):
            raise Dropped("dropped_replay", message.msg_id)
        return message
