"""How a device is named, for a request's ``device`` and a pool's members: the syntax, in one place.

A device is ``cpu``, ``cuda`` or ``cuda:N``; a device group joins two or more of ``cpu`` and
``cuda:N`` with ``+`` (``cuda:0+cuda:1``): one model spread over them. ``cpu`` may repeat in a
group, a GPU may not (each holds its own share). Whether the devices exist is the server's to say.
"""

from __future__ import annotations

import re

_ONE = re.compile(r"cpu|cuda(:\d+)?")
_IN_GROUP = re.compile(r"cpu|cuda:\d+")


def device_parts(spec: str) -> list[str] | None:
    """The devices ``spec`` names (one for a single device, two or more for a group), or None when it is
    not a device or a device group."""
    parts = spec.split("+")
    if len(parts) == 1:
        return parts if _ONE.fullmatch(spec) else None
    return parts if all(_IN_GROUP.fullmatch(part) for part in parts) else None


def repeated_gpus(parts: list[str]) -> list[str]:
    """The GPUs a group names more than once, sorted (``cpu`` may repeat)."""
    return sorted({part for part in parts if part != "cpu" and parts.count(part) > 1})
