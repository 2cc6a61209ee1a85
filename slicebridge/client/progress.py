"""Showing the server's progress events: a bar in a terminal, plain log lines otherwise.

``ProgressPrinter`` is an event callback for ``Bridge`` requests. On a TTY it redraws
one line per task (``[convert] load ██████░░░░ 2/3``); when stderr is not a TTY (CI,
logs, pipes) it writes one line each time a stage starts or ends, and never redraws.
``quiet=True`` shows nothing.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

_BAR_WIDTH = 24


class ProgressPrinter:
    def __init__(self, label: str = "", stream: TextIO | None = None, quiet: bool = False, tty: bool | None = None):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty() if tty is None else tty
        self._stage = None
        self._drawn = False
        self._started = time.monotonic()

    def __call__(self, kind: str, body: Any) -> None:
        if self.quiet or not isinstance(body, dict):
            return
        if kind == "progress":
            self._progress(body)
        elif kind == "log" and body.get("level") in ("WARNING", "ERROR"):
            self._line(f"{body.get('level', '').lower()}: {body.get('message', '')}")

    def _progress(self, body: dict) -> None:
        stage, done, total = body.get("stage", ""), body.get("done", 0), body.get("total")
        unit = body.get("unit", "")
        if self.tty:
            fraction = min(1.0, done / total) if total else 0.0
            filled = int(fraction * _BAR_WIDTH)
            bar = "█" * filled + "░" * (_BAR_WIDTH - filled)
            count = f"{done:g}/{total:g} {unit}".strip() if total else f"{done:g} {unit}".strip()
            self.stream.write(f"\r\033[K[{self.label}] {stage:10s} {bar} {count}")
            self.stream.flush()
            self._drawn = True
        elif stage != self._stage or (total and done >= total):
            self._line(f"{stage}: {done:g}/{total:g} {unit}".strip() if total else f"{stage}: started")
        self._stage = stage

    def _line(self, text: str) -> None:
        self.close()
        prefix = f"[{self.label}] " if self.label else ""
        self.stream.write(f"{prefix}{text}\n")
        self.stream.flush()

    def close(self) -> None:
        """End a redrawn bar line so the next output starts on a fresh line."""
        if self._drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._drawn = False
