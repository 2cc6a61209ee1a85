"""Entry point of the server process: logging, its own log's size cap, connection file,
handlers, event loop, and its CPU threads.

The launcher gives a server its thread count as ``OMP_NUM_THREADS`` (and ``MKL_NUM_THREADS``) in its
environment, which torch reads when it starts; the warm-up, which a client's first ``hello`` waits for,
first holds torch to it with ``torch.set_num_threads`` (whatever thread pool this torch was built with),
and ``hello`` reports the count torch then uses.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
from pathlib import Path

import slicebridge
from slicebridge import settings
from slicebridge.bridge.connection import read_connection_file
from slicebridge.bridge.server_loop import ServerLoop
from slicebridge.processes import process_start_time
from slicebridge.server import faults
from slicebridge.server.handlers import build_handlers, runtime_facts

_LOG_CHECK_S = 1.0


def main(conn_path: str) -> None:
    slicebridge._strict_torch_load()  # before torch is imported: a .pt read here may call no rebuild function
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s",
    )
    info = read_connection_file(Path(conn_path))
    info.server_start = process_start_time(os.getpid())  # written with ``ready``, against pid reuse
    if info.log_path:
        threading.Thread(
            target=cap_own_log, args=(info.log_path, settings.log_max_bytes()), name="slicebridge-log-cap", daemon=True
        ).start()
    if info.debug_ops:
        faults.install_from_environment()
    ServerLoop(Path(conn_path), info, build_handlers(), runtime_facts=describe_self, on_out_of_memory=free_memory).run()


def describe_self() -> dict:
    """``hello``'s facts (run once, at warm-up): the threads are set first, then reported with the rest."""
    threads = hold_threads()
    return {**runtime_facts(), "threads": threads}


def hold_threads() -> int | None:
    """Set torch's CPU threads to ``OMP_NUM_THREADS`` when that is a count; the count torch uses (None: no torch)."""
    try:
        import torch
    except Exception:  # not installed, or broken: runtime_facts says which
        return None
    wanted = os.environ.get("OMP_NUM_THREADS", "")
    if wanted.isdigit() and int(wanted) > 0:
        torch.set_num_threads(int(wanted))
    return torch.get_num_threads()


def cap_own_log(path: str, max_bytes: int) -> None:
    """Keep the log that our stdout and stderr (fds 1 and 2, opened O_APPEND by the launcher)
    write to under ``max_bytes``: whenever it is larger, cut it to its last quarter."""
    try:
        if os.fstat(2).st_ino != os.stat(path).st_ino:
            return  # stderr is not that log (started by hand)
    except OSError:
        return
    while True:
        time.sleep(_LOG_CHECK_S)
        try:
            size = os.fstat(2).st_size
            if size > max_bytes:
                _keep_tail(path, size, max_bytes // 4)
        except OSError:  # a full disk, say: the log stays as it is
            continue


def _keep_tail(path: str, size: int, keep: int) -> None:
    with open(path, "rb") as fh:
        fh.seek(size - keep)
        fh.readline()  # from a line start
        tail = fh.read()
    os.ftruncate(2, 0)  # O_APPEND: every writer goes on at the new end
    os.write(
        2,
        f"[slicebridge: log cut to its last {len(tail)} bytes; the {size - len(tail)} before were dropped]\n".encode()
        + tail,
    )


def free_memory() -> None:
    """After an out-of-memory error: drop garbage and give cached GPU blocks back."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
