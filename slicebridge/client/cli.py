"""The ``slicebridge`` command line.

    slicebridge server start --env slicegpt     a detached warm server for that env
    slicebridge server status [--env slicegpt]  running servers and their health
    slicebridge server stop --env slicegpt      stop it (or --all)
    slicebridge doctor --env slicegpt [--fix]   what both envs have; --fix installs pyzmq/msgpack there
    slicebridge hello --env slicegpt            handshake: the server's python, packages, device
    slicebridge convert CKPT... [--output-dir D] [--verify]   checkpoints -> portable .bin files
    slicebridge convert --slicegpt_model P --base_model B --output O   (the seed script's flags)
    slicebridge export CKPT... [--output-dir D]  checkpoints -> pickle-free Hugging Face dirs
    slicebridge convert|export CKPT... --devices cuda:0,cuda:1 | --ray ADDRESS|auto|local
                                                 the batch on a pool of servers here, or on a Ray cluster
    slicebridge slice --model-path DENSE --save-dir D --sparsity 0.2 0.25 --calibration T [--verify]
                                                 slice a dense model at each sparsity (run_slicegpt's flags)
    slicebridge slice ... --devices cpu,cpu | --ray ADDRESS|auto|local
                                                 the sweep's sparsities shared out over a pool or a Ray cluster
    slicebridge verify ARTIFACT --checkpoint CKPT   forward passes here vs the server; exit 1 on fail
    slicebridge info PATH...                    widths, parameter counts, actual ratio, dtype
    slicebridge upgrade SEED.bin OUT.bin --trust-pickle   a .bin made the seed's way -> a portable one
    slicebridge demo --env slicegpt             the main job on a small embedded model

Errors print one sentence (no traceback; ``--debug`` shows it) and exit non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time

from slicebridge.client.bridge import Bridge, default_env
from slicebridge.errors import SlicebridgeError

log = logging.getLogger(__name__)


def _add_env(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument(
        "--env",
        default=None if required else default_env(),
        required=required,
        help="the slicegpt env: conda env name, prefix directory or python executable "
        f"(default: $SLICEBRIDGE_ENV or {default_env()!r})",
    )


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

    for name, what in (
        ("convert", "checkpoints -> portable .bin files (the seed's dict format)"),
        ("export", "checkpoints -> pickle-free Hugging Face directories"),
    ):
        job = commands.add_parser(name, help=what)
        job.add_argument("checkpoints", nargs="*", help="run_slicegpt dirs, .pt files, globs or sweep dirs")
        job.add_argument(
            "--slicegpt_model",
            "--slicegpt-model",
            dest="slicegpt_model",
            action="append",
            default=[],
            help="a checkpoint (the seed script's flag; may repeat)",
        )
        job.add_argument(
            "--base_model",
            "--base-model",
            dest="base_model",
            default=None,
            help="the dense base model dir (config, tokenizer); default: beside each checkpoint",
        )
        job.add_argument(
            "--output",
            default=None,
            help="output path (one checkpoint only); ending in / it is a directory, as --output-dir",
        )
        job.add_argument(
            "--output-dir", default=None, help="where outputs go, created if missing (default: beside each checkpoint)"
        )
        job.add_argument("--sparsity", type=float, default=None, help="default: from the checkpoint's file name")
        job.add_argument("--round-interval", "--round_interval", dest="round_interval", type=int, default=None)
        job.add_argument("--loader", choices=["auto", "official", "builtin"], default="auto")
        job.add_argument(
            "--device", default="auto", help="auto, cpu, cuda, cuda:N, or a group cuda:0+cuda:1 (one model over both)"
        )
        job.add_argument(
            "--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="default: the checkpoint's own"
        )
        job.add_argument("--overwrite", action="store_true", help="replace existing outputs")
        job.add_argument("--overwrite-flag", default="--overwrite", help=argparse.SUPPRESS)  # make: OVERWRITE=1
        job.add_argument("--verify", action="store_true", help="verify each output in this env afterwards")
        pools = job.add_mutually_exclusive_group()
        _add_devices(pools, "the checkpoints are spread over them")
        pools.add_argument(
            "--ray",
            default=None,
            metavar="ADDRESS|auto|local",
            help="run the batch on a Ray cluster (auto: the one Ray finds; local: a private one for this run), "
            "one warm server per GPU of each node; paths must be on storage every node shares",
        )
        _add_env(job)
        _add_output_flags(job)

    _add_slice_parser(commands)

    verify = commands.add_parser("verify", help="check an artifact here against its checkpoint in the server")
    verify.add_argument("artifact", help="a .bin or an export directory")
    verify.add_argument("--checkpoint", required=True, help="the SliceGPT checkpoint (run_slicegpt dir or .pt)")
    verify.add_argument("--base_model", "--base-model", dest="base_model", default=None)
    verify.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="picks the checkpoint in a run dir (default: the sparsity the artifact records)",
    )
    verify.add_argument("--text", default=None, help="a text file for the text window (default: embedded text)")
    verify.add_argument("--loader", choices=["auto", "official", "builtin"], default="auto")
    _add_env(verify)
    _add_output_flags(verify)

    info = commands.add_parser("info", help="describe checkpoints, .bin files and export dirs")
    info.add_argument("paths", nargs="+")
    info.add_argument("--base_model", "--base-model", dest="base_model", default=None)
    info.add_argument("--env", default=None, help="read seed-format .bin files through this env's server")
    _add_output_flags(info)

    upgrade = commands.add_parser("upgrade", help="turn a .bin made the seed's way into a portable one")
    upgrade.add_argument("source")
    upgrade.add_argument("output")
    upgrade.add_argument("--overwrite", action="store_true")
    upgrade.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle SOURCE (this runs code from the file): only for a file you trust",
    )
    _add_env(upgrade)
    _add_output_flags(upgrade)

    demo = commands.add_parser("demo", help="the main job on a small embedded model")
    _add_env(demo)
    demo.add_argument("--workdir", default=None, help="where the demo's models go (default: a temp dir)")
    demo.add_argument(
        "--preset",
        default="small",
        choices=["tiny", "small", "1b"],
        help="size of the demo model (default: small, ~10M parameters)",
    )
    return parser


def _add_slice_parser(commands) -> None:
    """``slicebridge slice``: experiments/run_slicegpt.py's flags (same names and defaults), then ours."""
    job = commands.add_parser("slice", help="slice a dense model at each sparsity (run_slicegpt's flags)")
    job.add_argument("--model-path", required=True, help="the dense Hugging Face model directory")
    job.add_argument(
        "--model", default=None, help="the model name the official adapter is given and files are named by"
    )
    job.add_argument("--save-dir", required=True, help="where {name}_{sparsity}.pt / .json go, created if missing")
    job.add_argument(
        "--sparsity", type=float, nargs="+", action="extend", required=True, help="one or more, each in (0, 1)"
    )
    job.add_argument(
        "--cal-dataset",
        choices=["wikitext2", "ptb", "c4", "alpaca"],
        default=None,
        help="calibrate on this dataset (slicegpt's data_utils) instead of --calibration",
    )
    job.add_argument("--cal-nsamples", type=int, default=128)
    job.add_argument("--cal-batch-size", type=int, default=16)
    job.add_argument("--cal-max-seqlen", type=int, default=2048)
    job.add_argument("--varied-seqlen", action="store_true")
    job.add_argument("--seed", type=int, default=42)
    job.add_argument("--round-interval", type=int, default=8)
    job.add_argument("--final-orientation", choices=["random", "pca"], default="random")
    job.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16")
    job.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (in the server)")
    job.add_argument("--distribute-model", action="store_true", help="spread the model over every GPU (accelerate)")
    job.add_argument("--ppl-eval-seqlen", type=int, default=2048)
    job.add_argument("--ppl-eval-batch-size", type=int, default=8)
    job.add_argument("--calibration", default=None, help="a local .txt / .jsonl file or a directory of them")
    job.add_argument("--held-out", type=float, default=0.1, help="of --calibration's examples, kept for perplexity")
    job.add_argument("--no-ppl", action="store_true", help="skip the perplexities")
    job.add_argument("--slicer", choices=["auto", "official", "builtin"], default="auto")
    job.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    job.add_argument("--overwrite-flag", default="--overwrite", help=argparse.SUPPRESS)  # make: OVERWRITE=1
    job.add_argument("--convert", action="store_true", help="also write {name}_{sparsity}.bin")
    job.add_argument("--export", action="store_true", help="also write {name}_{sparsity}/ (Hugging Face dir)")
    job.add_argument("--verify", action="store_true", help="verify every artifact here (alone, it implies --convert)")
    pools = job.add_mutually_exclusive_group()
    _add_devices(pools, "each slices a share of the sparsities, loading the dense model once")
    pools.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS|auto|local",
        help="slice on a Ray cluster (auto: the one Ray finds; local: a private one for this run), one warm "
        "server per GPU of each node, each slicing a share of the sparsities; paths must be on storage every "
        "node shares",
    )
    _add_env(job)
    _add_output_flags(job)


