"""The warm model cache: a checkpoint is loaded once and reused until evicted.

Entries are keyed by what determines the loaded model (the checkpoint file's real
path, size and mtime, the base model dir, the loader and the device, or the device group a model is
spread over: ``cuda:0+cuda:1`` is another entry than ``cuda:0``), so a checkpoint rewritten on disk is
loaded again. Least recently used entries are
evicted when the total size of the cached models' tensors exceeds the budget
(``SLICEBRIDGE_CACHE_BYTES``, default: half of the host memory). It is one budget for models on
the host and on a GPU alike: GPU memory itself is not tracked. An entry larger than the whole
budget is still served, and dropped once the next model is loaded.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from slicebridge import settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheKey:
    checkpoint: str
    size: int
    mtime_ns: int
    base_model: str
    loader: str
    device: str  # cpu, cuda:N or a group (cuda:0+cuda:1)
    dtype: str

    @classmethod
    def for_file(cls, checkpoint: str, base_model: str, loader: str, device: str, dtype: str) -> CacheKey:
        real = os.path.realpath(checkpoint)
        st = os.stat(real)
        base = os.path.realpath(base_model) if base_model else ""
        return cls(real, st.st_size, st.st_mtime_ns, base, loader, device, dtype)


def default_budget_bytes() -> int:
    override = settings.cache_bytes()
    if override is not None:
        return override
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 * 1024**3
    return total // 2


class ModelCache:
    """An LRU of loaded models under a byte budget. ``get_or_load`` says whether it was a hit."""

    def __init__(self, budget_bytes: int | None = None):
        self.budget_bytes = default_budget_bytes() if budget_bytes is None else budget_bytes
        self._entries: collections.OrderedDict[CacheKey, tuple[Any, int]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def used_bytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def entries(self) -> list[tuple[CacheKey, int]]:
        """The cached models' keys and sizes in bytes, least recently used first."""
        with self._lock:
            return [(key, size) for key, (_, size) in self._entries.items()]

    def get_or_load(self, key: CacheKey, load: Callable[[], Any], size_of: Callable[[Any], int]) -> tuple[Any, bool]:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key][0], True
        value = load()  # outside the lock; a failure leaves the cache as it was
        size = size_of(value)
        with self._lock:
            self.misses += 1
            self._entries[key] = (value, size)
            self._entries.move_to_end(key)
            self._evict(keep=key)
        return value, False

    def touch(self, key: Hashable) -> None:
        """Make ``key`` the most recently used entry, if it is cached."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)

    def put(self, key: Hashable, value: Any, size: int) -> None:
        """Cache ``value`` (made some other way than by loading ``key``: a model just sliced and saved)."""
        with self._lock:
            self._entries[key] = (value, size)
            self._entries.move_to_end(key)
            self._evict(keep=key)

    def _evict(self, keep: CacheKey) -> None:
        while self.used_bytes > self.budget_bytes and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            del self._entries[oldest]
            log.info("evicted %s from the model cache", os.path.basename(oldest.checkpoint))
        if self.used_bytes > self.budget_bytes and len(self._entries) == 1:
            log.warning(
                "one model (%d MB) exceeds the cache budget (%d MB); it stays only until the next model is loaded",
                self.used_bytes >> 20,
                self.budget_bytes >> 20,
            )
