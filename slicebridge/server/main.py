"""Entry point of the server process: logging, connection file, handlers, event loop."""

from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path

from slicebridge.bridge.connection import read_connection_file
from slicebridge.bridge.server_loop import ServerLoop, current_request
from slicebridge.model import atomic
from slicebridge.server import faults
from slicebridge.server.handlers import build_handlers, runtime_facts


def main(conn_path: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s",
    )
    info = read_connection_file(Path(conn_path))
    if info.debug_ops:
        faults.install_from_environment()
    atomic.before_publish = before_publish
    ServerLoop(Path(conn_path), info, build_handlers(), runtime_facts=runtime_facts,
               on_out_of_memory=free_memory).run()


def before_publish(path: Path) -> None:
    """Last stop before an output is put in place: a cancelled request's output is discarded."""
    faults.at("publish")
    request = current_request()
    if request is not None:
        request.check_cancelled()


def free_memory() -> None:
    """After an out-of-memory error: drop garbage and give cached GPU blocks back."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
