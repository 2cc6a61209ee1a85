"""``Bridge``: a connection from the base env to a slicebridge server in another env.

    with Bridge(env="slicegpt") as bridge:
        bridge.hello().versions["transformers"]   # '4.41.0': the slicegpt env's own

On entry it attaches to the detached server of that env if one is running (see
``slicebridge server start``), and otherwise starts a server that it owns and that
exits with it. A connection file can be named instead of an env to attach to any
running server.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slicebridge import settings
from slicebridge.bridge import protocol
from slicebridge.bridge.channel import Channel, EventCallback
from slicebridge.bridge.envs import PythonEnv, find_env, reported_prefix
from slicebridge.bridge.errors import ProtocolError, ServerDied, ServerEnvMismatch, ServerKeepsDying
from slicebridge.bridge.launcher import ServerProcess, attach, find_detached, start_server
from slicebridge.model.atomic import remove_orphaned_partials, resolve

if TYPE_CHECKING:
    from slicebridge.client.slicing import SliceSweep

log = logging.getLogger(__name__)

_SHUTDOWN_WAIT_S = 10.0


def default_env() -> str:
    """The env used when none is named: ``$SLICEBRIDGE_ENV``, else ``slicegpt``."""
    return settings.default_env()


class Bridge:
    """A client of one slicebridge server.

    Args:
        env: conda env name, env prefix or python executable of the slicegpt env (or the
            ``PythonEnv`` it was already resolved to).
        connection_file: attach to the server behind this file instead (``env`` is then ignored).
        attach: use the env's detached server when one is running (default True).
        transport: ``"ipc"`` (default) or ``"tcp"`` (loopback) for a server this bridge starts.
        heartbeat_timeout: seconds of silence after which the server is declared dead.
        ready_timeout: seconds to wait for a new server to listen.
        max_message_bytes: largest message either side accepts (a new server only).
        debug_ops: serve the diagnostic operations (``sleep``, ``fail``); default from
            ``SLICEBRIDGE_DEBUG_OPS=1``.
        max_restarts: fresh servers started after deaths before giving up with ``ServerKeepsDying``.
        threads: CPU threads of a server this bridge starts (None: ``OMP_NUM_THREADS`` if set, else
            torch's default); its ``hello`` reports them.
    """

    def __init__(
        self,
        env: str | os.PathLike | PythonEnv | None = None,
        *,
        connection_file: str | os.PathLike | None = None,
        attach: bool = True,
        transport: str = "ipc",
        heartbeat_timeout: float = 10.0,
        ready_timeout: float = 120.0,
        max_message_bytes: int | None = None,
        debug_ops: bool | None = None,
        max_restarts: int = 3,
        threads: int | None = None,
    ):
        self.env: PythonEnv | None = env if isinstance(env, PythonEnv) else None
        if self.env is not None:
            self.env_spec = self.env.spec
        else:
            self.env_spec = os.fspath(env) if env is not None else default_env()
        self.connection_file = Path(connection_file) if connection_file else None
        self.attach_detached = attach
        self.transport = transport
        self.heartbeat_timeout = heartbeat_timeout
        self.ready_timeout = ready_timeout
        self.max_message_bytes = max_message_bytes
        self.debug_ops = debug_ops
        self.threads = threads
        self.server: ServerProcess | None = None
        self.channel: Channel | None = None
        self.server_hello: protocol.HelloResult | None = None
        self.max_restarts = max_restarts
        self.restarts = 0

    # ------------------------------------------------------------------ lifetime

    def __enter__(self) -> Bridge:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def owns_server(self) -> bool:
        return self.server is not None and self.server.owned

    def start(self) -> Bridge:
        """Attach to or start the server and do the handshake (idempotent)."""
        if self.channel is not None:
            return self
        if self.connection_file is not None:
            self.server = attach(self.connection_file)
        else:
            self.env = self.env or find_env(self.env_spec)
            self.server = find_detached(self.env) if self.attach_detached else None
            if self.server is None:
                self.server = start_server(
                    self.env,
                    transport=self.transport,
                    max_message_bytes=self.max_message_bytes,
                    debug_ops=self.debug_ops,
                    ready_timeout=self.ready_timeout,
                    threads=self.threads,
                )
        self.channel = Channel(self.server, heartbeat_timeout=self.heartbeat_timeout)
        try:
            self.server_hello = self.hello()
        except BaseException:
            self.close()
            raise
        if self.server_hello.protocol != protocol.PROTOCOL_VERSION:
            self.close()
            raise ProtocolError(
                f"the server speaks protocol {self.server_hello.protocol}, this client "
                f"{protocol.PROTOCOL_VERSION}; stop it (slicebridge server stop) and start it again"
            )
        self._check_env(self.server_hello)
        return self

    def _check_env(self, hello: protocol.HelloResult) -> None:
        """Refuse a server that runs in another env (``sys.prefix``) than the one asked for."""
        expected = reported_prefix(self.env.python) if self.env is not None else self.server.info.prefix
        if expected and os.path.realpath(hello.prefix) != expected:
            conn_path = self.server.conn_path
            self.close()
            raise ServerEnvMismatch(
                f"the server behind {conn_path} (pid {hello.pid}) runs in the env {hello.prefix}, not in "
                f"{expected} that was asked for; refusing it (`slicebridge server stop --connection-file "
                f"{conn_path}` stops it)"
            )

    def _restart(self) -> None:
        dead = self.server
        self.restarts += 1
        tail = dead.stderr_tail()
        self.channel.close()
        self.channel = None
        if dead.owned:
            dead.kill()
            dead.conn_path.unlink(missing_ok=True)
        if self.restarts > self.max_restarts:
            raise ServerKeepsDying(
                f"the slicebridge server for {self.env_spec!r} died again after {self.max_restarts} fresh "
                "starts; not starting it once more",
                tail,
            )
        log.warning(
            "the server (pid %d) died; starting a fresh one (%d of %d)", dead.pid, self.restarts, self.max_restarts
        )
        self.start()

    def close(self) -> None:
        """Disconnect; a server this bridge owns is shut down (killed if it does not stop)."""
        server, channel = self.server, self.channel
        self.channel = None
        if channel is None:
            return
        if server is not None and server.owned:
            server.stop(channel, _SHUTDOWN_WAIT_S)
        channel.close()

    # ------------------------------------------------------------------ requests

    def request(
        self, op: str, args: Any = None, on_event: EventCallback | None = None, timeout: float | None = None
    ) -> Any:
        """Send one request and return its result as the operation's result dataclass.

        If the server died since the last request, a fresh one is started first (at most
        ``max_restarts`` times in this bridge's life, then ``ServerKeepsDying``).
        """
        if self.channel is None:
            self.start()
        elif not self.server.alive():
            self._restart()
        body = self.channel.request(op, args, on_event=on_event, timeout=timeout)
        operation = protocol.OPERATIONS.get(op)
        result = protocol.result_from_wire(operation.result, body) if operation else body
        return protocol.received_tensors(result)

    def ping(self) -> float:
        """Round-trip time of one ``ping`` in seconds."""
        started = time.perf_counter()
        self.request("ping", protocol.PingArgs())
        return time.perf_counter() - started

    def hello(self) -> protocol.HelloResult:
        return self.request("hello", protocol.HelloArgs())

    def stats(self) -> protocol.StatsResult:
        return self.request("stats", protocol.StatsArgs())

    def echo(self, payload: Any) -> Any:
        """Send ``payload`` (tensors included) through the server and return what comes back."""
        return self.request("echo", protocol.EchoArgs(payload=payload)).payload

    def convert(
        self,
        slicegpt_model: str | os.PathLike,
        output: str | os.PathLike,
        *,
        base_model: str | os.PathLike | None = None,
        sparsity: float | None = None,
        round_interval: int | None = None,
        loader: str = "auto",
        device: str = "auto",
        dtype: str | None = None,
        overwrite: bool = False,
        pickle_module: str = "auto",
        on_event: EventCallback | None = None,
    ) -> protocol.ConvertResult:
        """Convert a SliceGPT checkpoint (run_slicegpt dir or ``.pt``) into a portable ``.bin``.

        An ``output`` ending in a slash is a directory (made if missing) for ``<checkpoint>.bin``.
        """
        args = protocol.ConvertArgs(
            slicegpt_model=_absolute(slicegpt_model),
            output=_output(slicegpt_model, output, ".bin", sparsity),
            base_model=_absolute(base_model) if base_model is not None else None,
            sparsity=float(sparsity) if sparsity is not None else None,
            round_interval=round_interval,
            loader=loader,
            device=device,
            dtype=dtype,
            overwrite=overwrite,
            pickle_module=pickle_module,
        )
        return self._writing_request("convert", args, on_event)

    def export(
        self,
        slicegpt_model: str | os.PathLike,
        output: str | os.PathLike,
        *,
        base_model: str | os.PathLike | None = None,
        sparsity: float | None = None,
        round_interval: int | None = None,
        loader: str = "auto",
        device: str = "auto",
        dtype: str | None = None,
        overwrite: bool = False,
        max_shard_size: int = 5 * 1024**3,
        on_event: EventCallback | None = None,
    ) -> protocol.ExportResult:
        """Write a pickle-free Hugging Face directory (safetensors, config, remote code, card).

        An ``output`` ending in a slash is a directory (made if missing) for ``<checkpoint>/``.
        """
        args = protocol.ExportArgs(
            slicegpt_model=_absolute(slicegpt_model),
            output=_output(slicegpt_model, output, "", sparsity),
            base_model=_absolute(base_model) if base_model is not None else None,
            sparsity=float(sparsity) if sparsity is not None else None,
            round_interval=round_interval,
            loader=loader,
            device=device,
            dtype=dtype,
            overwrite=overwrite,
            max_shard_size=int(max_shard_size),
        )
        return self._writing_request("export", args, on_event)

    def upgrade(
        self,
        source: str | os.PathLike,
        output: str | os.PathLike,
        *,
        trust_pickle: bool = False,
        overwrite: bool = False,
        pickle_module: str = "auto",
        on_event: EventCallback | None = None,
    ) -> protocol.ConvertResult:
        """Turn a ``.bin`` made the seed's way into a portable one (read in the slicegpt env).

        Reading it unpickles it, which runs code from the file: the server refuses unless
        ``trust_pickle=True`` says you trust the file.
        """
        args = protocol.UpgradeArgs(
            source=_absolute(source),
            output=_absolute(output),
            overwrite=overwrite,
            pickle_module=pickle_module,
            trust_pickle=bool(trust_pickle),
        )
        return self._writing_request("upgrade", args, on_event)

    def slice(
        self,
        base_model: str | os.PathLike,
        sparsities: list[float],
        output_dir: str | os.PathLike,
        *,
        calibration: str | os.PathLike | None = None,
        cal_dataset: str | None = None,
        cal_nsamples: int = 128,
        cal_batch_size: int = 16,
        cal_max_seqlen: int = 2048,
        varied_seqlen: bool = False,
        seed: int = 42,
        round_interval: int = 8,
        final_orientation: str = "random",
        model_name: str | None = None,
        slicer: str = "auto",
        device: str = "auto",
        dtype: str = "fp16",
        distribute_model: bool = False,
        eval_ppl: bool = True,
        ppl_eval_seqlen: int = 2048,
        ppl_eval_batch_size: int = 8,
        held_out: float = 0.1,
        overwrite: bool = False,
        convert: bool = False,
        export: bool = False,
        verify: bool = False,
        on_event: EventCallback | None = None,
    ) -> SliceSweep:
        """Slice the dense model ``base_model`` at each sparsity, as run_slicegpt does, in one request.

        Options are run_slicegpt's flags (see ``protocol.SliceArgs``); calibration is a local text
        (``calibration``) or a dataset name (``cal_dataset``), exactly one. ``convert`` / ``export``
        also write ``.bin`` files / Hugging Face dirs; ``verify`` checks them here (without either, it
        implies ``convert``). Returns a ``SliceSweep``; ``SweepIncomplete`` (its ``.sweep`` holds what
        was done) if a sparsity failed or an artifact failed verification. See ``client.slicing``.
        """
        from slicebridge.client.slicing import check_sweep, run_sweep

        args = protocol.SliceArgs(
            base_model=_absolute(base_model),
            sparsities=check_sweep(sparsities, output_dir, calibration, cal_dataset, round_interval),
            output_dir=_absolute(output_dir),
            calibration=_absolute(calibration) if calibration is not None else None,
            cal_dataset=cal_dataset,
            cal_nsamples=cal_nsamples,
            cal_batch_size=cal_batch_size,
            cal_max_seqlen=cal_max_seqlen,
            varied_seqlen=varied_seqlen,
            seed=seed,
            round_interval=round_interval,
            final_orientation=final_orientation,
            model_name=model_name,
            slicer=slicer,
            device=device,
            dtype=dtype,
            distribute_model=distribute_model,
            eval_ppl=eval_ppl,
            ppl_eval_seqlen=ppl_eval_seqlen,
            ppl_eval_batch_size=ppl_eval_batch_size,
            held_out=held_out,
            overwrite=overwrite,
            convert=convert or (verify and not export),
            export=export,
        )
        return run_sweep(self, args, verify=verify, on_event=on_event)

    def verify(self, artifact: str | os.PathLike, checkpoint: str | os.PathLike, **options):
        """Verify ``artifact`` (loaded in this env) against ``checkpoint`` (run in the server).

        Options: base_model, sparsity, round_interval, text, loader, device, artifact_device,
        on_event. Returns a ``VerifyReport`` (``.passed``, ``.table()``, ``.as_dict()``).
        """
        from slicebridge.client.verification import verify_artifact

        return verify_artifact(self, artifact, checkpoint, **options)

    def info(self, path: str | os.PathLike, *, base_model: str | os.PathLike | None = None):
        """Facts about a checkpoint, ``.bin`` or export dir (seed-format files are read in the server)."""
        from slicebridge.client.artifact_info import info

        return info(path, base_model=base_model, bridge=self)

    def _writing_request(self, op: str, args: Any, on_event: EventCallback | None) -> Any:
        """A request that writes ``args.output``: if the server dies mid-write, its temp files go too."""
        try:
            return self.request(op, args, on_event=on_event)
        except ServerDied:
            remove_orphaned_partials(args.output)
            raise

    def cache_info(self) -> protocol.CacheInfoResult:
        return self.request("cache_info", protocol.CacheInfoArgs())

    def shutdown(self) -> None:
        """Stop the server, even a detached one, and close this bridge."""
        if self.channel is None:
            self.start()
        self.channel.request("shutdown", protocol.ShutdownArgs(), timeout=_SHUTDOWN_WAIT_S)
        server = self.server
        self.server = None
        self.channel.close()
        self.channel = None
        if server is not None:
            server.wait_exit(_SHUTDOWN_WAIT_S)


def _absolute(path: str | os.PathLike) -> str:
    """Paths travel absolute (the server's working directory is not the caller's), resolved as the
    shell resolves them: ``link/../x`` is beside the link's target, not beside the link."""
    return str(resolve(path, follow_final=False))


def _output(checkpoint: str | os.PathLike, output: str | os.PathLike, suffix: str, sparsity: float | None) -> str:
    """An output, written through a symlink in its last place (where the server would resolve it)."""
    from slicebridge.client import output_path

    return str(resolve(output_path(checkpoint, output, suffix, sparsity=sparsity)))
