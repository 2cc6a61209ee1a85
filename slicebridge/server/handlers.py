"""Request handlers of the server: one function per operation in ``bridge.protocol``.

Each handler takes the operation's typed arguments and a ``RequestContext`` and
returns the operation's result dataclass. ``ping``, ``stats`` and ``shutdown`` are
answered by the event loop itself and have no handler here.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

from slicebridge.bridge import protocol
from slicebridge.bridge.server_loop import RequestContext
from slicebridge.model import request_scope
from slicebridge.server import faults, runtime_info


def runtime_facts() -> dict:
    """What ``hello`` reports besides the loop's own fields (imports torch: run once, at warm-up)."""
    versions, files = runtime_info.package_versions()
    devices = runtime_info.cuda_devices() if versions.get("torch") else []
    facts = runtime_info.python_facts()
    return {
        "protocol": protocol.PROTOCOL_VERSION,
        "pid": os.getpid(),
        "python": facts["python"],
        "executable": facts["executable"],
        "prefix": facts["prefix"],
        "versions": versions,
        "module_files": files,
        "sys_path": facts["sys_path"],
        "device": "cuda" if devices else "cpu",
        "cuda_devices": devices,
    }


def echo(args: protocol.EchoArgs, ctx: RequestContext) -> protocol.EchoResult:
    """Return the payload; tensors go through torch and back, to prove the frames are bit-exact."""
    return protocol.EchoResult(payload=protocol.received_tensors(args.payload))


def sleep(args: protocol.SleepArgs, ctx: RequestContext) -> protocol.SleepResult:
    started = time.monotonic()
    step = max(0.01, args.step)
    while (elapsed := time.monotonic() - started) < args.seconds:
        ctx.progress("sleeping", round(elapsed, 3), args.seconds, "s")
        time.sleep(min(step, args.seconds - elapsed))
    ctx.progress("sleeping", args.seconds, args.seconds, "s")
    return protocol.SleepResult(slept=time.monotonic() - started)


def fail(args: protocol.FailArgs, ctx: RequestContext):
    kinds = {
        "RuntimeError": RuntimeError,
        "MemoryError": MemoryError,
        "CudaOutOfMemory": faults.OutOfMemoryError,
        "KeyboardInterrupt": KeyboardInterrupt,
        "ValueError": ValueError,
    }
    raise kinds.get(args.kind, RuntimeError)(args.message)


def build_handlers() -> dict:
    from slicebridge.server import seed
    from slicebridge.server.convert import ConvertService
    from slicebridge.server.slice_service import SliceService

    service = ConvertService()
    slicing = SliceService(service)
    handlers = {
        "echo": echo,
        "sleep": sleep,
        "fail": fail,
        "convert": service.convert,
        "export": service.export,
        "reference": service.reference,
        "cache_info": service.cache_info,
        "slice": slicing.slice,
        "upgrade": seed.upgrade,
        "info": seed.info,
    }
    return {op: _in_request_scope(handler) for op, handler in handlers.items()}


def _in_request_scope(handler):
    """``handler``, run so that the model code it calls notices the request's cancellation and
    passes each output to ``before_publish`` first (``model.request_scope``)."""

    @functools.wraps(handler)
    def run(args, ctx: RequestContext):
        with request_scope.serving(ctx.check_cancelled, functools.partial(before_publish, ctx)):
            return handler(args, ctx)

    return run


def before_publish(ctx: RequestContext, path: Path) -> None:
    """Last stop before an output of ``ctx``'s request is put in place: if the request was cancelled
    meanwhile, its output is discarded (``faults`` may pause or fail here in a debug server)."""
    faults.at("publish")
    ctx.check_cancelled()
