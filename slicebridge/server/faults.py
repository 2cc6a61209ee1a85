"""Fault injection for the reliability tests; active only in a server run with debug operations.

``SLICEBRIDGE_DEBUG_FAULTS`` lists ``point:action=value`` items, comma separated::

    SLICEBRIDGE_DEBUG_FAULTS="load:raise=MemoryError,publish:pause=3"

Points: ``load`` (a checkpoint is being loaded, before it enters the cache), ``slice.layer``
(a ``slice`` request is about to take its next layer) and ``publish`` (an output sits complete in
its temporary, about to be renamed into place).
Actions: ``pause=SECONDS`` (cancellable, like real work at that point) and
``raise=MemoryError|CudaOutOfMemory|RuntimeError``; ``*N`` after a value acts N times only.
"""

from __future__ import annotations

import logging
import time

from slicebridge import settings
from slicebridge.bridge.server_loop import current_request

log = logging.getLogger(__name__)

_active: dict[str, list] = {}  # point -> [kind, value, times left (None: always)]


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which needs a GPU to happen for real."""


_RAISABLE = {"MemoryError": MemoryError, "CudaOutOfMemory": OutOfMemoryError, "RuntimeError": RuntimeError}


def install_from_environment() -> None:
    spec = settings.debug_faults()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        point, _, action = item.partition(":")
        kind, _, value = action.partition("=")
        value, _, times = value.partition("*")
        _active[point] = [kind, value, int(times) if times else None]
    if _active:
        log.warning("fault injection active: %s", spec)


def at(point: str) -> None:
    """Act out the fault configured for ``point``, if any."""
    if point not in _active:
        return
    kind, value, times = _active[point]
    if times is not None:
        if times <= 0:
            return
        _active[point][2] = times - 1
    if kind == "pause":
        deadline = time.monotonic() + float(value)
        while time.monotonic() < deadline:
            request = current_request()
            if request is not None:
                request.check_cancelled()
            time.sleep(0.02)
    elif kind == "raise":
        raise _RAISABLE.get(value, RuntimeError)(f"injected fault at {point}")
