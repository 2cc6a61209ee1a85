"""export the ~1B model to a Hugging Face directory, against safetensors.save_file of the same tensors.

Baseline: a fresh process of the slicegpt env loads the checkpoint memory-mapped (as the server
does) and times ``safetensors.torch.save_file`` of its tensors to the same disk; it then times an
fsync of the file (the export is atomic, which includes an fsync of every file).

Bridge: the run's warm server; the model is in its warm cache (a first export, a cache miss, is
reported separately), so a timed export is the write of the directory: safetensors, config, remote
code, tokenizer, provenance and model card, then the pickle scan, fsync and rename.
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
    dir_bytes,
    drop_file,
    fmt_seconds,
    last_json,
    ratio_of_minimums,
    ratio_summary,
    read_through,
    run_python,
    summary,
)
from models import model_set

NAME = "export_1b"
SPARSITY = 0.25

BASELINE_SCRIPT = r"""
import json, os, resource, sys, time
import torch
from safetensors.torch import save_file
pt, out, tries, idle = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
state = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
runs = []
for i in range(tries + (1 if idle else 0)):
    if i == tries:
        time.sleep(idle)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    save_file(state, out, metadata={"format": "pt"})
    t1 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    t2 = time.perf_counter()
    os.unlink(out)
    runs.append({"save": t1 - t0, "fsync": t2 - t1, "user": r1.ru_utime - r0.ru_utime,
                 "system": r1.ru_stime - r0.ru_stime})
