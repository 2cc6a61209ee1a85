"""The ``slicebridge`` command line.

    slicebridge server start --env slicegpt     a detached warm server for that env
    slicebridge server status [--env slicegpt]  running servers and their health
    slicebridge server stop --env slicegpt      stop it (or --all)
    slicebridge doctor --env slicegpt [--fix]   what both envs have; --fix installs pyzmq/msgpack there
    slicebridge hello --env slicegpt            handshake: the server's python, packages, device
    slicebridge demo --env slicegpt             the bridge at work on this machine

Errors print one sentence (no traceback; ``--debug`` shows it) and exit non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from slicebridge.bridge.errors import SlicebridgeError
from slicebridge.client.bridge import Bridge, default_env

log = logging.getLogger("slicebridge.cli")


def _add_env(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--env", default=None if required else default_env(), required=required,
                        help="the slicegpt env: conda env name, prefix directory or python executable "
                             f"(default: $SLICEBRIDGE_ENV or {default_env()!r})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slicebridge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-v", "--verbose", action="store_true", help="show progress logs")
    commands = parser.add_subparsers(dest="command", required=True)

    server = commands.add_parser("server", help="manage detached warm servers")
    server_commands = server.add_subparsers(dest="server_command", required=True)
    start = server_commands.add_parser("start", help="start a detached server for an env")
    _add_env(start)
    start.add_argument("--tcp", action="store_true", help="listen on tcp://127.0.0.1 instead of ipc")
    start.add_argument("--json", action="store_true")
    status = server_commands.add_parser("status", help="list running detached servers")
    status.add_argument("--env", default=None, help="only the server of this env")
    status.add_argument("--json", action="store_true")
    stop = server_commands.add_parser("stop", help="stop a detached server")
    stop_which = stop.add_mutually_exclusive_group()
    stop_which.add_argument("--env", default=None)
    stop_which.add_argument("--all", action="store_true", help="stop every detached server")
    stop_which.add_argument("--connection-file", default=None)

    doctor = commands.add_parser("doctor", help="report both envs; --fix installs the wire packages")
    _add_env(doctor)
    doctor.add_argument("--fix", action="store_true", help="pip install pyzmq and msgpack into the env")
    doctor.add_argument("--json", action="store_true")

    hello = commands.add_parser("hello", help="handshake with a server and show what it runs on")
    _add_env(hello)
    hello.add_argument("--json", action="store_true")

    demo = commands.add_parser("demo", help="show the bridge at work on this machine")
    _add_env(demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except SlicebridgeError as exc:
        if args.debug:
            raise
        print(f"slicebridge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slicebridge: interrupted", file=sys.stderr)
        return 130


def _print_json(data) -> None:
    print(json.dumps(data, indent=1, default=str))


def cmd_server(args) -> int:
    from slicebridge.client import servers

    if args.server_command == "start":
        server, started = servers.start_detached(args.env, transport="tcp" if args.tcp else "ipc")
        info = server.info.public()
        if args.json:
            _print_json({"started": started, "connection_file": str(server.conn_path), **info})
        else:
            what = "started" if started else "already running"
            print(f"server {what}: pid {server.pid}, {info['endpoint']}\n"
                  f"  env {info['env']} ({info['python']})\n  connection file {server.conn_path}\n"
                  f"  log {info['log_path']}")
        return 0
    if args.server_command == "status":
        found = servers.status(args.env)
        if args.json:
            _print_json([dataclasses.asdict(s) for s in found])
            return 0
        if not found:
            print("no detached slicebridge server is running")
        for s in found:
            extra = (f", up {s.uptime_s:.0f}s, {'busy' if s.busy else 'idle'}, {s.queued} queued, "
                     f"{s.counters.get('requests', 0)} requests" if s.state == "running" else "")
            print(f"{s.state}: pid {s.pid} env {s.env} ({s.python}) at {s.endpoint}{extra}")
        return 0
    # stop
    if args.all:
        targets = [s.connection_file for s in servers.status() if s.state != "stale"]
        for path in targets:
            item = servers.stop(connection_file=path)
            print(f"stopped: pid {item.pid} env {item.env}")
        if not targets:
            print("no detached slicebridge server is running")
        return 0
    item = servers.stop(env=args.env or (None if args.connection_file else default_env()),
                        connection_file=args.connection_file)
    print(f"stopped: pid {item.pid} env {item.env}")
    return 0


def cmd_doctor(args) -> int:
    from slicebridge.client.doctor import run_doctor

    report = run_doctor(args.env, fix=args.fix)
    if args.json:
        _print_json(report.as_dict())
    else:
        print(report.table())
    return 0 if report.ok else 1


def cmd_hello(args) -> int:
    started = time.perf_counter()
    with Bridge(env=args.env) as bridge:
        hello = bridge.server_hello
        rtt = bridge.ping()
        source = "attached to the detached server" if not bridge.owns_server else "started a server"
    if args.json:
        _print_json({**dataclasses.asdict(hello), "ping_s": rtt})
        return 0
    print(f"{source} (pid {hello.pid}) in {time.perf_counter() - started:.2f}s; ping {rtt * 1e6:.0f} µs")
    print(f"python {hello.python} ({hello.executable}), device {hello.device}")
    for name, version in hello.versions.items():
        print(f"  {name:13s} {version or '-'}")
    return 0


def cmd_demo(args) -> int:
    from slicebridge.client.demo import run_demo

    return run_demo(args.env)


COMMANDS = {"server": cmd_server, "doctor": cmd_doctor, "hello": cmd_hello, "demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())
