"""Entry point of the server process: logging, connection file, handlers, event loop."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from slicebridge.bridge.connection import read_connection_file
from slicebridge.bridge.server_loop import ServerLoop
from slicebridge.server.handlers import build_handlers


def main(conn_path: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s",
    )
    info = read_connection_file(Path(conn_path))
    ServerLoop(Path(conn_path), info, build_handlers()).run()
