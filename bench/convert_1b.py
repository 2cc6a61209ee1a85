"""convert the ~1B model: time against a plain torch.load + torch.save, and the server's peak memory.

Baseline: a fresh process of the slicegpt env does ``torch.load`` of the ``.pt`` and ``torch.save``
of the same tensors to the same disk; only those two calls are timed (not the interpreter start or
the imports). It also reports how long an ``fsync`` of what it wrote then takes (the bridge writes
atomically, which includes an fsync) and its own peak RSS.

Bridge: for every repeat a FRESH server (so that its VmHWM is that of this convert alone) is
started, warmed up with a convert of the tiny model (imports), and then converts the ~1B checkpoint
(a cache miss); the client times the request. The server's VmRSS after start-up, after the warm-up
and its VmHWM after the convert are read from /proc/<pid>/status, and ``cache_info()`` is compared
with its RSS (the memory held by the warm cache).
"""

from __future__ import annotations

import time

from common import (
    MB,
    Context,
    CpuDelta,
    PySpy,
    Row,
    busy_frames,
    drop_file,
    fmt_seconds,
    last_json,
    proc_status,
    ratio_of_minimums,
    ratio_summary,
    read_through,
    run_python,
    summary,
)
from models import model_set

NAME = "convert_1b"
SPARSITY = 0.25

BASELINE_SCRIPT = r"""
import json, os, resource, sys, time
import torch
pt, out = sys.argv[1:3]
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
state = torch.load(pt, map_location="cpu", weights_only=True)
t1 = time.perf_counter()
torch.save(state, out)
t2 = time.perf_counter()
r1 = resource.getrusage(resource.RUSAGE_SELF)
fd = os.open(out, os.O_RDONLY)
os.fsync(fd)
os.close(fd)
t3 = time.perf_counter()
hwm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(json.dumps({"load": t1 - t0, "save": t2 - t1, "fsync": t3 - t2, "hwm": hwm,
                  "user": r1.ru_utime - r0.ru_utime, "system": r1.ru_stime - r0.ru_stime}))
"""


