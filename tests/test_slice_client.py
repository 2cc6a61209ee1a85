"""The base-env side of slicing: Bridge.slice, client.slice, ``slicebridge slice`` and ``make slice``.

Sweeps run end to end through real servers in the stand-in env (no slicegpt there: the builtin
slicer), on a copy of the Llama fixture's dense model (hidden size 128, 4 layers) calibrated on
the embedded sample text, with small numbers so that each sweep takes seconds. What needs no
server is refused before any request; a sparsity that fails mid-sweep (the server's fault
injection) leaves the others done and on disk, in ``SweepIncomplete.sweep``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import threading

import pytest
from helpers.paths import FIXTURE, REPO
from helpers.run import run_cli
from helpers.waiting import partials, wait_for

from slicebridge import Bridge, client
from slicebridge.bridge import protocol
from slicebridge.bridge.errors import BadRequest, ServerDied
from slicebridge.client.slicing import SweepIncomplete
from slicebridge.client.verification import VerifyReport
from slicebridge.model.binfile import load
from slicebridge.model.sample_text import embedded_text

STEM = "Meta-Llama-3-tiny"  # the name the official Llama adapter takes the fixture's dense dir by
SMALL = dict(cal_nsamples=4, cal_batch_size=2, cal_max_seqlen=32, ppl_eval_seqlen=32, dtype="fp32")
SMALL_FLAGS = [f"--{name.replace('_', '-')}={value}" for name, value in SMALL.items()]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """The fixture's dense model, copied (its directory name is what the sliced files are named after)."""
    return shutil.copytree(FIXTURE / "base", tmp_path_factory.mktemp("dense") / "tiny")


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "cal.txt"
    path.write_text(embedded_text(), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- refused before any request


REFUSALS = {
    "above one": ({"sparsities": [0.25, 1.5]}, r"sparsity 1\.5 is outside \(0, 1\)"),
    "zero": ({"sparsities": [0]}, r"sparsity 0 is outside \(0, 1\)"),
    "not a number": ({"sparsities": ["0.25"]}, r"must be a number in \(0, 1\), not '0\.25'"),
    "nan": ({"sparsities": [math.nan]}, r"sparsity nan is outside"),
    "twice": ({"sparsities": [0.25, 0.5, 0.25]}, r"sparsity 0\.25 is named more than once"),
    "none": ({"sparsities": []}, r"name at least one sparsity"),
    "round interval": ({"round_interval": 0}, r"round_interval must be a whole number of at least 1, not 0"),
    "no calibration": ({"calibration": None}, r"neither was given"),
    "two calibrations": ({"cal_dataset": "wikitext2"}, r"both were given"),
}


@pytest.mark.parametrize("options, message", REFUSALS.values(), ids=REFUSALS.keys())
def test_what_needs_no_server_is_refused_before_any_request(bridge, dense, calibration, tmp_path, options, message):
    requests = bridge.stats().counters["requests"]
    call = dict(base_model=dense, sparsities=[0.25], output_dir=tmp_path / "out", calibration=calibration, **SMALL)
    with pytest.raises(BadRequest, match=message) as raised:
        bridge.slice(**{**call, **options})
    assert "\n" not in str(raised.value)
    assert bridge.stats().counters["requests"] == requests + 1  # the stats request itself, nothing else
    assert not (tmp_path / "out").exists()


def test_client_slice_refuses_before_it_starts_a_server(dense, calibration, tmp_path):
    with pytest.raises(BadRequest, match="outside"):  # not EnvNotFound: the env was never looked for
        client.slice(dense, [0.2, 2], calibration, tmp_path / "out", env=str(tmp_path / "no-such-env"))
    with pytest.raises(BadRequest, match="name the output directory"):
        client.slice(dense, [0.2], calibration, env=str(tmp_path / "no-such-env"))


# --------------------------------------------------------------------------- SliceSweep, a stubbed server


def _result(output_dir: str, sparsities: list[float], convert: bool) -> protocol.SliceResult:
    checkpoints = [
        protocol.SlicedCheckpoint(
            sparsity=s,
            checkpoint=f"{output_dir}/{STEM}_{s}.pt",
            slicing_config=f"{output_dir}/{STEM}_{s}.json",
            hidden_size=int(128 * (1 - s)),
            actual_ratio=s * 0.9,
            params={"dense": 100, "sliced": 90, "shortcut_q": 1},
            ppl=50.0,
            timings={"total": 1.0},
            bin={"output": f"{output_dir}/{STEM}_{s}.bin"} if convert else None,
        )
        for s in sparsities
    ]
    return protocol.SliceResult(
        output_dir=output_dir,
        slicer="builtin",
        family="llama",
        model_name=f"meta-llama/{STEM}",
        device="cpu",
        dtype="float32",
        dense={"cache_hit": False, "load_seconds": 0.1, "loads": 1},
        calibration={"source": "cal.txt", "examples": 12, "held_out": 1, "samples": 4, "seqlen": 32},
        baseline_ppl=40.0,
        checkpoints=checkpoints,
        failed=[],
        copied=["config.json"],
        timings={"load": 0.1, "baseline_ppl": 0.1, "total": 2.0},
    )


def test_verify_alone_implies_convert_and_a_failed_verification_fails_the_sweep(tmp_path, monkeypatch):
    sent, verified = [], []
    stub = Bridge(env="unused")

    def request(op, args, on_event=None, timeout=None):
        sent.append((op, args))
        return _result(args.output_dir, args.sparsities, args.convert)

    def verify(artifact, checkpoint, **options):
        verified.append((artifact, checkpoint, options["base_model"]))
        passed = artifact.endswith("_0.25.bin")
        return VerifyReport(artifact, "bin", checkpoint, passed=passed, failures=[] if passed else ["NMSE 0.3 > 1e-05"])

    stub.request, stub.verify = request, verify
    monkeypatch.chdir(tmp_path)  # relative paths travel absolute
    with pytest.raises(SweepIncomplete) as raised:
        stub.slice("dense", [0.25, 0.5], "out", calibration="cal.txt", verify=True)
    ((op, args),) = sent
    assert op == "slice" and args.convert is True and args.export is False
    assert (args.base_model, args.output_dir, args.calibration) == tuple(
        str(tmp_path / n) for n in ("dense", "out", "cal.txt")
    )
    assert verified == [
        (f"{tmp_path}/out/{STEM}_{s}.bin", f"{tmp_path}/out/{STEM}_{s}.pt", str(tmp_path / "out")) for s in (0.25, 0.5)
    ]
    sweep = raised.value.sweep
    assert not sweep.ok and [sweep.verdict(0.25), sweep.verdict(0.5)] == ["pass", "FAIL"]
    assert "the bin of 0.5 failed verification (NMSE 0.3 > 1e-05)" in str(raised.value)
    assert [c["verify"] for c in json.loads(json.dumps(sweep.as_dict()))["checkpoints"]] == ["pass", "FAIL"]
    rows = sweep.table().splitlines()
    assert rows[2].split()[:3] == ["sparsity", "hidden", "actual"] and rows[4].split()[0] == "dense"
    assert rows[-2].endswith("FAILED: verification") and rows[-1] == "2 of 2 sparsities sliced, 1 failed verification"


# --------------------------------------------------------------------------- the CLI, end to end


def slice_cli(dense, calibration, out, env, *extra: str):
    return run_cli(
        "slice",
        "--model-path",
        str(dense),
        "--save-dir",
        str(out),
        "--calibration",
        str(calibration),
        *SMALL_FLAGS,
        "--env",
        str(env),
        *extra,
    )


@pytest.fixture(scope="module")
def cli_sweep(slicegpt_env, dense, calibration, tmp_path_factory):
    """Two sparsities (the flag given twice) through the CLI, verified, as JSON."""
    out = tmp_path_factory.mktemp("cli") / "sliced"
    done = slice_cli(
        dense, calibration, out, slicegpt_env, "--sparsity", "0.25", "--sparsity", "0.5", "--verify", "--json"
    )
    return out, done


def test_a_cli_sweep_slices_verifies_and_reports_as_json(cli_sweep):
    out, done = cli_sweep
    assert done.returncode == 0, done.stdout + done.stderr
    assert "slice 0.25" not in done.stderr  # --json is quiet
    sweep = json.loads(done.stdout)
    assert sweep["ok"] and sweep["slicer"] == "builtin" and sweep["failed"] == []
    checkpoints = sweep["checkpoints"]
    assert [c["sparsity"] for c in checkpoints] == [0.25, 0.5] and [c["hidden_size"] for c in checkpoints] == [96, 64]
    assert 0 < checkpoints[0]["actual_ratio"] < checkpoints[1]["actual_ratio"] < 1
    assert sweep["baseline_ppl"] > 1 and all(math.isfinite(c["ppl"]) for c in checkpoints)
    for c in checkpoints:
        assert c["checkpoint"] == str(out / f"{STEM}_{c['sparsity']}.pt") and os.path.isfile(c["checkpoint"])
        assert os.path.isfile(c["slicing_config"])
        assert c["bin"]["output"] == str(out / f"{STEM}_{c['sparsity']}.bin")  # --verify alone made the .bin
        assert c["verify"] == "pass" and [r["passed"] for r in c["verification"]] == [True]
        assert load(c["bin"]["output"])["pruning_ratio"] == c["sparsity"]
    assert "config.json" in sweep["copied"] and (out / "config.json").is_file()


def test_the_cli_table_and_its_exit_codes(cli_sweep, slicegpt_env, dense, calibration):
    out, _ = cli_sweep
    again = slice_cli(dense, calibration, out, slicegpt_env, "--sparsity", "0.25", "0.5")
    assert again.returncode == 1 and again.stdout == "" and "Traceback" not in again.stderr
    assert again.stderr.startswith("slicebridge: error: ") and "already exists; pass --overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    done = slice_cli(dense, calibration, out, slicegpt_env, "--sparsity", "0.25", "0.5", "--overwrite")
    assert done.returncode == 0, done.stdout + done.stderr
    title, _, header, rule, dense_row, *rows, total = done.stdout.strip().splitlines()
    assert title.startswith(f"slice {dense} (llama, meta-llama/{STEM}) with the builtin slicer on cpu")
    assert header.split() == "sparsity hidden actual ratio ppl seconds checkpoint artifacts verify result".split()
    assert set(rule) == {"-"} and dense_row.split()[0] == "dense" and dense_row.endswith("baseline")
    assert [row.split()[:2] for row in rows] == [["0.25", "96"], ["0.5", "64"]]
    assert all(f"{STEM}_{s}.pt" in row and row.endswith("ok") for s, row in zip((0.25, 0.5), rows, strict=True))
    assert total == "2 of 2 sparsities sliced"
    assert "[slice] slice 0.25: 4/4 layers" in done.stderr  # per-layer progress, as plain lines off a TTY

    refused = slice_cli(dense, calibration, out, slicegpt_env, "--sparsity", "0.25", "1.5")
    assert refused.returncode == 1 and "sparsity 1.5 is outside (0, 1)" in refused.stderr
    missing = run_cli("slice", "--model-path", str(dense), "--sparsity", "0.25")
    assert missing.returncode == 2 and "--save-dir" in missing.stderr


# --------------------------------------------------------------------------- make slice


def make_slice(*assignments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "--no-print-directory", "slice", *assignments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_make_slice_without_its_arguments_prints_its_usage():
    done = make_slice("BASE_MODEL=x", "OUTPUT_DIR=y")
    assert done.returncode == 2 and done.stdout.startswith("usage: make slice BASE_MODEL=dir SPARSITIES=")


def test_make_slice_runs_through_a_detached_warm_server(slicegpt_env, dense, calibration, tmp_path):
    out = tmp_path / "made"
    assignments = [
        f"BASE_MODEL={dense}",
        "SPARSITIES=0.25 0.5",
        f"CALIBRATION={calibration}",
        f"OUTPUT_DIR={out}",
        f"ENV={slicegpt_env}",
        f"SLICE_ARGS={' '.join(SMALL_FLAGS)}",
    ]
    try:
        first = make_slice(*assignments, "CONVERT=1")
        assert first.returncode == 0, first.stdout + first.stderr
        assert "2 of 2 sparsities sliced" in first.stdout and "dense model loaded in" in first.stdout
        assert load(out / f"{STEM}_0.5.bin")["pruning_ratio"] == 0.5
        second = make_slice(*assignments)
        assert second.returncode != 0 and "already exists; pass OVERWRITE=1 to replace it" in second.stderr
        third = make_slice(*assignments, "OVERWRITE=1")
        assert third.returncode == 0 and "dense model warm (cached)" in third.stdout, third.stdout + third.stderr
        status = json.loads(run_cli("server", "status", "--json").stdout)
        assert len(status) == 1 and status[0]["state"] == "running"
    finally:
        run_cli("server", "stop", "--env", str(slicegpt_env))


# --------------------------------------------------------------------------- faults mid-sweep


@pytest.fixture
def faulty(slicegpt_env, monkeypatch):
    """An owned server started with the given fault injection (see slicebridge/server/faults.py)."""
    started = []

    def make(faults: str) -> Bridge:
        monkeypatch.setenv("SLICEBRIDGE_DEBUG_FAULTS", faults)
        bridge = Bridge(env=str(slicegpt_env), attach=False, debug_ops=True).start()
        monkeypatch.delenv("SLICEBRIDGE_DEBUG_FAULTS")
        started.append(bridge)
        return bridge

    yield make
    for bridge in started:
        bridge.close()


def test_a_sparsity_failing_mid_sweep_is_reported_and_the_others_are_kept(faulty, dense, calibration, tmp_path):
    bridge = faulty("slice.layer:raise=MemoryError*1")  # the first layer of the first sparsity
    out = tmp_path / "out"
    with pytest.raises(SweepIncomplete) as raised:
        bridge.slice(dense, [0.25, 0.5], out, calibration=calibration, **SMALL)
    sweep = raised.value.sweep
    assert [c.sparsity for c in sweep.checkpoints] == [0.5] and not sweep.ok
    assert [(f.sparsity, f.error_type) for f in sweep.failed] == [(0.25, "OutOfMemory")]
    assert str(raised.value).startswith("the sweep did not fully succeed: 0.25 failed (OutOfMemory: ")
    assert (out / f"{STEM}_0.5.pt").is_file() and not list(out.glob(f"{STEM}_0.25*"))
    *_, failed_row, done_row, total = sweep.table().splitlines()  # rows by sparsity
    assert failed_row.startswith("0.25 ") and "FAILED: OutOfMemory: the server ran out of host memory" in failed_row
    assert done_row.startswith("0.5 ") and done_row.endswith("ok") and total == "1 of 2 sparsities sliced, 1 failed"

    redo = bridge.slice(dense, [0.25], out, calibration=calibration, **SMALL)  # the server served on, warm
    assert redo.ok and redo.result.dense["cache_hit"] and (out / f"{STEM}_0.25.pt").is_file()


def test_a_server_killed_mid_sweep_leaves_no_temporaries(faulty, dense, calibration, tmp_path):
    bridge = faulty("publish:pause=60")
    out = tmp_path / "out"
    pid = bridge.server.pid

    def kill_once_written():
        if wait_for(lambda: out.is_dir() and partials(out), 60):
            os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill_once_written, daemon=True).start()
    with pytest.raises(ServerDied):
        bridge.slice(dense, [0.25], out, calibration=calibration, **SMALL)
    assert partials(out) == [] and not list(out.glob("*.pt"))
