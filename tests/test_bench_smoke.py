"""``bench/run.py --smoke`` runs every benchmark at tiny sizes and writes a complete results file.

Timings are never asserted (the machine is shared); only that every row is there, with numeric
ratios, a target and a verdict, and that the markdown table names every row.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

from helpers.paths import REPO, slicegpt_env_path

EXPECTED_ROWS = {
    "convert_many",
    "scaling_n1",
    "scaling_n2",
    "scaling_tiny",
    "slice_sweep",
    "pool_cpu",
    "convert_1b",
    "convert_1b_peak_rss",
    "export_1b",
    "memory_convert_tiny",
    "memory_export_tiny",
    "ping_ipc",
    "ping_tcp",
    "echo",
    "verify_1b",
    "load_bin",
    "crc_check",
    "startup",
    "cache_memory",
} | ({"ray_overhead"} if importlib.util.find_spec("ray") is not None else set())  # skipped, with a note, without Ray


def test_bench_smoke_writes_every_row(tmp_path):
    env = slicegpt_env_path()
    results = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--smoke",
            "--env",
            str(env),
            "--results-dir",
            str(results),
            "--keep",
            str(tmp_path / "keep"),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "SLICEBRIDGE_DEBUG_OPS": "0"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    data = json.loads((results / "results.json").read_text())
    assert data["meta"]["smoke"] is True
    rows = {row["name"]: row for row in data["rows"]}
    assert set(rows) == EXPECTED_ROWS
    for name, row in rows.items():
        assert not row.get("error"), f"{name}: {row.get('error')}"
        ratio = row["ratio"]
        for key in ("value", "min", "max"):
            assert isinstance(ratio[key], (int, float)) and math.isfinite(ratio[key]) and ratio[key] > 0, (name, ratio)
        assert ratio["definition"]
        for side in ("subject", "baseline_measured"):
            assert row[side]["n"] >= 1 and math.isfinite(row[side]["median"]), (name, side)
        assert row["target"]["text"]
        assert row["met"] in (True, False, None)
        if row["target"]["op"] is not None:
            assert isinstance(row["met"], bool), name
    # The sweep slices what the fresh processes slice (same perplexities), reading the dense model once a sweep.
    assert rows["slice_sweep"]["absolute"]["n_sparsities"] == 3
    assert any("match the server's" in note for note in rows["slice_sweep"]["notes"]), rows["slice_sweep"]["notes"]
    # The pool had two servers and ran every item; Ray's per-item figure is there when Ray is.
    assert sum(rows["pool_cpu"]["absolute"]["items_per_member_last_pass"].values()) == 2
    assert len(rows["pool_cpu"]["absolute"]["items_per_member_last_pass"]) == 2
    if "ray_overhead" in EXPECTED_ROWS:
        assert math.isfinite(rows["ray_overhead"]["absolute"]["overhead_per_item_ms"])
    else:
        assert any("ray_overhead skipped" in note for note in rows["pool_cpu"]["notes"])
    for name in ("ping_ipc", "ping_tcp"):
        assert all(math.isfinite(rows[name]["absolute"][k]) for k in ("p50_s", "p90_s", "p99_s"))
    # Scaling and the plain torch.load of a .bin state their bound, measured in the same run; the figure is drawn.
    for name in ("scaling_n1", "scaling_n2", "scaling_tiny", "load_bin"):
        bound = rows[name]["bound"]
        assert bound["measured"]["n"] >= 1 and math.isfinite(bound["ratio"]["value"]) and bound["ratio"]["value"] > 0
    assert rows["scaling_n2"]["absolute"]["n_checkpoints"] == 2
    assert (results / "scaling.png").read_bytes().startswith(b"\x89PNG")
    assert "rebuild_model" in rows["load_bin"]["breakdown"]["one_load_under_cprofile_s"]

    markdown = (results / "results.md").read_text()
    for name in EXPECTED_ROWS:
        assert f"| {name}: " in markdown
    assert not list((tmp_path / "keep").glob("work-*")), "the run's scratch outputs were left behind"


def test_the_family_matrix_runs_and_the_readme_shows_its_last_full_run(tmp_path):
    """``make families`` on one family (a smoke run), and the README's matrix is the committed full run's."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "family_matrix.py"),
            "--env",
            str(slicegpt_env_path()),
            "--only",
            "phi2",
            "--out",
            str(tmp_path / "matrix"),
        ],
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads((tmp_path / "matrix.json").read_text())["rows"]
    assert {(row["family"], row["loader"]) for row in rows} == {("phi2", "builtin"), ("phi2", "official")}
    assert all(row["nmse 5.x"] <= 1e-8 and row["nmse 4.41"] <= 1e-8 for row in rows if "nmse 4.41" in row)

    committed = (REPO / "bench" / "results" / "family_matrix.md").read_text()
    table = [line for line in committed.splitlines() if line.startswith("|")]
    readme = (REPO / "README.md").read_text()
    assert "\n".join(table) in readme
    for key in ("llama", "opt", "phi2", "phi3"):  # every family, every loader
        assert any(line.startswith(f"| {key} |") and "| official |" in line for line in table), key
        assert any(line.startswith(f"| {key} |") and "| builtin |" in line for line in table), key
