"""Starting a server in another Python environment, and keeping track of it.

The server's code is not installed in the target env. It is staged: the parts that run
there (the package's stdlib-only top modules, ``bridge/``, ``server/`` and ``model/``, whose
maker slices when the env has no slicegpt) are copied to a content-addressed directory in the runtime
dir, and the target interpreter is started isolated (``python -I``: no ``PYTHONPATH``, no user
site, no script dir) with only that directory put in front of its own ``sys.path``. Nothing of
the base env's site-packages can leak in; the server reports its ``sys.path`` in ``hello``.

Before importing anything, a tiny boot script checks the Python version and the two
wire packages and exits with a marker line the client turns into an actionable error.
The server's stdout and stderr go to a log file whose tail is quoted when it dies; the
server caps its size (``server.main``), and only the newest ``LOGS_KEPT`` logs of
servers that are gone are kept.

A detached server is started under a lock per env, and every detached server process of
the runtime dir can be found through ``/proc`` (its command line names its connection
file), also one whose connection file was refused or lost. Servers are only signalled
after their start time is checked (a pid may have been reused).

A server started with ``threads=N`` computes with N CPU threads: ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` are N in its environment, so torch starts with N (the server holds torch to it,
``server.main``). An explicit ``threads`` wins over those variables in the user's environment;
without it the server inherits them, or, when they are unset, torch takes its own default (one thread
per physical core of the machine, whatever the process's CPU affinity). Servers
started side by side (a pool) share the cores through ``thread_shares``; a pool leaves the split to
the user when either variable is set (``split_by_user``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from slicebridge import settings
from slicebridge.bridge import protocol
from slicebridge.bridge.connection import (
    ConnectionInfo,
    detached_connection_path,
    ensure_private_dir,
    ipc_endpoint,
    read_connection_file,
    runtime_dir,
    servers_dir,
    write_connection_file,
)
from slicebridge.bridge.envs import PythonEnv, python_free_environ, reported_prefix
from slicebridge.bridge.errors import (
    ConnectionFileError,
    EnvMissingPackages,
    EnvNotUsable,
    ServerStartFailed,
    SlicebridgeError,
)
from slicebridge.bridge.leftovers import remove_leftovers
from slicebridge.bridge.signing import new_key
from slicebridge.processes import pid_alive, process_start_time, signal_process

log = logging.getLogger(__name__)

BOOT_ERROR_MARKER = "SLICEBRIDGE-BOOT-ERROR"
LOGS_KEPT = 10  # logs of servers that are gone, newest first
_BOOT_IMPORT = "from slicebridge.server.main import main"
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # what torch reads for its CPU threads at start
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_STAGED_PARTS = ("*.py", "bridge/**/*.py", "server/**/*.py", "model/**/*.py")  # the top modules are stdlib-only
_BOOT_SCRIPT = f"""
import sys
if sys.version_info < (3, 10):
    sys.stderr.write("{BOOT_ERROR_MARKER} python-too-old %d.%d\\n" % sys.version_info[:2])
    sys.exit(3)
missing = []
for module, package in (("zmq", "pyzmq"), ("msgpack", "msgpack")):
    try:
        __import__(module)
    except ImportError:
        missing.append(package)
if missing:
    sys.stderr.write("{BOOT_ERROR_MARKER} missing-packages " + " ".join(missing) + "\\n")
    sys.exit(3)
