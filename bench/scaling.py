"""scaling: what converting one checkpoint costs, against the number of checkpoints and the model's size.

Each point is one checkpoint made into a portable ``.bin``, four ways (all per checkpoint):

- warm bridge: the run's shared server, started and warmed up before timing; every checkpoint is a
  cache miss (its own copy, or a new mtime).
- bridge with its start (counts only): a new server started for the batch (``Bridge.start()``, its
  imports on the first convert) plus its N converts, spread over the N.
- fresh process: the seed's workflow, a new slicegpt-env interpreter per checkpoint running
  ``convert_many.SEED_SCRIPT`` (import torch and transformers, torch.load, torch.save with dill).
- disk bound: writing the same bytes (the bridge's ``.bin``, read from the page cache) with one write
  stream and an fsync, what the machine allows for any writer of a durable copy; the inputs are in
  the page cache on every side.

Counts: N = 1, 8, 32 copies of the tiny checkpoint, each in its own directory. Sizes: one checkpoint
of each preset in ``PRESETS`` (bench/models.py), sliced at 0.25. ``--smoke``: N = 1, 2 and the tiny preset.
Every point is a row (``scaling_n<N>``, ``scaling_<preset>``: the bridge against the fresh process, and
against the disk bound), and the figure ``scaling.png`` beside the results (``bench/results/`` unless
``--results-dir`` says) draws them all.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from common import Context, Row, dir_bytes, disk_bound, drop_file, fmt_seconds, ratio_summary, run_python, summary
from convert_many import SEED_SCRIPT
from models import model_set

NAME = "scaling"
SPARSITY = 0.25
COUNTS, SMOKE_COUNTS = [1, 8, 32], [1, 2]
PRESETS, SMOKE_PRESETS = ["0.1b", "0.3b", "1b", "3b"], ["tiny"]
FIGURE = "scaling.png"  # in the run's results dir (--results-dir)


def run(ctx: Context) -> list[Row]:
    counts = SMOKE_COUNTS if ctx.smoke else COUNTS
    presets = SMOKE_PRESETS if ctx.smoke else PRESETS
    out_dir = ctx.scratch(NAME)
    bridge = ctx.bridge()
    tiny = model_set(ctx.cache_dir, "tiny", [SPARSITY], log=ctx.log)
    bridge.convert(tiny.checkpoint(SPARSITY), out_dir / "warmup.bin", overwrite=True)  # imports warm
    copies = _copies(tiny.sliced[SPARSITY], out_dir / "copies", max(counts))
    points = [_count_point(ctx, copies[:n], out_dir) for n in counts]
    points += [_size_point(ctx, preset, out_dir) for preset in presets]
    figure = ctx.results_dir / FIGURE
    draw(points, figure, smoke=ctx.smoke)
    rows = [_row(point) for point in points]
    rows[-1].notes.append(f"figure: {figure}")
    drop_file(out_dir)
    return rows


def _copies(save_dir: Path, into: Path, n: int) -> list[Path]:
    """n copies of a run_slicegpt save dir, each in a directory of its own; their checkpoints."""
    (pt,) = sorted(save_dir.glob("*.pt"))
    copies = []
    for i in range(n):
        target = into / f"ck{i:02d}"
        shutil.copytree(save_dir, target)
        copies.append(target / pt.name)
    return copies


def _fresh_process(ctx: Context, checkpoint: Path, output: Path) -> float:
    seconds, _ = run_python(ctx.env_python, SEED_SCRIPT, str(checkpoint), str(checkpoint.parent), str(output))
    output.unlink()
    return seconds


def _count_point(ctx: Context, checkpoints: list[Path], out_dir: Path) -> dict:
    """N checkpoints, each way; per-checkpoint seconds, one sample per repeat."""
    from slicebridge import Bridge

    n = len(checkpoints)
    point = {"kind": "count", "name": f"scaling_n{n}", "n": n, "warm": [], "started": [], "fresh": [], "bound": []}
    outputs = [out_dir / f"n{n}-{i}.bin" for i in range(n)]
    for rep in range(ctx.reps(1, smoke=1)):
        for checkpoint in checkpoints:
            os.utime(checkpoint)  # a new cache key: every convert below is a miss
        started = time.perf_counter()
        for checkpoint, output in zip(checkpoints, outputs, strict=True):
            result = ctx.bridge().convert(checkpoint, output, overwrite=True)
            assert not result.cache_hit
        point["warm"].append((time.perf_counter() - started) / n)
        point["server_timings_s"] = result.timings  # the last convert's, in the server
        started = time.perf_counter()
        with Bridge(env=str(ctx.env_prefix), attach=False) as fresh:
            for checkpoint, output in zip(checkpoints, outputs, strict=True):
                fresh.convert(checkpoint, output, overwrite=True)
        point["started"].append((time.perf_counter() - started) / n)
        point["fresh"].append(sum(_fresh_process(ctx, c, out_dir / "seed.bin") for c in checkpoints) / n)
        point["bound"].append(disk_bound(outputs, out_dir / "bound.bin")["seconds"] / n)
        ctx.log(
            f"   N={n} rep {rep + 1}: per checkpoint warm bridge {point['warm'][-1]:.3f}s, with its start "
            f"{point['started'][-1]:.3f}s, fresh process {point['fresh'][-1]:.2f}s, disk bound "
            f"{point['bound'][-1]:.4f}s"
        )
    point["bin_bytes"] = dir_bytes(outputs[0])
    point["checkpoint_bytes"] = dir_bytes(checkpoints[0])
    for output in outputs:
        output.unlink()
    return point


def _size_point(ctx: Context, preset: str, out_dir: Path) -> dict:
    """One checkpoint of ``preset``, each way but the new server; per-checkpoint seconds per repeat."""
    models = model_set(ctx.cache_dir, preset, [SPARSITY], log=ctx.log)
    checkpoint = models.checkpoint(SPARSITY)
    params = sum(path.stat().st_size for path in models.dense.glob("*.safetensors")) // 2  # fp16
    point = {"kind": "size", "name": f"scaling_{preset}", "preset": preset, "dense_params": params}
    point |= {"warm": [], "fresh": [], "bound": []}
    output = out_dir / f"{preset}.bin"
    for rep in range(ctx.reps(2, smoke=1)):
        os.utime(checkpoint)
        started = time.perf_counter()
        result = ctx.bridge().convert(checkpoint, output, overwrite=True)
        assert not result.cache_hit
        point["warm"].append(time.perf_counter() - started)
        point["server_timings_s"] = result.timings
        point["fresh"].append(_fresh_process(ctx, checkpoint, out_dir / "seed.bin"))
        point["bound"].append(disk_bound([output], out_dir / "bound.bin")["seconds"])
        ctx.log(
            f"   {preset} rep {rep + 1}: warm bridge {point['warm'][-1]:.2f}s, fresh process "
            f"{point['fresh'][-1]:.2f}s, disk bound {point['bound'][-1]:.2f}s"
        )
    point["bin_bytes"], point["checkpoint_bytes"] = dir_bytes(output), dir_bytes(checkpoint)
    output.unlink()
    return point


def _row(point: dict) -> Row:
    med = lambda key: summary(point[key])["median"]  # noqa: E731
    if point["kind"] == "count":
        what = (
            f"convert {point['n']} tiny checkpoints ({point['checkpoint_bytes'] / 2**20:.1f} MB each), per checkpoint"
        )
        absolute = {"bridge_with_its_start_per_checkpoint_s": summary(point["started"]), "n_checkpoints": point["n"]}
    else:
        what = (
            f"convert one {point['preset']} checkpoint ({point['dense_params'] / 1e9:.2g}B dense parameters, "
            f"{point['checkpoint_bytes'] / 2**20:,.0f} MB sliced), cache miss"
        )
        absolute = {"dense_params": point["dense_params"]}
    row = Row(
        bench=NAME,
        name=point["name"],
        what=what,
        baseline="a fresh slicegpt-env process per checkpoint (the seed's workflow: convert_many's script)",
        unit="s",
        subject=summary(point["warm"]),
        baseline_measured=summary(point["fresh"]),
        ratio={**ratio_summary(point["warm"], point["fresh"], invert=True), "definition": "fresh process / bridge"},
        target={"text": "report (scaling)", "metric": "ratio", "op": None, "value": None},
        absolute={**absolute, "bin_bytes": point["bin_bytes"], "checkpoint_bytes": point["checkpoint_bytes"]},
        breakdown={"server_timings_s": point["server_timings_s"]},
    )
    row.against_bound(
        "write the .bin's bytes in one stream + fsync",
        point["bound"],
        {"text": "report", "conditions": []},
        definition="bridge / disk bound",
    ).judge()
    started = f", a new server with its start {fmt_seconds(med('started'))}" if point["kind"] == "count" else ""
    server = point["server_timings_s"]
    row.analysis.append(
        f"per checkpoint: warm bridge {fmt_seconds(med('warm'))}{started}, a fresh process "
        f"{fmt_seconds(med('fresh'))}, the disk bound {fmt_seconds(med('bound'))} "
        f"({point['bin_bytes'] / 2**20:,.1f} MB written and fsynced). In the server a convert took "
        f"{fmt_seconds(server['total'])}: loading the model {fmt_seconds(server['load'])}, saving (torch.save of "
        f"the recipe, fsync, rename) {fmt_seconds(server['save'])}, the rest (reading and CRC-checking the "
        f"checkpoint, checking the output) {fmt_seconds(server['total'] - server['load'] - server['save'])}."
    )
    return row


# ------------------------------------------------------------------------------ the figure

LINES = [  # key, label, colour, marker, line style, where its values are written (offset in points)
    ("fresh", "fresh process per checkpoint (seed's workflow)", "#c0392b", "o", "-", (5, 5)),
    ("started", "bridge incl. its start, spread over N", "#e67e22", "s", "--", (5, -11)),
    ("warm", "warm bridge", "#2471a3", "^", "-", (5, -11)),
    ("bound", "disk bound (write + fsync of the same bytes)", "#7f8c8d", "x", ":", (5, 5)),
]


def draw(points: list[dict], path: Path, smoke: bool = False) -> None:
    """Two panels, seconds per checkpoint on a log scale: against N (tiny model), against the model's size."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 5), layout="constrained")
    by_count, by_size = figure.subplots(1, 2)
    counts = [p for p in points if p["kind"] == "count"]
    sizes = [p for p in points if p["kind"] == "size"]
    _panel(by_count, counts, [p["n"] for p in counts], [str(p["n"]) for p in counts])
    by_count.set(xlabel="checkpoints converted in one go (N), tiny model", title="against the number of checkpoints")
    ticks = [f"{p['preset']}\n{_parameters(p['dense_params'])}" for p in sizes]
    _panel(by_size, sizes, [p["dense_params"] for p in sizes], ticks)
    by_size.set(xlabel="model: preset, dense parameters", title="against the model's size (one checkpoint)")
    handles, labels = by_count.get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
    figure.suptitle(
        "convert a SliceGPT checkpoint to a .bin: seconds per checkpoint (log scale, lower is better)"
        + ("\nsmoke sizes: the numbers mean nothing" if smoke else "")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    figure.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)


def _parameters(count: int) -> str:
    return f"{count / 1e9:.2g}B" if count >= 1e8 else f"{count / 1e6:.2g}M"


def _panel(axes, points: list[dict], xs: list[float], ticks: list[str]) -> None:
    """One line per way of converting (medians) on log-log axes, each point labelled with its value."""
    from matplotlib.ticker import NullLocator

    axes.set_xscale("log")
    axes.set_yscale("log")
    for key, label, colour, marker, style, offset in LINES:
        if not points or key not in points[0]:
            continue
        ys = [summary(p[key])["median"] for p in points]
        axes.plot(xs, ys, label=label, color=colour, marker=marker, linestyle=style)
        for x, y in zip(xs, ys, strict=True):
            axes.annotate(fmt_seconds(y), (x, y), textcoords="offset points", xytext=offset, fontsize=7, color=colour)
    axes.set_xticks(xs, ticks)
    axes.xaxis.set_minor_locator(NullLocator())
    axes.margins(x=0.12, y=0.15)
    axes.set_ylabel("seconds per checkpoint")
    axes.grid(True, which="major", alpha=0.3)