print(json.dumps(runs))
"""

TRIES = 3  # back-to-back writes per repeat, on each side
IDLE_S = 8.0  # once: a write after this long without one, on each side


def run(ctx: Context) -> list[Row]:
    reps = ctx.reps(3, smoke=1)
    tries = 2 if ctx.smoke else TRIES
    idle = 0.0 if ctx.smoke else IDLE_S
    models = model_set(ctx.cache_dir, ctx.big_preset, [SPARSITY], log=ctx.log)
    ckpt = models.checkpoint(SPARSITY)
    out_dir = ctx.scratch(NAME)
    read_through(ckpt)
    bridge = ctx.bridge()
    pid = bridge.server.pid

    started = time.perf_counter()
    first = bridge.export(ckpt, out_dir / "first-hf", overwrite=True)
    first_seconds = time.perf_counter() - started
    drop_file(out_dir / "first-hf")

    def export_once() -> dict:
        started = time.perf_counter()
        with CpuDelta(pid) as used:
            result = bridge.export(ckpt, out_dir / "bridge-hf", overwrite=True)
        seconds = time.perf_counter() - started
        assert result.cache_hit
        nbytes = dir_bytes(out_dir / "bridge-hf")
        drop_file(out_dir / "bridge-hf")
        return {
            "seconds": seconds,
            "user": used.user,
            "system": used.system,
            "timings": result.timings,
            "bytes": nbytes,
        }

    base_runs, bridge_runs, idle_runs = [], [], {}
    profile = {}
    for rep in range(reps):
        rep_idle = idle if rep == 0 else 0.0
        _, out = run_python(
            ctx.env_python, BASELINE_SCRIPT, str(ckpt), str(out_dir / "baseline.safetensors"), str(tries), str(rep_idle)
        )
        runs = last_json(out)
        if rep_idle:
            idle_runs["baseline"] = runs.pop()
        base_runs.append(runs)
        runs = []
        for i in range(tries):
            if ctx.profile and rep == 0 and i == tries - 1:
                with PySpy(pid, out_dir / "export.pyspy.txt", rate=200) as spy:
                    runs.append(export_once())
                profile = spy.top(thread="slicebridge-worker")
            else:
                runs.append(export_once())
        bridge_runs.append(runs)
        if rep_idle:
            time.sleep(rep_idle)
            idle_runs["bridge"] = export_once()
        ctx.log(
            f"   rep {rep + 1}/{reps}: save_file "
            + ", ".join(f"{r['save']:.2f}s" for r in base_runs[-1])
            + " back-to-back (sys "
            + ", ".join(f"{r['system']:.2f}" for r in base_runs[-1])
            + "); bridge export "
            + ", ".join(f"{r['seconds']:.2f}s" for r in runs)
            + " (server sys "
            + ", ".join(f"{r['system']:.2f}" for r in runs)
            + ")"
        )
    drop_file(out_dir)
    if idle_runs:
        ctx.log(
            f"   after {idle:.0f}s idle: save_file {idle_runs['baseline']['save']:.2f}s "
            f"(sys {idle_runs['baseline']['system']:.2f}s), bridge export {idle_runs['bridge']['seconds']:.2f}s "
            f"(server sys {idle_runs['bridge']['system']:.2f}s)"
        )

    med = lambda xs: summary(xs)["median"]  # noqa: E731
    best = lambda runs, key: min(r[key] for r in runs)  # noqa: E731
    subject = [best(runs, "seconds") for runs in bridge_runs]
    baseline = [best(runs, "save") for runs in base_runs]
    first_subject = [runs[0]["seconds"] for runs in bridge_runs]
    first_baseline = [runs[0]["save"] for runs in base_runs]
    best_bridge = [min(runs, key=lambda r: r["seconds"]) for runs in bridge_runs]
    best_base = [min(runs, key=lambda r: r["save"]) for runs in base_runs]
    export_bytes = bridge_runs[0][0]["bytes"]
    row = Row(
        bench=NAME,
        name=NAME,
        what=f"export the {ctx.big_preset} model to an HF directory ({export_bytes / MB:,.0f} MB), warm cache; "
        f"best of {tries} back-to-back exports per repeat",
        baseline=f"safetensors.torch.save_file of the same tensors (mmap-loaded), same disk, best of {tries} "
        "back-to-back in a fresh process",
        unit="s",
        subject=summary(subject),
        baseline_measured=summary(baseline),
        ratio={**ratio_summary(subject, baseline), "definition": "bridge time / baseline time"},
        target={"text": "≤ 1.3× baseline", "metric": "ratio", "op": "<=", "value": 1.3},
        absolute={
            "export_bytes": export_bytes,
            "first_export_cache_miss_s": first_seconds,
            "first_export_server_timings_s": first.timings,
            "first_of_each_repeat_bridge_s": summary(first_subject),
            "first_of_each_repeat_baseline_s": summary(first_baseline),
            "ratio_first_of_each_repeat": med(first_subject) / med(first_baseline),
            "baseline_fsync_s": summary([r["fsync"] for r in best_base]),
            "ratio_against_baseline_plus_fsync": med(subject) / med([r["save"] + r["fsync"] for r in best_base]),
            "ratio_of_minimums": ratio_of_minimums(subject, baseline),
            **(
                {
                    f"after_{idle:.0f}s_idle_bridge_s": idle_runs["bridge"]["seconds"],
                    f"after_{idle:.0f}s_idle_baseline_s": idle_runs["baseline"]["save"],
                }
                if idle_runs
                else {}
            ),
        },
        breakdown={
            "server_timings_s": {k: med([r["timings"][k] for r in best_bridge]) for k in first.timings},
            "server_cpu_user_s": summary([r["user"] for r in best_bridge]),
            "server_cpu_system_s": summary([r["system"] for r in best_bridge]),
            "baseline_cpu_user_s": summary([r["user"] for r in best_base]),
            "baseline_cpu_system_s": summary([r["system"] for r in best_base]),
            "all_runs_bridge_s": [[round(r["seconds"], 3) for r in runs] for runs in bridge_runs],
            "all_runs_bridge_server_system_s": [[round(r["system"], 3) for r in runs] for runs in bridge_runs],
            "all_runs_baseline_s": [[round(r["save"], 3) for r in runs] for runs in base_runs],
            "all_runs_baseline_system_s": [[round(r["system"], 3) for r in runs] for runs in base_runs],
            **({"idle_runs": idle_runs} if idle_runs else {}),
            **({"pyspy_server": profile} if profile else {}),
        },
    ).judge()
    t = row.breakdown["server_timings_s"]
    row.analysis += [
        f"best export {fmt_seconds(med(subject))} at the client, {fmt_seconds(t['total'])} in the server "
        f"(user {fmt_seconds(med([r['user'] for r in best_bridge]))}, system "
        f"{fmt_seconds(med([r['system'] for r in best_bridge]))}); best save_file "
        f"{fmt_seconds(med(baseline))} (system {fmt_seconds(med([r['system'] for r in best_base]))}), and an "
        f"fsync of its file {fmt_seconds(med([r['fsync'] for r in best_base]))}, which the export also does "
        "(atomic publish): against save_file+fsync the ratio is "
        f"{row.absolute['ratio_against_baseline_plus_fsync']:.2f}×. So the export is bounded by its durable "
        f"write: the fsync alone is {med([r['fsync'] for r in best_base]) / med(baseline):.1f}× save_file, more "
        "than the 0.3× the target leaves; everything else it does (config, remote code, tokenizer, model card, "
        "pickle scan, rename) is in the few per cent left. Dropping the fsync (no crash-durability) would meet "
        "it; starting writeback during the write (sync_file_range after each tensor) would overlap part of it.",
        f"the first write of each repeat: export {fmt_seconds(med(first_subject))}, save_file "
        f"{fmt_seconds(med(first_baseline))} ({row.absolute['ratio_first_of_each_repeat']:.2f}×). On this VM "
        "the time of a 1.8 GB write is mostly system time and depends on the machine's memory history, not on "
        "the writer: it is fast when the kernel reuses pages freed moments ago and several times slower when "
        "they have gone idle (the VM runs a DAMON pageout scheme and a virtio balloon with free page "
        "reporting, the likely cause)"
        + (
            f"; the same export after {idle:.0f}s idle took {fmt_seconds(idle_runs['bridge']['seconds'])} (server "
            f"system {fmt_seconds(idle_runs['bridge']['system'])}), save_file after {idle:.0f}s idle "
            f"{fmt_seconds(idle_runs['baseline']['save'])} (system {fmt_seconds(idle_runs['baseline']['system'])})"
            if idle_runs
            else ""
        )
        + ". Hence best-of-back-to-back on both sides is what the target is judged on.",
    ]
    if profile:
        row.analysis.append("py-spy (server, self time, one export): " + busy_frames(profile, 6, "self"))
    return [row]