sys.path.insert(0, sys.argv[1])
{_BOOT_IMPORT}
main(sys.argv[2])
"""


def stage_server_code() -> Path:
    """Copy the server-side package parts to ``<runtime>/code/<hash>/`` and return that dir."""
    package_dir = _PACKAGE_DIR
    files = []
    for pattern in _STAGED_PARTS:
        files += sorted(package_dir.glob(pattern))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(package_dir)).encode() + b"\0" + path.read_bytes() + b"\0")
    code_root = ensure_private_dir(runtime_dir() / "code")
    target = code_root / digest.hexdigest()[:16]
    if (target / "slicebridge" / "__init__.py").is_file():
        return target
    tmp = code_root / f".staging-{uuid.uuid4().hex}"
    for path in files:
        dest = tmp / "slicebridge" / path.relative_to(package_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
    try:
        os.rename(tmp, target)
    except OSError:  # another process staged the same code first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def server_environ(env: PythonEnv, threads: int | None = None) -> dict:
    """The environment variables for the server: ours minus anything that points Python elsewhere,
    and its CPU thread count when ``threads`` is given."""
    environ = python_free_environ()
    bin_dir = str(Path(env.python).parent)
    environ["PATH"] = bin_dir + os.pathsep + environ.get("PATH", "")
    environ["CONDA_PREFIX"] = env.prefix
    environ["PYTHONUNBUFFERED"] = "1"
    environ["PYTHONNOUSERSITE"] = "1"
    # OpenMP's threads spin while they wait by default: with the client (or anyone) holding a core,
    # MKL's eigh in slicing then runs hundreds of times slower (make bench: 20 eighs 25-34 s, not 0.1 s).
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is not None:
        environ.update(dict.fromkeys(_THREAD_VARIABLES, str(threads)))
    return environ


def usable_cores() -> int:
    """The physical cores this process may run on: its CPU affinity, hyperthread siblings counted once
    (each CPU once where the topology cannot be read)."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def thread_shares(devices: list[str], cores: int) -> list[int]:
    """The CPU threads of each of the servers started side by side for ``devices``: the CPU servers
    split the cores between them; a GPU server, whose CPU work is loading, copying and saving, gets an
    even share of them among all the servers (all the cores when it is the only one)."""
    host_only = [set(device.split("+")) == {"cpu"} for device in devices]  # cpu, or a group of cpu alone
    on_cpu = sum(host_only)
    return [max(1, cores // (on_cpu if alone else len(devices))) for alone in host_only]


def split_by_user() -> bool:
    """Whether the user set the thread count of every process (``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``)."""
    return any(os.environ.get(name) for name in _THREAD_VARIABLES)


@dataclass
class ServerProcess:
    """A running server, started by us (``popen`` set) or found through its connection file."""

    conn_path: Path
    info: ConnectionInfo
    popen: subprocess.Popen | None = None
    owned: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen is not None else self.info.pid

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.info.pid, self.info.server_start)

    def exit_code(self) -> int | None:
        return self.popen.poll() if self.popen is not None else None

    def stderr_tail(self, lines: int = 30) -> str:
        return log_tail(self.info.log_path, lines)

    def wait_ready(self, timeout: float) -> None:
        """Wait until the server has written ``ready`` into its connection file."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while time.monotonic() < deadline:
            if not self.alive():
                self._raise_start_failure()
            try:
                info = read_connection_file(self.conn_path)
            except ConnectionFileError:
                info = None
            if info is not None and info.ready:
                self.info = info
                return
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        self.kill()
        raise ServerStartFailed(
            f"the server in {self.info.python} did not become ready within {timeout:.0f}s",
            self.stderr_tail(),
        )

    def _raise_start_failure(self) -> None:
        tail = self.stderr_tail()
        code = self.exit_code()
        for line in tail.splitlines():
            if line.startswith(BOOT_ERROR_MARKER):
                what, *rest = line[len(BOOT_ERROR_MARKER) :].split()
                if what == "missing-packages":
                    raise EnvMissingPackages(self.info.env, self.info.python, rest)
                if what == "python-too-old":
                    raise EnvNotUsable(
                        f"the env {self.info.env!r} ({self.info.python}) has Python {rest[0]}; "
                        "the slicebridge server needs Python 3.10 or newer"
                    )
        raise ServerStartFailed(f"the server in {self.info.python} exited while starting (exit code {code})", tail)

    def signal(self, sig: int) -> None:
        """Signal the server through its Popen, or by pid only while that pid is still the process
        that started at the recorded start time."""
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.send_signal(sig)
        else:
            signal_process(self.info.pid, self.info.server_start, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait()

    def stop(self, channel, timeout: float) -> None:
        """Stop the server: ask it over ``channel`` (a ``bridge.channel.Channel``; SIGTERM if it
        cannot be asked), wait up to ``timeout``, then kill it; its connection file goes too."""
        if self.alive():
            try:
                channel.request("shutdown", protocol.ShutdownArgs(), timeout=timeout)
            except SlicebridgeError as exc:
                log.warning("shutdown request to pid %d failed (%s); sending SIGTERM", self.pid, exc)
                self.signal(signal.SIGTERM)
        self._wait_or_kill(timeout)
        self.conn_path.unlink(missing_ok=True)

    def terminate(self, timeout: float) -> None:
        """Stop a server that cannot be asked (no usable connection file): SIGTERM, then SIGKILL."""
        self.signal(signal.SIGTERM)
        self._wait_or_kill(timeout)

    def _wait_or_kill(self, timeout: float) -> None:
        if not self.wait_exit(timeout):
            log.warning("server pid %d did not stop; killing it", self.pid)
            self.kill()
        if self.wait_exit(timeout):  # one that was killed (or died) cannot remove its socket and shm dir
            remove_leftovers(self.info)

    def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(0.02)
        return not self.alive()


def log_tail(path: str, lines: int = 30, max_bytes: int = 16384) -> str:
    """The last ``lines`` lines of a log file (empty if unreadable)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def start_server(
    env: PythonEnv,
    *,
    detached: bool = False,
    transport: str = "ipc",
    ip: str = "127.0.0.1",
    max_message_bytes: int | None = None,
    debug_ops: bool | None = None,
    ready_timeout: float = 120.0,
    threads: int | None = None,
) -> ServerProcess:
    """Start a server in ``env`` and wait until it listens.

    An owned server (``detached=False``) watches this process and exits when it is gone.
    A detached one starts in its own session, keeps its connection file in the runtime
    dir's ``servers/`` for other clients, and runs until stopped. ``threads``: its CPU threads
    (None: as the environment says).
    """
    if transport not in ("ipc", "tcp"):
        raise ValueError(f"transport must be 'ipc' or 'tcp', not {transport!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a whole number of at least 1 (or None), not {threads!r}")
    settings.check_all()
    if transport == "tcp" and not ip.startswith("127.") and ip not in ("::1", "localhost"):
        if not settings.allow_remote():
            raise ValueError(
                f"refusing to listen on {ip}: the bridge binds loopback only unless "
                f"{settings.ALLOW_REMOTE.name}=1 is set"
            )
    code_dir = stage_server_code()
    run_dir = runtime_dir()
    server_id = uuid.uuid4().hex[:12]
    if detached:
        conn_path = detached_connection_path(env.python)
    else:
        conn_path = ensure_private_dir(run_dir / "owned") / f"server-{server_id}.json"
    logs_dir = ensure_private_dir(run_dir / "logs")
    prune_logs(logs_dir)
    log_path = logs_dir / f"server-{server_id}.log"
    if debug_ops is None:
        debug_ops = settings.debug_ops()
    info = ConnectionInfo(
        key=new_key(),
        transport=transport,
        ip=ip,
        endpoint=ipc_endpoint(f"s-{server_id}") if transport == "ipc" else "",
        env=env.spec,
        python=env.python,
        prefix=reported_prefix(env.python),
        log_path=str(log_path),
        detached=detached,
        owner_pid=0 if detached else os.getpid(),
        owner_start="" if detached else process_start_time(os.getpid()),
        debug_ops=debug_ops,
        shared_memory=transport == "ipc" or ip.startswith("127.") or ip in ("::1", "localhost"),
    )
    if max_message_bytes:
        info.max_message_bytes = int(max_message_bytes)
    write_connection_file(info, conn_path)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        popen = subprocess.Popen(
            [env.python, "-I", "-c", _BOOT_SCRIPT, str(code_dir), str(conn_path)],
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=log_fd,
            env=server_environ(env, threads),
            cwd=str(run_dir),
            start_new_session=True,  # Ctrl-C in the user's terminal must not reach the server
            close_fds=True,
        )
    except OSError as exc:
        conn_path.unlink(missing_ok=True)
        raise ServerStartFailed(f"could not run {env.python}: {exc.strerror}") from None
    finally:
        os.close(log_fd)
    log.info("started server pid %d in %s (%s)", popen.pid, env.python, "detached" if detached else "owned")
    server = ServerProcess(conn_path, info, popen, owned=not detached)
    try:
        server.wait_ready(ready_timeout)
    except BaseException:
        server.kill()
        conn_path.unlink(missing_ok=True)
        raise
    return server


def prune_logs(logs_dir: Path, keep: int = LOGS_KEPT) -> None:
    """Delete server logs beyond the newest ``keep``, never one that a live or starting server writes."""
    in_use = set()
    for conn in [*logs_dir.parent.glob("servers/server-*.json"), *logs_dir.parent.glob("owned/server-*.json")]:
        try:
            info = read_connection_file(conn)
        except ConnectionFileError:
            continue
        if not info.ready or pid_alive(info.pid, info.server_start):
            in_use.add(info.log_path)
    logs = sorted((p for p in logs_dir.glob("server-*.log") if str(p) not in in_use), key=_mtime, reverse=True)
    for old in logs[keep:]:
        old.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@contextlib.contextmanager
def detached_start_lock(env: PythonEnv, timeout: float):
    """Held while the detached server of ``env`` is looked for and started: one start at a time."""
    path = detached_connection_path(env.python).with_suffix(".lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServerStartFailed(
                        f"another process has been starting the server of {env.spec!r} "
                        f"for over {timeout:.0f}s; try again"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def detached_server_processes() -> list[ServerProcess]:
    """Every detached server process of this runtime dir, found through /proc: also those whose
    connection file is refused or was lost (their handles carry no key: signals only)."""
    servers, found = str(servers_dir()), []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or entry.stat().st_uid != os.getuid():
                continue
            argv = [os.fsdecode(a) for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if (
            len(argv) >= 6
            and argv[1:3] == ["-I", "-c"]
            and _BOOT_IMPORT in argv[3]
            and os.path.dirname(argv[5]) == servers
        ):
            pid = int(entry.name)
            info = ConnectionInfo(
                key="", env=argv[0], python=argv[0], pid=pid, server_start=process_start_time(pid), detached=True
            )
            if info.server_start and pid_alive(pid, info.server_start):
                found.append(ServerProcess(Path(argv[5]), info))
    return found


def find_detached(env: PythonEnv) -> ServerProcess | None:
    """The detached server running for ``env``, if its connection file names a live process."""
    path = detached_connection_path(env.python)
    return attach(path, quiet=True)


def attach(conn_path: Path, quiet: bool = False) -> ServerProcess | None:
    """A handle on the server behind a connection file; None (when ``quiet``) if it is not running."""
    try:
        info = read_connection_file(conn_path)
    except ConnectionFileError:
        if quiet:
            return None
        raise
    if not info.ready or not pid_alive(info.pid, info.server_start):
        if info.ready:  # it died (killed, crashed): what it could not remove goes now
            remove_leftovers(info)
        if quiet:
            return None
        raise ConnectionFileError(f"the server of {conn_path} (pid {info.pid}) is not running")
    return ServerProcess(Path(conn_path), info)


def list_detached() -> list[Path]:
    return sorted(p for p in (runtime_dir() / "servers").glob("server-*.json"))