def run(ctx: Context) -> list[Row]:
    from slicebridge import Bridge

    reps = ctx.reps(5, smoke=1)
    models = model_set(ctx.cache_dir, ctx.big_preset, [SPARSITY], log=ctx.log)
    tiny = model_set(ctx.cache_dir, "tiny", [SPARSITY], log=ctx.log)
    ckpt = models.checkpoint(SPARSITY)
    ckpt_bytes = ckpt.stat().st_size
    out_dir = ctx.scratch(NAME)
    read_through(ckpt)  # both sides then read it from the page cache

    baseline, baseline_fsync, baseline_hwm, subject, cpu, baseline_cpu = [], [], [], [], [], []
    rss_started, rss_warm, hwm, rss_after, anon_after, file_after, cache_used, timings = [], [], [], [], [], [], [], []
    profile = {}
    for rep in range(reps):
        _, out = run_python(ctx.env_python, BASELINE_SCRIPT, str(ckpt), str(out_dir / "baseline.pt"))
        b = last_json(out)
        baseline.append(b["load"] + b["save"])
        baseline_fsync.append(b["fsync"])
        baseline_hwm.append(b["hwm"])
        baseline_cpu.append((b["user"], b["system"]))
        drop_file(out_dir / "baseline.pt")

        with Bridge(env=str(ctx.env_prefix), attach=False) as bridge:
            pid = bridge.server.pid
            rss_started.append(proc_status(pid)["VmRSS"])
            bridge.convert(tiny.checkpoint(SPARSITY), out_dir / "warmup.bin", overwrite=True)
            rss_warm.append(proc_status(pid)["VmRSS"])
            spy = PySpy(pid, out_dir / "convert.pyspy.txt", rate=200) if (ctx.profile and rep == 0) else None
            started = time.perf_counter()
            with CpuDelta(pid) as used:
                if spy:
                    with spy:
                        result = bridge.convert(ckpt, out_dir / "bridge.bin", overwrite=True)
                    profile = spy.top(thread="slicebridge-worker")
                else:
                    result = bridge.convert(ckpt, out_dir / "bridge.bin", overwrite=True)
            subject.append(time.perf_counter() - started)
            cpu.append((used.user, used.system))
            status = proc_status(pid)
            hwm.append(status["VmHWM"])
            rss_after.append(status["VmRSS"])
            anon_after.append(status["RssAnon"])
            file_after.append(status["RssFile"])
            cache_used.append(bridge.cache_info().used_bytes)
            timings.append(result.timings)
            out_bytes = (out_dir / "bridge.bin").stat().st_size
        drop_file(out_dir / "bridge.bin")
        ctx.log(
            f"   rep {rep + 1}/{reps}: baseline {baseline[-1]:.2f}s (+fsync {baseline_fsync[-1]:.2f}s), "
            f"bridge {subject[-1]:.2f}s (load {timings[-1]['load']:.2f}s, save {timings[-1]['save']:.2f}s), "
            f"server VmHWM {hwm[-1] / MB:.0f} MB"
        )
    drop_file(out_dir)

    med = lambda xs: summary(xs)["median"]  # noqa: E731
    preset = ctx.big_preset
    time_row = Row(
        bench=NAME,
        name=NAME,
        what=f"convert the {preset} model ({ckpt_bytes / MB:,.0f} MB fp16 checkpoint, sparsity {SPARSITY}), "
        "fresh warm server, cache miss",
        baseline="torch.load + torch.save of the same tensors, same disk, fresh slicegpt-env process "
        "(the two calls timed)",
        unit="s",
        subject=summary(subject),
        baseline_measured=summary(baseline),
        ratio={**ratio_summary(subject, baseline), "definition": "bridge time / baseline time"},
        target={"text": "≤ 1.3× baseline", "metric": "ratio", "op": "<=", "value": 1.3},
        absolute={
            "checkpoint_bytes": ckpt_bytes,
            "bin_bytes": out_bytes,
            "baseline_fsync_s": summary(baseline_fsync),
            "ratio_against_baseline_plus_fsync": med(subject) / (med(baseline) + med(baseline_fsync)),
            "ratio_of_minimums": ratio_of_minimums(subject, baseline),
        },
        breakdown={
            "server_timings_s": {k: med([t[k] for t in timings]) for k in timings[0]},
            "server_cpu_user_s": summary([c[0] for c in cpu]),
            "server_cpu_system_s": summary([c[1] for c in cpu]),
            "baseline_cpu_user_s": summary([c[0] for c in baseline_cpu]),
            "baseline_cpu_system_s": summary([c[1] for c in baseline_cpu]),
            "baseline_load_save_s": med(baseline),
            "baseline_fsync_s": med(baseline_fsync),
            **({"pyspy_server": profile} if profile else {}),
        },
    ).judge()
    if timings:
        t = time_row.breakdown["server_timings_s"]
        fs = med(baseline_fsync)
        other = med(subject) - t["total"]
        time_row.analysis += [
            f"server: load (mmap torch.load, checks, model build) {fmt_seconds(t['load'])}, save (torch.save of "
            f"the recipe dict with dill, then fsync + rename) {fmt_seconds(t['save'])}; request overhead outside "
            f"the handler {fmt_seconds(other)}. The server process spent "
            f"{fmt_seconds(med([c[0] for c in cpu]))} user and {fmt_seconds(med([c[1] for c in cpu]))} system "
            f"time; the baseline {fmt_seconds(med([c[0] for c in baseline_cpu]))} user and "
            f"{fmt_seconds(med([c[1] for c in baseline_cpu]))} system.",
            f"the bridge fsyncs the .bin before renaming it into place (atomic write); the same fsync after the "
            f"baseline's torch.save takes {fmt_seconds(fs)}. Against load+save+fsync the ratio is "
            f"{time_row.absolute['ratio_against_baseline_plus_fsync']:.2f}×; best run against best run "
            f"{time_row.absolute['ratio_of_minimums']:.2f}×.",
        ]
        if profile:
            time_row.analysis.append("py-spy (server, self time): " + busy_frames(profile, 6, "self"))

    rss_row = Row(
        bench=NAME,
        name=f"{NAME}_peak_rss",
        what=f"peak RSS (VmHWM) of a fresh server converting the {preset} model",
        baseline=f"the checkpoint's size ({ckpt_bytes / MB:,.0f} MB)",
        unit="B",
        subject=summary(hwm),
        baseline_measured=summary([ckpt_bytes] * len(hwm)),
        ratio={**ratio_summary(hwm, [ckpt_bytes] * len(hwm)), "definition": "server VmHWM / checkpoint bytes"},
        target={"text": "≤ 1.5× checkpoint size", "metric": "ratio", "op": "<=", "value": 1.5},
        absolute={
            "rss_after_start_B": summary(rss_started),
            "rss_after_warmup_B": summary(rss_warm),
            "rss_after_convert_B": summary(rss_after),
            "rss_anon_after_B": summary(anon_after),
            "rss_file_after_B": summary(file_after),
            "baseline_process_vmhwm_B": summary(baseline_hwm),
        },
    ).judge()
    if hwm:
        rss_row.analysis.append(
            f"start-up RSS (python, torch, transformers imported) is {med(rss_started) / MB:.0f} MB and "
            f"{med(rss_warm) / MB:.0f} MB after a first convert; after the convert RssAnon is "
            f"{med(anon_after) / MB:.0f} MB and RssFile (the mmap'd checkpoint) {med(file_after) / MB:.0f} MB. "
            f"A plain torch.load+torch.save process peaks at {med(baseline_hwm) / MB:.0f} MB."
        )

    cache_row = Row(
        bench=NAME,
        name="cache_memory",
        what=f"memory held by the warm cache after the {preset} convert",
        baseline="cache_info().used_bytes (the cached model's tensor bytes)",
        unit="B",
        subject=summary(rss_after),
        baseline_measured=summary(cache_used),
        ratio={**ratio_summary(rss_after, cache_used), "definition": "server VmRSS / cache used_bytes"},
        target={"text": "report", "metric": "ratio", "op": None, "value": None},
        absolute={
            "rss_anon_B": summary(anon_after),
            "rss_file_B": summary(file_after),
            "rss_after_start_B": summary(rss_started),
        },
        notes=[
            "RssFile counts the cached model's mmap-backed tensors (the checkpoint's page-cache pages "
            "mapped into the server); RssAnon is the interpreter, torch/transformers and any copies."
        ],
    ).judge()
    return [time_row, rss_row, cache_row]
