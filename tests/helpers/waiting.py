"""Waiting on what a real server does: a condition, a write in progress, a Ctrl-C at the right moment."""

from __future__ import annotations

import _thread
import threading
import time
from collections.abc import Callable
from pathlib import Path


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def partials(directory: Path) -> list[str]:
    """The temporaries of writes in progress (``*.partial``) anywhere under ``directory``."""
    return [p.name for p in directory.rglob("*.partial")]


def interrupt_main_when(predicate: Callable[[], object], timeout: float = 30) -> None:
    """Raise KeyboardInterrupt in the main thread (as Ctrl-C would) once ``predicate()`` holds."""

    def watch() -> None:
        if wait_for(predicate, timeout):
            _thread.interrupt_main()

    threading.Thread(target=watch, daemon=True).start()
