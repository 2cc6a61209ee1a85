"""Processes as Linux's ``/proc`` shows them: is a pid alive, and is it still the same process.

A pid can be reused once its process is gone, so a process is told apart by the kernel's
start time of it as well. Stdlib only: the model layer (orphaned temporaries), the bridge
(servers, clients, shared-memory buffers) and the staged server all use these.
"""

from __future__ import annotations

import os


def process_start_time(pid: int) -> str:
    """The kernel's start time of a process (Linux), used to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[19]
    except (OSError, IndexError):
        return ""


def pid_alive(pid: int, start_time: str = "") -> bool:
    """True when ``pid`` is a live process (not a zombie), and the same one if ``start_time`` is given."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: /proc still shows its state and start time
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return False
        return not start_time or fields[19] == start_time
    except (OSError, IndexError):
        return True


def signal_process(pid: int, start_time: str, sig: int) -> bool:
    """Send ``sig`` to ``pid`` only if it is still the process that started at ``start_time``
    (never without a start time to check); True if it was sent."""
    if not start_time or not pid_alive(pid, start_time):
        return False
    try:
        os.kill(pid, sig)
    except OSError:
        return False
    return True