def _add_devices(parser: argparse.ArgumentParser | argparse._MutuallyExclusiveGroup, spread: str) -> None:
    parser.add_argument(
        "--devices",
        default=None,
        help=f"one warm server per device (cuda:0,cuda:1 | all | cpu,cpu | cuda:0+cuda:1,cuda:2+cuda:3): {spread}; "
        "without it, one server (on CPU, more servers help only when cores allow)",
    )


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")


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
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        print("slicebridge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `slicebridge info ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # as a shell reports a command killed by SIGPIPE


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
            print(
                f"server {what}: pid {server.pid}, {info['endpoint']}\n"
                f"  env {info['env']} ({info['python']})\n  connection file {server.conn_path}\n"
                f"  log {info['log_path']}"
            )
        return 0
    if args.server_command == "status":
        found = servers.status(args.env)
        if args.json:
            _print_json([dataclasses.asdict(s) for s in found])
            return 0
        if not found:
            print("no detached slicebridge server is running")
        for s in found:
            extra = (
                f", up {s.uptime_s:.0f}s, {'busy' if s.busy else 'idle'}, {s.queued} queued, "
                f"{s.counters.get('requests', 0)} requests"
                if s.state == "running"
                else ""
            )
            print(f"{s.state}: pid {s.pid} env {s.env} ({s.python}) at {s.endpoint}{extra}")
        return 0
    # stop
    if args.all:
        stopped = servers.stop_all()
        for item in stopped:
            print(f"stopped: pid {item.pid} env {item.env}")
        if not stopped:
            print("no detached slicebridge server is running")
        return 0
    item = servers.stop(
        env=args.env or (None if args.connection_file else default_env()), connection_file=args.connection_file
    )
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


def _progress(args, label: str):
    from slicebridge.client.progress import ProgressPrinter

    return ProgressPrinter(label, quiet=args.quiet or args.json)


# What a convert / export job needs of the command line, as plain data (a pool's item carries it).
_JOB_OPTIONS = ("command", "base_model", "sparsity", "round_interval", "loader", "dtype", "overwrite", "overwrite_flag")


def cmd_job(args) -> int:
    """convert / export: one or many checkpoints through one warm server, or (--devices, --ray) a pool of them."""
    from slicebridge import client
    from slicebridge.client.batch import expand_checkpoints, rows_as_dicts, run_batch, run_batch_on, summary_table
    from slicebridge.model.atomic import resolve

    specs = list(args.slicegpt_model) + list(args.checkpoints)
    if not specs:
        raise UsageError(f"{args.command}: name at least one checkpoint (or --slicegpt_model)")
    pool = _job_pool(args)
    checkpoints = expand_checkpoints(specs, args.sparsity)
    outputs = _planned_outputs(args, checkpoints)
    options = {name: getattr(args, name) for name in _JOB_OPTIONS} | {"verify": args.verify}
    if args.base_model is not None:  # absolute here: a Ray node's working directory is not this one
        options["base_model"] = str(resolve(args.base_model, follow_final=False))
    if pool is not None:
        with pool:  # every server starts now, or the command fails
            rows = run_batch_on(pool, checkpoints, outputs, pooled_job, options, _row_lines(args, len(checkpoints)))
    else:
        client.bridge_for(args.env)  # a missing env or a server that cannot start fails the command now

        def one(checkpoint, output):
            progress = _progress(args, checkpoint.name)
            try:  # bridge_for: a fresh server if the last one died
                return job_row(client.bridge_for(args.env), options, checkpoint, output, args.device, progress)
            finally:
                progress.close()

        rows = run_batch(checkpoints, outputs, one)
    if args.json:
        _print_json(rows_as_dicts(rows))
    else:
        print(summary_table(rows))
    return 0 if all(r.ok for r in rows) else 1


def job_row(bridge, options: dict, checkpoint, output, device: str, progress=None, verify_device: str = "auto"):
    """One convert / export (``options``: ``_JOB_OPTIONS`` and verify) and its verification on the same
    bridge, as the summary's ``BatchRow``."""
    from slicebridge.client.batch import BatchRow

    result = _run_job(bridge, options, checkpoint, output, device, progress)
    row = BatchRow(
        str(checkpoint),
        result.output,
        actual_ratio=result.actual_ratio,
        loader=result.loader,
        cache_hit=result.cache_hit,
        family=result.family,
        official_name=result.official_name,
    )
    if options["verify"]:
        report = bridge.verify(
            result.output,
            checkpoint,
            base_model=options["base_model"],
            sparsity=options["sparsity"],
            round_interval=options["round_interval"],
            device=verify_device,
            on_event=progress,
        )
        row.verify = "pass" if report.passed else "FAIL"
        if not report.passed:
            row.error = "; ".join(report.failures)
    return row


def pooled_job(bridge, device: str, payload: dict):
    """``job_row`` as a pool's job (``batch.run_batch_on``'s payload); the server computes on the member's device."""
    return job_row(bridge, payload, payload["checkpoint"], payload["output"], device, verify_device=device)


def _run_job(bridge, options: dict, checkpoint, output, device: str, progress):
    """One convert / export; an existing output is reported with the flag that replaces it where the
    command came from (``OVERWRITE=1`` under make, which passes ``--overwrite-flag``)."""
    from slicebridge.model.atomic import OutputExists

    try:
        return getattr(bridge, options["command"])(
            checkpoint,
            output,
            base_model=options["base_model"],
            sparsity=options["sparsity"],
            round_interval=options["round_interval"],
            loader=options["loader"],
            device=device,
            dtype=options["dtype"],
            overwrite=options["overwrite"],
            on_event=progress,
        )
    except OutputExists:
        raise OutputExists(f"{output} already exists; pass {options['overwrite_flag']} to replace it") from None


def _devices(args) -> list[str] | str | None:
    """``--devices`` as a pool's devices (None without it); then ``--device`` stays auto."""
    if args.devices is None:
        return None
    from slicebridge.client.pool import PoolError, parse_devices

    if args.device != "auto":
        raise UsageError(f"--device {args.device} and --devices {args.devices}: give one of them")
    try:
        return parse_devices(args.devices)
    except PoolError as exc:
        raise UsageError(f"--devices {args.devices}: {exc}") from None


def _job_pool(args):
    """The pool a convert / export runs on, not yet started: ``--devices``' servers here, or ``--ray``'s on a
    Ray cluster (``RayPool``); None without either (argparse refuses both)."""
    from slicebridge import client

    devices = _devices(args)
    if args.ray is None:
        return None if devices is None else client.pool(args.env, devices=devices)
    if args.device != "auto":
        raise UsageError(
            f"--device {args.device} and --ray {args.ray}: give one of them (on Ray, each GPU is a server)"
        )
    return client.pool(args.env, ray=args.ray)


def _row_lines(args, total: int):
    """A pool's progress: one line on stderr per checkpoint done (None with --quiet or --json)."""
    if args.quiet or args.json:
        return None
    done = []

    def line(row) -> None:
        done.append(row)
        name, verdict = os.path.basename(row.checkpoint), "ok" if row.ok else "FAILED"
        print(f"[{len(done)}/{total}] {name}: {verdict} on {row.member} in {row.seconds:.2f}s", file=sys.stderr)

    return line


def cmd_slice(args) -> int:
    """slice: one sweep through the env's warm server, or (--devices, --ray) split over a pool of them; the
    summary table (or JSON), exit 1 unless all went well."""
    from slicebridge import client
    from slicebridge.client.slicing import SweepIncomplete
    from slicebridge.model.atomic import OutputExists

    pool = _job_pool(args)
    options = dict(
        cal_dataset=args.cal_dataset,
        cal_nsamples=args.cal_nsamples,
        cal_batch_size=args.cal_batch_size,
        cal_max_seqlen=args.cal_max_seqlen,
        varied_seqlen=args.varied_seqlen,
        seed=args.seed,
        round_interval=args.round_interval,
        final_orientation=args.final_orientation,
        model_name=args.model,
        slicer=args.slicer,
        dtype=args.dtype,
        distribute_model=args.distribute_model,
        eval_ppl=not args.no_ppl,
        ppl_eval_seqlen=args.ppl_eval_seqlen,
        ppl_eval_batch_size=args.ppl_eval_batch_size,
        held_out=args.held_out,
        overwrite=args.overwrite,
        convert=args.convert,
        export=args.export,
        verify=args.verify,
    )
    progress = _progress(args, "slice")
    try:
        if pool is None:
            sweep = client.slice(
                args.model_path,
                args.sparsity,
                args.calibration,
                args.save_dir,
                env=args.env,
                device=args.device,
                on_event=progress,
                **options,
            )
        else:
            sweep = _slice_on_pool(args, pool, options)
    except SweepIncomplete as exc:
        sweep = exc.sweep
        print(f"slicebridge: error: {exc}", file=sys.stderr)
    except OutputExists as exc:  # named with the flag that replaces it where the command came from
        raise OutputExists(str(exc).replace("overwrite=True (--overwrite)", args.overwrite_flag)) from None
    finally:
        progress.close()
    if args.json:
        _print_json(sweep.as_dict())
    else:
        print(sweep.table())
    return 0 if sweep.ok else 1


def _slice_on_pool(args, pool, options: dict):
    """The sweep split over a pool of servers, here or on Ray (one line on stderr per share done)."""
    from slicebridge.client.slicing import slice_on_pool

    def share_line(share: list[float], result) -> None:
        if not (args.quiet or args.json):
            verdict = "done" if result.ok else f"FAILED ({result.error})"
            sparsities = ", ".join(f"{sparsity:g}" for sparsity in share)
            print(f"[slice] {sparsities} on {result.member}: {verdict} in {result.seconds:.2f}s", file=sys.stderr)

    try:  # the servers start once the sweep's arguments are found sound
        return slice_on_pool(
            pool, args.model_path, args.sparsity, args.calibration, args.save_dir, on_share=share_line, **options
        )
    finally:
        pool.close()


def _planned_outputs(args, checkpoints) -> list:
    """Every output of the job, before any work (``batch.outputs_for`` names apart or refuses outputs
    that would coincide). ``--output D/`` (a trailing slash) is a directory, as ``--output-dir`` is;
    either is made like ``mkdir -p``."""
    from slicebridge.client.batch import outputs_for
    from slicebridge.model.atomic import make_directories

    output, output_dir = args.output, args.output_dir
    if output is not None and output.endswith(("/", os.sep)):
        if output_dir is not None:
            raise UsageError(f"--output {output} names a directory and --output-dir another; give one of them")
        output, output_dir = None, output
    if output is not None and len(checkpoints) > 1:
        raise UsageError(f"--output names one file, but {len(checkpoints)} checkpoints were given; use --output-dir")
    outputs = outputs_for(
        checkpoints,
        output,
        output_dir,
        ".bin" if args.command == "convert" else "",
        base_model=getattr(args, "base_model", None),
    )
    if output_dir is not None:
        make_directories(output_dir)
    return outputs


def cmd_verify(args) -> int:
    from slicebridge import client

    text = None
    if args.text:
        try:
            text = open(args.text, encoding="utf-8").read()
        except OSError as exc:
            raise UsageError(f"cannot read the text file {args.text}: {exc.strerror}") from None
    progress = _progress(args, "verify")
    try:
        report = client.verify(
            args.artifact,
            args.checkpoint,
            args.base_model,
            env=args.env,
            text=text,
            sparsity=args.sparsity,
            loader=args.loader,
            on_event=progress,
        )
    finally:
        progress.close()
    print(report.to_json() if args.json else report.table())
    return 0 if report.passed else 1


def cmd_info(args) -> int:
    from slicebridge import client
    from slicebridge.client.artifact_info import info_targets

    reports, failed = [], False
    for path in [target for given in args.paths for target in info_targets(given)]:
        try:
            reports.append(client.info(path, args.base_model, env=args.env))
        except SlicebridgeError as exc:  # this path is reported; the others are still described
            failed = True
            print(f"slicebridge: error: {path}: {exc}", file=sys.stderr)
    if args.json:
        _print_json([r.as_dict() for r in reports])
    else:
        print("\n\n".join(r.table() for r in reports))
    return 1 if failed else 0


def cmd_upgrade(args) -> int:
    from slicebridge import client

    progress = _progress(args, "upgrade")
    try:
        result = client.upgrade(
            args.source,
            args.output,
            env=args.env,
            overwrite=args.overwrite,
            trust_pickle=args.trust_pickle,
            on_event=progress,
        )
    finally:
        progress.close()
    if args.json:
        _print_json(dataclasses.asdict(result))
    else:
        print(
            f"upgraded {args.source} -> {result.output} ({result.bytes / 1e6:.1f} MB, "
            f"actual ratio {result.actual_ratio:.4f}); load it anywhere with slicebridge.load()"
        )
    return 0


def cmd_demo(args) -> int:
    from slicebridge.client.demo import run_demo

    return run_demo(args.env, workdir=args.workdir, preset=args.preset)


class UsageError(SlicebridgeError):
    """The command line asks for something that cannot be done."""


COMMANDS = {
    "server": cmd_server,
    "doctor": cmd_doctor,
    "hello": cmd_hello,
    "demo": cmd_demo,
    "convert": cmd_job,
    "export": cmd_job,
    "slice": cmd_slice,
    "verify": cmd_verify,
    "info": cmd_info,
    "upgrade": cmd_upgrade,
}

if __name__ == "__main__":
    # Run as the module's own name, not __main__: a job sent to Ray nodes (pooled_job) must be importable there.
    from slicebridge.client.cli import main as module_main

    sys.exit(module_main())
