"""Message authentication: HMAC-SHA256 signatures and a replay guard.

The key comes from the connection file (random, 32 bytes, hex). A signature covers
the header and every tensor buffer sent in the message, so a peer without the key can
neither forge nor alter a message; a buffer passed through shared memory is not signed (the
signed header names its file, and ``shm`` says why the file's bytes are safe without). The
header carries a unique id and a timestamp; the replay guard drops a message whose id it has
seen or whose timestamp is outside its window. Before any message, a connecting peer must show
:func:`connect_token` (see ``transport``), so a peer without the key cannot even make the
server read what it sends.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterable

SIGNATURE_SCHEME = "hmac-sha256"


def new_key() -> str:
    """A fresh random signing key, hex encoded."""
    return secrets.token_hex(32)


def connect_token(key: str) -> bytes:
    """What a client shows to be let in (ZeroMQ PLAIN password): derived from the key, never the key."""
    return hmac.new(key.encode("ascii"), b"slicebridge-connect", hashlib.sha256).hexdigest().encode("ascii")


class Signer:
    """Signs and verifies the frames of a message with one shared key."""

    def __init__(self, key: str | bytes):
        if isinstance(key, str):
            key = key.encode("ascii")
        if not key:
            raise ValueError("an empty signing key is not allowed")
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)  # each message is signed by a copy of it

    def sign(self, frames: Iterable) -> bytes:
        mac = self._keyed.copy()
        for frame in frames:
            mac.update(frame)
        return mac.hexdigest().encode("ascii")

    def verify(self, signature, frames: Iterable) -> bool:
        return hmac.compare_digest(bytes(signature), self.sign(frames))

    def __repr__(self) -> str:  # never show the key, not even in a debugger or a log
        return "Signer(key=<hidden>)"


class ReplayGuard:
    """Remembers message ids for ``window_s`` seconds and refuses repeats and stale messages."""

    def __init__(self, window_s: float = 300.0, max_ids: int = 1_000_000):
        self.window_s = window_s
        self.max_ids = max_ids
        self._seen: OrderedDict[str, float] = OrderedDict()

    def accept(self, msg_id: str, ts: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        while self._seen:
            oldest_id, seen_at = next(iter(self._seen.items()))
            if now - seen_at <= self.window_s and len(self._seen) < self.max_ids:
                break
            del self._seen[oldest_id]
        if abs(now - ts) > self.window_s or msg_id in self._seen:
            return False
        self._seen[msg_id] = now
        return True
