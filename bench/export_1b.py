"""export the ~1B model to a Hugging Face directory, against safetensors.save_file of the same tensors.

Baseline: a fresh process of the slicegpt env loads the checkpoint memory-mapped (as the server
does) and times ``safetensors.torch.save_file`` of its tensors to the same disk; it then times an
fsync of the file (the export is atomic, which includes an fsync of every file).

Bridge: the run's warm server; the model is in its warm cache (a first export, a cache miss, is
reported separately), so a timed export is the write of the directory: safetensors, config, remote
code, tokenizer, provenance and model card, then the pickle scan, fsync and rename.

Bound (``common.disk_bound``, right after each export, once it is removed): the checkpoint's bytes
(the tensors the export holds; its small files add well under 0.1 %) in one stream of ``os.write`` into
one new file, then one fsync; the checkpoint is in the page cache, so no side reads the disk. The peer
baseline (save_file without an fsync) is kept; save_file + fsync, the fair peer of a durable write, is
reported beside it.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

from common import (
    MB,
    Context,
    CpuDelta,
    PySpy,
    Row,
    busy_frames,
    dir_bytes,
    disk_bound,
    drop_file,
    fmt_seconds,
    last_json,
    ratio_of_minimums,
    ratio_summary,
    read_through,
    run_python,
    summary,
)
from convert_1b import BOUND_RATIO
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

    export_once = functools.partial(_export_once, bridge, ckpt, out_dir)

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
        ctx.log(_rep_line(rep, reps, base_runs[-1], runs))
    drop_file(out_dir)
    if idle_runs:
        ctx.log(
            f"   after {idle:.0f}s idle: save_file {idle_runs['baseline']['save']:.2f}s "
            f"(sys {idle_runs['baseline']['system']:.2f}s), bridge export {idle_runs['bridge']['seconds']:.2f}s "
            f"(server sys {idle_runs['bridge']['system']:.2f}s)"
        )
    return [_row(ctx, base_runs, bridge_runs, idle_runs, first, first_seconds, profile, tries, idle)]


def _export_once(bridge, ckpt: Path, out_dir: Path) -> dict:
    """One export (a cache hit), then the disk bound of its files; the export removed."""
    started = time.perf_counter()
    with CpuDelta(bridge.server.pid) as used:
        result = bridge.export(ckpt, out_dir / "bridge-hf", overwrite=True)
    seconds = time.perf_counter() - started
    assert result.cache_hit
    nbytes = dir_bytes(out_dir / "bridge-hf")
    drop_file(out_dir / "bridge-hf")
    bound = disk_bound([ckpt], out_dir / "bound.bin")
    return {
        "seconds": seconds,
        "user": used.user,
        "system": used.system,
        "timings": result.timings,
        "bytes": nbytes,
        "bound": bound,
    }


def _rep_line(rep: int, reps: int, base: list[dict], runs: list[dict]) -> str:
    seconds = lambda xs, key: ", ".join(f"{x[key]:.2f}" for x in xs)  # noqa: E731
    return (
        f"   rep {rep + 1}/{reps}: save_file {seconds(base, 'save')}s back-to-back (+fsync "
        f"{seconds(base, 'fsync')}s, sys {seconds(base, 'system')}s); bridge export {seconds(runs, 'seconds')}s "
        f"(server sys {seconds(runs, 'system')}s); disk bound "
        + ", ".join(f"{r['bound']['seconds']:.2f}" for r in runs)
        + "s"
    )


def _row(ctx, base_runs, bridge_runs, idle_runs, first, first_seconds, profile, tries, idle) -> Row:
    med = lambda xs: summary(xs)["median"]  # noqa: E731
    best = lambda runs, key: min(r[key] for r in runs)  # noqa: E731
    subject = [best(runs, "seconds") for runs in bridge_runs]
    baseline = [best(runs, "save") for runs in base_runs]
    bound = [min(r["bound"]["seconds"] for r in runs) for runs in bridge_runs]
    best_bridge = [min(runs, key=lambda r: r["seconds"]) for runs in bridge_runs]
    best_base = [min(runs, key=lambda r: r["save"]) for runs in base_runs]
    with_fsync = [min(r["save"] + r["fsync"] for r in runs) for runs in base_runs]
    export_bytes = bridge_runs[0][0]["bytes"]
    row = Row(
        bench=NAME,
        name=NAME,
        what=f"export the {ctx.big_preset} model to an HF directory ({export_bytes / MB:,.0f} MB), warm cache; "
        f"best of {tries} back-to-back exports per repeat",
        baseline=f"safetensors.torch.save_file of the same tensors (mmap-loaded), same disk, best of {tries} "
        "back-to-back in a fresh process (no fsync)",
        unit="s",
        subject=summary(subject),
        baseline_measured=summary(baseline),
        ratio={**ratio_summary(subject, baseline), "definition": "bridge time / baseline time"},
        target={"text": "≤ 1.3× baseline", "metric": "ratio", "op": "<=", "value": 1.3},
        absolute={
            "export_bytes": export_bytes,
            "baseline_save_file_plus_fsync_s": summary(with_fsync),
            "ratio_against_save_file_plus_fsync": med(subject) / med(with_fsync),
            "first_export_cache_miss_s": first_seconds,
            "first_export_server_timings_s": first.timings,
            "first_of_each_repeat_bridge_s": summary([runs[0]["seconds"] for runs in bridge_runs]),
            "first_of_each_repeat_baseline_s": summary([runs[0]["save"] for runs in base_runs]),
            "baseline_fsync_s": summary([r["fsync"] for r in best_base]),
            "ratio_of_minimums": ratio_of_minimums(subject, baseline),
            "bound_write_s": summary([min(r["bound"]["write"] for r in runs) for runs in bridge_runs]),
            "bound_fsync_s": summary([min(r["bound"]["fsync"] for r in runs) for runs in bridge_runs]),
            **_idle_figures(idle_runs, idle),
        },
        breakdown={
            "server_timings_s": {k: med([r["timings"][k] for r in best_bridge]) for k in first.timings},
            "server_cpu_user_s": summary([r["user"] for r in best_bridge]),
            "server_cpu_system_s": summary([r["system"] for r in best_bridge]),
            "baseline_cpu_user_s": summary([r["user"] for r in best_base]),
            "baseline_cpu_system_s": summary([r["system"] for r in best_base]),
            "all_runs_bridge_s": [[round(r["seconds"], 3) for r in runs] for runs in bridge_runs],
            "all_runs_bound_s": [[round(r["bound"]["seconds"], 3) for r in runs] for runs in bridge_runs],
            "all_runs_baseline_s": [[round(r["save"], 3) for r in runs] for runs in base_runs],
            "all_runs_baseline_plus_fsync_s": [[round(r["save"] + r["fsync"], 3) for r in runs] for runs in base_runs],
            **({"idle_runs": {k: {**v, "bound": None} for k, v in idle_runs.items()}} if idle_runs else {}),
            **({"pyspy_server": profile} if profile else {}),
        },
    )
    row.against_bound(
        "the checkpoint's bytes (the export's tensors) written in one os.write stream + one fsync (page cache "
        "warm: no disk reads on any side)",
        bound,
        {"text": f"≤ {BOUND_RATIO}× bound", "conditions": [{"metric": "ratio", "op": "<=", "value": BOUND_RATIO}]},
        definition="bridge export time / disk bound",
        ratio_of_minimums=ratio_of_minimums(subject, bound),
        ratio_to_save_file_plus_fsync=med(subject) / med(with_fsync),
    ).judge()
    row.analysis += _analysis(row, bridge_runs, base_runs, idle_runs, idle, profile)
    return row


def _idle_figures(idle_runs: dict, idle: float) -> dict:
    if not idle_runs:
        return {}
    return {
        f"after_{idle:.0f}s_idle_bridge_s": idle_runs["bridge"]["seconds"],
        f"after_{idle:.0f}s_idle_baseline_s": idle_runs["baseline"]["save"],
    }


def _analysis(row: Row, bridge_runs, base_runs, idle_runs, idle, profile) -> list[str]:
    med = lambda xs: summary(xs)["median"]  # noqa: E731
    best_bridge = [min(runs, key=lambda r: r["seconds"]) for runs in bridge_runs]
    best_base = [min(runs, key=lambda r: r["save"]) for runs in base_runs]
    first_subject = [runs[0]["seconds"] for runs in bridge_runs]
    first_baseline = [runs[0]["save"] for runs in base_runs]
    t = row.breakdown["server_timings_s"]
    lines = [
        f"best export {fmt_seconds(row.subject['median'])} at the client, {fmt_seconds(t['total'])} in the server "
        f"(user {fmt_seconds(med([r['user'] for r in best_bridge]))}, system "
        f"{fmt_seconds(med([r['system'] for r in best_bridge]))}): the safetensors file is written as save_file "
        "writes it, byte for byte, but in one stream from the tensors' memory with the disk's writeback started "
        "behind it, so the fsync before publishing finds little left; then config, remote code, tokenizer, model "
        "card, pickle scan, one fsync per file and the rename.",
        f"disk bound (the same bytes, one stream, then fsync) {fmt_seconds(row.bound['measured']['median'])}: "
        f"write {fmt_seconds(row.absolute['bound_write_s']['median'])} + fsync "
        f"{fmt_seconds(row.absolute['bound_fsync_s']['median'])}; the export is "
        f"{row.bound['ratio']['value']:.2f}× it (best against best {row.bound['values']['ratio_of_minimums']:.2f}×).",
        f"peers: save_file alone {fmt_seconds(row.baseline_measured['median'])} (system "
        f"{fmt_seconds(med([r['system'] for r in best_base]))}), save_file + fsync "
        f"{fmt_seconds(row.absolute['baseline_save_file_plus_fsync_s']['median'])}: the export is "
        f"{row.ratio['value']:.2f}× the first (which is not durable) and "
        f"{row.absolute['ratio_against_save_file_plus_fsync']:.2f}× the second.",
        f"the first write of each repeat: export {fmt_seconds(med(first_subject))}, save_file "
        f"{fmt_seconds(med(first_baseline))}. On this VM the time of a GB-sized write is mostly system time and "
        "depends on the machine's memory history, not on the writer: it is fast when the kernel reuses pages "
        "freed moments ago and several times slower when they have gone idle (the VM runs a DAMON pageout "
        "scheme and a virtio balloon with free page reporting, the likely cause)"
        + (
            f"; the same export after {idle:.0f}s idle took {fmt_seconds(idle_runs['bridge']['seconds'])}, "
            f"save_file after {idle:.0f}s idle {fmt_seconds(idle_runs['baseline']['save'])}"
            if idle_runs
            else ""
        )
        + ". Hence best-of-back-to-back on every side is what the targets are judged on.",
    ]
    if profile:
        lines.append("py-spy (server, self time, one export): " + busy_frames(profile, 6, "self"))
    return lines
