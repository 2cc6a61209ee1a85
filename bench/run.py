"""slicebridge benchmarks: ``make bench`` (``python bench/run.py --env .envs/slicegpt``).

Every timing is a ratio against a baseline measured in the same run, with the median and the
spread over repeats (baseline and subject are measured alternately, so that load from other
processes on the machine hits both alike), plus the absolute numbers. Each row states its target
and whether it is met; where a target is missed, the row carries a breakdown of what bounds it.

Writes ``bench/results/results.json`` and ``results.md`` (atomically) and prints the table.

    python bench/run.py --env .envs/slicegpt                # everything: 7-10 min (+2-4 min the first time,
                                                            # to make the 1B model)
    python bench/run.py --env .envs/slicegpt --smoke        # tiny sizes, few repeats: < 1 min
    python bench/run.py --env .envs/slicegpt --only ping    # one benchmark (merged into the results)

Models are made with slicebridge's own maker (``model.dense`` + ``model.slicing``) and cached in
``--keep DIR`` (default ``bench/.cache``) between runs.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, Context, atomic_write, env_python, fmt_summary, fmt_value, pyspy_path  # noqa: E402

BENCHMARKS = [
    "startup",
    "ping",
    "echo",
    "convert_many",
    "convert_1b",
    "export_1b",
    "verify_1b",
    "crc_check",
    "slice_sweep",
    "pool",
    "load_bin",
    "scaling",
    "memory",
]
ROW_ORDER = [
    "convert_many",
    "scaling_n1",
    "scaling_n2",
    "scaling_n8",
    "scaling_n32",
    "scaling_tiny",
    "scaling_0.1b",
    "scaling_0.3b",
    "scaling_1b",
    "scaling_3b",
    "slice_sweep",
    "pool_cpu",
    "ray_overhead",
    "convert_1b",
    "convert_1b_peak_rss",
    "export_1b",
    "memory_convert_1b",
    "memory_export_1b",
    "memory_convert_3b",
    "memory_export_3b",
    "ping_ipc",
    "ping_tcp",
    "echo",
    "verify_1b",
    "load_bin",
    "crc_check",
    "startup",
    "cache_memory",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--env",
        default=str(REPO / ".envs" / "slicegpt"),
        help="the slicegpt env: a prefix dir or its python (default: .envs/slicegpt)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes and few repeats (no 1B model): checks that every benchmark runs",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=BENCHMARKS,
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--repeats", type=int, default=None, help="repeats of every benchmark (default: each its own)")
    parser.add_argument(
        "--keep",
        default=str(REPO / "bench" / ".cache"),
        help="directory where made models are kept between runs (default: bench/.cache)",
    )
    parser.add_argument(
        "--results-dir",
        default=str(REPO / "bench" / "results"),
        help="where results.json and results.md go (default: bench/results)",
    )
    parser.add_argument(
        "--no-profile", action="store_true", help="skip the py-spy profiles (taken when py-spy is found)"
    )
    return parser.parse_args(argv)


def machine_info(ctx: Context) -> dict:
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
        with open("/proc/meminfo") as fh:
            info["mem_total_gb"] = round(int(fh.readline().split()[1]) / 1024**2, 1)
        info["loadavg_start"] = open("/proc/loadavg").read().split()[:3]
    except (OSError, StopIteration):
        pass
    import importlib.metadata

    info["base_env"] = {}
    for name in ("torch", "transformers", "pyzmq", "msgpack", "safetensors"):
        try:
            info["base_env"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        names = ["torch", "transformers", "pyzmq", "msgpack", "safetensors", "dill"]
        out = subprocess.run(
            [
                str(ctx.env_python),
                "-I",
                "-c",
                "import sys, importlib.metadata as m\nfor n in sys.argv[1:]:\n"
                "    try: print(m.version(n))\n    except Exception: print('-')",
                *names,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout.split()
        info["slicegpt_env"] = dict(zip(names, out, strict=False))
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info["git"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ------------------------------------------------------------------------------ markdown


def _ratio_text(row: dict) -> str:
    r = row["ratio"]
    return f"{r['value']:.3g}× [{r['min']:.3g}–{r['max']:.3g}]"


def _measured_text(row: dict) -> str:
    text = fmt_summary(row["subject"], row["unit"])
    if row["name"].startswith("ping_"):
        a = row["absolute"]
        text = f"p50 {text}; p90 {fmt_value(a['p90_s'], 's')}, p99 {fmt_value(a['p99_s'], 's')}"
    return text


def _met_text(row: dict) -> str:
    if row.get("error"):
        return "ERROR"
    return {True: "yes", False: "**NO**", None: "—"}[row["met"]]


def _bound_cells(row: dict) -> str:
    """The table's bound columns: the bound measured, the ratio to it, its target, met."""
    bound = row.get("bound")
    if not bound:
        return "none stated | | | |"
    ratio = bound["ratio"]
    values = "".join(f"; {k} {v:.3g}" for k, v in bound["values"].items() if isinstance(v, (int, float)))
    met = {True: "yes", False: "**NO**", None: "—"}[bound.get("met")]
    return (
        f"{bound['what']}: {fmt_summary(bound['measured'], row['unit'])} | {_ratio_text(bound)}{values} "
        f"({ratio['definition']}) | {bound['target']['text']} | {met} |"
    )


