"""Error types of the bridge: each says what went wrong and what the user can do.

Every one derives from :class:`SlicebridgeError` (``slicebridge.errors``, the root of the
tree). Errors that happen inside the server travel as ``error`` messages (type, message,
remote traceback) and are raised in the client as :class:`RemoteError`, made to be also the
local error type of that name when there is one (``SparsityMismatch`` from the server is
caught as ``SparsityMismatch``); one the client has no type for is a plain ``RemoteError``.
"""

from __future__ import annotations

from slicebridge.errors import SlicebridgeError, find_error


class EnvNotFound(SlicebridgeError):
    """No Python environment matched what the user asked for."""

    def __init__(self, spec: str, tried: list[str]):
        self.spec = spec
        self.tried = list(tried)
        lines = "\n".join(f"  - {t}" for t in self.tried) or "  (nothing)"
        super().__init__(
            f"could not find a Python environment for {spec!r}. Tried:\n{lines}\n"
            "Pass a conda env name, an env prefix directory or a python executable."
        )


class EnvNotUsable(SlicebridgeError):
    """The environment exists but cannot run the server (old Python, missing packages)."""


class EnvMissingPackages(EnvNotUsable):
    """The target env lacks the server's wire packages (pyzmq, msgpack)."""

    def __init__(self, env: str, python: str, missing: list[str]):
        self.env = env
        self.python = python
        self.missing = list(missing)
        pkgs = " ".join(self.missing)
        super().__init__(
            f"the env {env!r} ({python}) lacks {', '.join(self.missing)}, which the slicebridge "
            f"server needs there. Install with:\n    {python} -m pip install {pkgs}\n"
            f"or run: slicebridge doctor --env {env} --fix"
        )


class ConnectionFileError(SlicebridgeError):
    """A connection file is missing, unreadable, malformed or readable by others."""


class ServerEnvMismatch(ConnectionFileError):
    """The server behind a connection file runs in another env (``sys.prefix``) than the one asked for."""


class ServerStartFailed(SlicebridgeError):
    """The server process exited or did not become ready while starting."""

    def __init__(self, message: str, stderr_tail: str = ""):
        self.stderr_tail = stderr_tail
        if stderr_tail:
            message = f"{message}\n--- server stderr (last lines) ---\n{stderr_tail}"
        super().__init__(message)


class ServerDied(SlicebridgeError):
    """The server went away (process exit or missed heartbeats) while a client waited."""

    def __init__(self, message: str, stderr_tail: str = "", exit_code: int | None = None):
        self.stderr_tail = stderr_tail
        self.exit_code = exit_code
        if stderr_tail:
            message = f"{message}\n--- server stderr (last lines) ---\n{stderr_tail}"
        super().__init__(message)


class RequestTimeout(SlicebridgeError):
    """A request did not finish within the caller's timeout; it was cancelled on the server."""


class ServerKeepsDying(ServerDied):
    """The server died again after the allowed number of fresh starts."""


class ServerNotRunning(SlicebridgeError):
    """No detached server is running for the env the user named."""


class MessageTooLarge(SlicebridgeError):
    """A message is larger than the connection's maximum message size."""


class ProtocolError(SlicebridgeError):
    """A peer sent something that does not follow the wire protocol."""


class RemoteError(SlicebridgeError):
    """A request failed inside the server; carries the remote type, message and traceback."""

    def __init__(self, error_type: str, message: str, remote_traceback: str = ""):
        self.error_type = error_type
        self.remote_message = message
        self.remote_traceback = remote_traceback
        # Exception's own __init__: a registered local error type mixed in (see
        # register_remote_errors) may take other arguments.
        Exception.__init__(self, message)

    def __str__(self) -> str:
        """The message; the remote type is named only when no local type of that name says it."""
        if REMOTE_ERROR_TYPES.get(self.error_type) is type(self) or not self.error_type:
            return self.remote_message
        return f"{self.error_type}: {self.remote_message}"


class BadRequest(RemoteError):
    """The server rejected a request: unknown operation or wrong argument types."""


class RequestCancelled(RemoteError):
    """The request was cancelled (Ctrl-C in the client, or the server shutting down)."""


class RemoteOutOfMemory(RemoteError):
    """The server ran out of (host or GPU) memory serving the request; it stays up."""


# Remote error types that the client raises as a specific subclass.
REMOTE_ERROR_TYPES: dict[str, type[RemoteError]] = {
    "BadRequest": BadRequest,
    "RequestCancelled": RequestCancelled,
    "OutOfMemory": RemoteOutOfMemory,
}


def register_remote_errors(*classes: type[Exception]) -> None:
    """Raise errors of these types' names as ``RemoteError`` subclasses that are also these types.

    So a client can catch ``SparsityMismatch`` from a remote request as it would a local one.
    """
    for cls in classes:
        if cls.__name__ not in REMOTE_ERROR_TYPES:
            REMOTE_ERROR_TYPES[cls.__name__] = type(
                cls.__name__,
                (RemoteError, cls),
                {
                    "__init__": RemoteError.__init__,
                    "__str__": RemoteError.__str__,
                    "__doc__": cls.__doc__,
                    "__module__": cls.__module__,
                },
            )


register_remote_errors(MessageTooLarge)  # a reply too large to send comes back as one


def remote_error(error_type: str, message: str, remote_traceback: str = "") -> RemoteError:
    """Build the client-side exception for an ``error`` message: a ``RemoteError`` that is also the
    local error type of that name, when there is one (see ``slicebridge.errors.find_error``)."""
    if error_type not in REMOTE_ERROR_TYPES:
        local = find_error(error_type) if error_type else None
        if local is None or issubclass(local, RemoteError):
            return (local or RemoteError)(error_type, message, remote_traceback)
        register_remote_errors(local)
    return REMOTE_ERROR_TYPES[error_type](error_type, message, remote_traceback)
