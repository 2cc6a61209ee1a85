"""``slicebridge demo``: the bridge at work on this machine, in a few seconds.

Starts a server in the slicegpt env, shows what it runs on next to this env, and
sends a tensor through it and back. (The full job — slice, convert, export, verify —
joins this demo as those features land.)
"""

from __future__ import annotations

import statistics
import time

from slicebridge.client.bridge import Bridge


def run_demo(env: str) -> int:
    import torch
    import transformers

    started = time.perf_counter()
    with Bridge(env=env, attach=False) as bridge:
        hello = bridge.server_hello
        ready = time.perf_counter() - started
        pings = sorted(bridge.ping() for _ in range(200))
        tensor = torch.randn(1024, 1024)
        t0 = time.perf_counter()
        back = bridge.echo(tensor)
        echo_s = time.perf_counter() - t0
        assert torch.equal(back, tensor)
    print(f"server ready in {ready:.2f}s (pid {hello.pid}, {hello.executable})")
    print(f"{'':14s}{'this env':18s}{'slicegpt env':18s}")
    print(f"{'python':14s}{__import__('sys').version.split()[0]:18s}{hello.python:18s}")
    print(f"{'torch':14s}{torch.__version__:18s}{hello.versions['torch'] or '-':18s}")
    print(f"{'transformers':14s}{transformers.__version__:18s}{hello.versions['transformers'] or '-':18s}")
    print(f"ping over ipc: p50 {statistics.median(pings) * 1e6:.0f} µs, p90 {pings[179] * 1e6:.0f} µs")
    print(f"4 MiB tensor there and back, bit-exact: {echo_s * 1e3:.1f} ms")
    return 0
