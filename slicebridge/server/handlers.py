"""Request handlers of the server: one function per operation in ``bridge.protocol``.

Each handler takes the operation's typed arguments and a ``RequestContext`` and
returns the operation's result dataclass. ``ping``, ``stats`` and ``shutdown`` are
answered by the event loop itself and have no handler here.
"""

from __future__ import annotations

import os
import time

from slicebridge.bridge import protocol
from slicebridge.bridge.server_loop import RequestContext
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
    from slicebridge.server.convert import ConvertService

    service = ConvertService()
    return {"echo": echo, "sleep": sleep, "fail": fail,
            "convert": service.convert, "export": service.export, "upgrade": service.upgrade, "reference": service.reference,
            "info": service.info,
            "cache_info": service.cache_info}
