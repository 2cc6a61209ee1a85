"""What the request being served asks of the work done for it, without that work knowing of servers.

The server runs each request's handler inside ``serving(check_cancelled, before_publish)``: long
loops call :func:`check_cancelled` (a cancelled request stops), and every output is passed to
:func:`before_publish` just before it is put in place (a cancelled request's output is discarded).
The scope is per thread and task (a ``ContextVar``), so requests never see each other's; outside
one (a client, a test, a script) both are no-ops. Stdlib only.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class _Scope:
    check_cancelled: Callable[[], None]
    before_publish: Callable[[Path], None]


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar("slicebridge_request_scope", default=None)


@contextlib.contextmanager
def serving(check_cancelled: Callable[[], None], before_publish: Callable[[Path], None]) -> Iterator[None]:
    """Within this block, the work done here answers to these two checks (see the module docstring)."""
    token = _scope.set(_Scope(check_cancelled, before_publish))
    try:
        yield
    finally:
        _scope.reset(token)


def check_cancelled() -> None:
    """Raise if the request being served was cancelled; nothing outside a request."""
    scope = _scope.get()
    if scope is not None:
        scope.check_cancelled()


def before_publish(path: Path) -> None:
    """The last check before the output ``path`` is put in place; an exception discards the output."""
    scope = _scope.get()
    if scope is not None:
        scope.before_publish(path)