def render_markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# slicebridge benchmarks",
        "",
        f"Measured {meta['finished']} with `{meta['command']}`"
        + (" (**smoke sizes**)" if meta.get("smoke") else "")
        + ".",
        f"Machine: {meta['machine'].get('cpu', '?')}, {meta['machine'].get('cpus')} CPUs, "
        f"{meta['machine'].get('mem_total_gb')} GB; load average at start {meta['machine'].get('loadavg_start')} "
        "(the machine is shared: every ratio pairs baseline and subject measured alternately).",
        f"Base env: {meta['machine'].get('base_env')}; slicegpt env: {meta['machine'].get('slicegpt_env')}.",
        "",
        "Values are median [min–max] over the repeats; ratios are of the medians, with the range of the per-repeat "
        "ratios."
        + (
            " At smoke sizes the verdicts mean nothing: this run only checks that every benchmark runs."
            if meta.get("smoke")
            else ""
        ),
        "",
        "| row | measured | baseline (same run) | ratio | target | met | bound (same run) | × bound | bound target "
        "| met |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = results["rows"]
    for row in rows:
        if row.get("error"):
            lines.append(f"| {row['name']} | error: {row['error'].splitlines()[-1][:80]} | | | | ERROR | | | | |")
            continue
        lines.append(
            f"| {row['name']}: {row['what']} | {_measured_text(row)} | {row['baseline']}: "
            f"{fmt_summary(row['baseline_measured'], row['unit'])} | {_ratio_text(row)} "
            f"({row['ratio']['definition']}) | {row['target']['text']} | {_met_text(row)} | {_bound_cells(row)}"
        )
    lines.append("")
    for row in rows:
        if row.get("error"):
            lines += [f"## {row['name']}: ERROR", "", "```", row["error"], "```", ""]
            continue
        verdict = {True: "target met", False: "TARGET MISSED", None: "report"}[row["met"]]
        lines += [
            f"## {row['name']} — {verdict}",
            "",
            f"- measured: {row['what']}",
            f"- baseline: {row['baseline']}",
            f"- ratio: {_ratio_text(row)} = {row['ratio']['definition']}; target {row['target']['text']}",
        ]
        if row.get("bound"):
            bound = row["bound"]
            lines.append(
                f"- bound: {bound['what']}: {fmt_summary(bound['measured'], row['unit'])}; ratio {_ratio_text(bound)}"
                f" = {bound['ratio']['definition']}; target {bound['target']['text']}: "
                + {True: "met", False: "**MISSED**", None: "report"}[bound.get("met")]
            )
        if row["absolute"]:
            lines.append("- absolute: " + _compact(row["absolute"]))
        if row["breakdown"]:
            lines.append(
                "- breakdown: "
                + _compact({k: v for k, v in row["breakdown"].items() if k != "pyspy" and not k.startswith("pyspy")})
            )
        for note in row.get("notes", []):
            lines.append(f"- note: {note}")
        if row.get("analysis"):
            title = (
                "What bounds it, and what would move it"
                if row["met"] is False
                else "Where the time goes (what bounds it)"
            )
            lines += ["", f"**{title}:**", ""]
            lines += [f"- {a}" for a in row["analysis"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def _unit_of(key: str, inherited: str | None) -> str | None:
    if key.endswith("_s") or "_s " in key or key.endswith("_s)"):
        return "s"
    if key.endswith("_B") or key.endswith("bytes"):
        return "B"
    return inherited


def _compact(value, unit: str | None = None) -> str:
    """A one-line rendering of a nested dict of numbers (seconds and bytes by their key's suffix)."""
    if isinstance(value, dict):
        if {"median", "min", "max"} <= set(value):
            return f"{_num(value['median'], unit)} [{_num(value['min'], unit)}–{_num(value['max'], unit)}]"
        return (
            "{"
            + ", ".join(
                f"{k}: {_compact(v, _unit_of(k, unit))}"
                for k, v in value.items()
                if k not in ("samples", "pairs") and not k.endswith("_per_rep_s")
            )
            + "}"
        )
    if isinstance(value, list):
        return "[" + ", ".join(_compact(v, unit) for v in value[:8]) + ("…" if len(value) > 8 else "") + "]"
    return _num(value, unit)


def _num(value, unit: str | None = None) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if unit in ("s", "B"):
        return fmt_value(value, unit)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = parse_args(argv)
    python, prefix = env_python(args.env)
    if not python.exists():
        print(f"no python at {python}: build the env first (make envs)", file=sys.stderr)
        return 2
    runtime = tempfile.mkdtemp(prefix="sbb-", dir="/tmp")
    os.environ["SLICEBRIDGE_RUNTIME_DIR"] = runtime  # private: no clash with others' servers
    os.environ.pop("SLICEBRIDGE_DEBUG_OPS", None)
    results_dir = Path(args.results_dir).absolute()
    cache_dir = Path(args.keep).absolute()
    cache_dir.mkdir(parents=True, exist_ok=True)
    work_dir = Path(tempfile.mkdtemp(prefix="work-", dir=cache_dir))

    def log(text: str) -> None:
        print(text, flush=True)

    ctx = Context(
        env_python=python,
        env_prefix=prefix,
        smoke=args.smoke,
        repeats=args.repeats,
        cache_dir=cache_dir,
        work_dir=work_dir,
        results_dir=results_dir,
        log=log,
        profile=not args.no_profile and not args.smoke and pyspy_path() is not None,
    )
    chosen = args.only or BENCHMARKS
    started = time.perf_counter()
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "smoke": args.smoke,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(ctx),
        "profiled_with_pyspy": ctx.profile,
    }
    rows: list[dict] = []
    failed = []
    try:
        # Make the models first (outside any timing).
        from convert_many import SPARSITIES
        from models import model_set

        log("== models")
        model_set(cache_dir, "tiny", sorted(set(SPARSITIES[: 2 if args.smoke else 8]) | {0.25}), log=log)
        if any(b in chosen for b in ("convert_1b", "export_1b", "verify_1b", "crc_check")):
            made = model_set(cache_dir, ctx.big_preset, [0.25], log=log)
            log(f"   {ctx.big_preset} model ready ({made.made_seconds:.0f}s)")
        modules = {name: importlib.import_module(name) for name in chosen}  # all now: fail fast
        for name in chosen:
            log(f"== {name}")
            t0 = time.perf_counter()
            try:
                produced = modules[name].run(ctx)
                rows += [r.as_dict() for r in produced]
                for r in produced:
                    log(
                        f"   {r.name}: ratio {r.ratio['value']:.3g} ({r.ratio['definition']}), target "
                        f"{r.target['text']}: {_met_text(r.as_dict())}"
                    )
            except Exception:
                failed.append(name)
                error = traceback.format_exc()
                log(error)
                rows.append({"bench": name, "name": name, "error": error})
            log(f"   ({time.perf_counter() - t0:.1f}s)")
    finally:
        ctx.close()
        shutil.rmtree(work_dir, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)

    meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    meta["seconds"] = round(time.perf_counter() - started, 1)
    results = merge(results_dir / "results.json", meta, rows, chosen, partial=args.only is not None)
    markdown = render_markdown(results)
    atomic_write(results_dir / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    atomic_write(results_dir / "results.md", markdown)
    print()
    print(markdown.split("\n## ")[0])
    print(f"results: {results_dir / 'results.md'} ({meta['seconds']:.0f}s)")
    return 1 if failed else 0


def merge(path: Path, meta: dict, rows: list[dict], chosen: list[str], partial: bool) -> dict:
    """With --only, keep the other benchmarks' rows of an earlier run of the same kind (smoke or not)."""
    if partial and path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old and old.get("meta", {}).get("smoke") == meta["smoke"]:
            kept = [r for r in old.get("rows", []) if r.get("bench") not in chosen]
            rows = kept + rows
            meta = {**meta, "merged_with_run_of": old["meta"].get("finished")}
    order = {name: i for i, name in enumerate(ROW_ORDER)}
    rows.sort(key=lambda r: order.get(r["name"], len(order)))
    return {"meta": meta, "rows": rows, "targets": {r["name"]: r.get("met") for r in rows}}


if __name__ == "__main__":
    sys.exit(main())
