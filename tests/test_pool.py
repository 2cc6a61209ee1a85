"""A pool of warm servers on one machine (``client.pool``, ``--devices``), with real servers in the stand-in env.

Two CPU servers (``devices=["cpu", "cpu"]``) stand for two GPUs: a batch is spread over both, an
item goes where its model is warm, results come back in the items' order and equal a one-server
run's; a server SIGKILLed under an item costs only that item one retry on the other server, and an
item that fails on its own is not retried, and Ctrl-C leaves no work going on. The CLI gives the
same rows with ``--devices`` as without, and a slicing sweep split over two servers loads the dense
model once on each and makes the files one server makes; a share whose server dies is sliced again
on the other, its first attempt's files replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from helpers.paths import REPO
from helpers.run import run_cli
from helpers.waiting import interrupt_main_when, wait_for

from slicebridge import client
from slicebridge.bridge import protocol
from slicebridge.bridge.errors import BadRequest
from slicebridge.bridge.launcher import split_by_user, thread_shares, usable_cores
from slicebridge.client import slicing
from slicebridge.client.bridge import Bridge
from slicebridge.client.pool import MAX_MEMBERS, Pool, PoolError, WorkItem, member_names, parse_devices
from slicebridge.model.dense import make_dense_preset
from slicebridge.model.errors import CheckpointError
from slicebridge.model.sample_text import embedded_text
from slicebridge.model.slicing import slice_model
from slicebridge.processes import pid_alive

SPARSITIES = (0.2, 0.3, 0.4)
STEM = "Meta-Llama-3-tiny"  # the official Llama adapter's name for a dense dir named "tiny"
SMALL = dict(cal_nsamples=4, cal_batch_size=2, cal_max_seqlen=32, ppl_eval_seqlen=32, dtype="fp32")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tiny dense preset, a calibration text, and one run_slicegpt dir per sparsity sliced from it."""
    root = tmp_path_factory.mktemp("pool")
    dense = make_dense_preset(root / "tiny", "tiny")
    runs = [slice_model(dense, root / f"run{sparsity}", sparsity=sparsity) for sparsity in SPARSITIES]
    calibration = root / "cal.txt"
    calibration.write_text(embedded_text(), encoding="utf-8")
    return {"dense": dense, "runs": runs, "calibration": calibration}


@pytest.fixture(scope="module")
def pool(slicegpt_env):
    with Pool(str(slicegpt_env), ["cpu", "cpu"], debug_ops=True) as started:
        yield started


def convert_job(bridge, device, payload):
    if payload.get("pause"):  # so that both members are idle when the items are handed out
        bridge.request("sleep", protocol.SleepArgs(seconds=payload["pause"], step=0.05))
    result = bridge.convert(payload["checkpoint"], payload["output"], device=device)
    return result.cache_hit, bridge.server.pid


def convert_item(run: Path, output: Path, **extra) -> WorkItem:
    return WorkItem(os.path.realpath(run), {"checkpoint": str(run), "output": str(output), **extra})


def archive(path: Path) -> dict[str, bytes]:
    """A .bin's members and their bytes (torch.save names the archive's folder after the temporary it wrote)."""
    with zipfile.ZipFile(path) as opened:
        return {name.split("/", 1)[1]: opened.read(name) for name in opened.namelist()}


def test_devices_are_checked_before_any_server_starts(slicegpt_env):
    assert parse_devices("cuda:0, cuda:1") == ["cuda:0", "cuda:1"] and parse_devices(" all") == "all"
    for bad, words in (
        ("gpu:0", "'gpu:0': a pool's devices are cpu, cuda or cuda:N"),
        ([], "at least one device"),
        (["cpu"] * (MAX_MEMBERS + 1), f"at most {MAX_MEMBERS} servers"),
    ):
        with pytest.raises(PoolError, match=words):
            Pool(str(slicegpt_env), bad)
    assert member_names(["cpu", "cpu", "cuda:0", "cuda:1", "cuda:1"]) == [
        "cpu#0",
        "cpu#1",
        "cuda:0",
        "cuda:1#0",
        "cuda:1#1",
    ]
    made = client.pool(str(slicegpt_env), devices="cpu,cpu")
    assert isinstance(made, Pool) and made.members == [] and callable(client.pool)  # the function, not the module
    done = run_cli("convert", str(REPO), "--devices", "cpu,cpu", "--device", "cpu", "--env", str(slicegpt_env))
    assert done.returncode == 2 and "--device cpu and --devices cpu,cpu: give one of them" in done.stderr


def test_items_spread_in_order_where_their_model_is_warm_as_one_server_makes_them(pool, bridge, made, tmp_path):
    a, b, c = made["runs"]
    seen = []
    first = pool.run([convert_item(run, tmp_path / f"{run.name}-1.bin") for run in (a, b, c)], convert_job, seen.append)
    assert [result.index for result in first] == [0, 1, 2] and sorted(result.index for result in seen) == [0, 1, 2]
    assert all(result.ok and result.attempts == 1 and result.value[0] is False for result in first), first
    assert {result.member for result in first} == {"cpu#0", "cpu#1"}  # both ran some
    holder = {run: result.member for run, result in zip((a, b, c), first, strict=True)}
    assert holder[a] != holder[b]
    # both idle: each takes the item whose model it holds warm, not the first one
    second = pool.run([convert_item(run, tmp_path / f"{run.name}-2.bin", pause=0.3) for run in (b, a)], convert_job)
    assert [result.member for result in second] == [holder[b], holder[a]]
    assert [result.value[0] for result in second] == [True, True]  # cache hits
    (tmp_path / "alone").mkdir()
    for run in (a, b, c):  # what one server makes of each
        alone = Path(bridge.convert(run, tmp_path / "alone" / f"{run.name}.bin").output)
        assert archive(tmp_path / f"{run.name}-1.bin") == archive(alone)
        if run is not c:
            assert archive(tmp_path / f"{run.name}-2.bin") == archive(alone)


def test_an_item_that_fails_on_its_own_fails_without_a_retry(pool, made, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(made["runs"][0], bad)
    pt = bad / f"{STEM}_0.2.pt"
    pt.write_bytes(pt.read_bytes()[:1000])
    items = [convert_item(run, tmp_path / f"{run.name}.bin") for run in (bad, made["runs"][1])]
    failed, good = pool.run(items, convert_job)
    assert isinstance(failed.error, CheckpointError) and failed.attempts == 1 and not failed.ok
    assert good.ok and (tmp_path / "run0.3.bin").is_file() and not (tmp_path / "bad.bin").exists()


def test_a_server_killed_under_an_item_costs_it_one_retry_elsewhere(pool):
    """The victim's first attempt waits in a debug ``sleep`` until its server is SIGKILLed."""
    first_attempt, killed = threading.Event(), {}

    def job(bridge, device, payload):
        if payload == "victim" and not first_attempt.is_set():
            killed["pid"] = bridge.server.pid
            first_attempt.set()
            bridge.request("sleep", protocol.SleepArgs(seconds=60, step=0.05))
        bridge.request("sleep", protocol.SleepArgs(seconds=0.3, step=0.05))  # long enough for both to take one
        return bridge.echo(payload), bridge.server.pid

    def kill_when_asleep():
        assert first_attempt.wait(30)
        os.kill(killed["pid"], signal.SIGKILL)

    threading.Thread(target=kill_when_asleep, daemon=True).start()
    names = ["first", "victim", "third", "fourth"]
    results = pool.run([WorkItem(name, name) for name in names], job)
    assert [result.value[0] for result in results] == names and all(result.ok for result in results)
    victim = results[1]
    assert victim.attempts == 2 and victim.value[1] != killed["pid"]
    dead = next(member for member in pool.members if member.name != victim.member)
    assert [result.attempts for result in results] == [1, 2, 1, 1]
    assert wait_for(lambda: dead.bridge.server.pid != killed["pid"] and dead.bridge.server.alive(), 30)
    assert dead.bridge.restarts == 1
    again = pool.run([WorkItem(f"k{i}", f"after{i}") for i in range(2)], job)  # both servers serve again
    assert {result.member for result in again} == {"cpu#0", "cpu#1"} and all(result.ok for result in again)


def test_ctrl_c_kills_the_pools_servers_and_the_next_run_starts_fresh_ones(pool):
    busy = []

    def job(bridge, device, payload):
        busy.append(bridge.server.pid)
        bridge.request("sleep", protocol.SleepArgs(seconds=60, step=0.05))

    restarts = [member.bridge.restarts for member in pool.members]
    interrupt_main_when(lambda: len(busy) == 2)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        pool.run([WorkItem(str(index), index) for index in range(4)], job)
    assert time.monotonic() - started < 15 and len(busy) == 2  # no item was taken after it
    assert not any(pid_alive(pid) for pid in busy)  # no work goes on behind the caller
    again = pool.run([WorkItem("x", "x")], lambda bridge, device, payload: bridge.echo(payload))
    assert again[0].value == "x" and again[0].attempts == 1
    assert [member.bridge.restarts for member in pool.members] == restarts  # fresh servers, not restarts


def test_cli_convert_on_two_servers_gives_the_rows_of_one(slicegpt_env, made, tmp_path):
    def convert(*extra):
        out = tmp_path / ("pool" if extra else "one")
        done = run_cli(
            "convert",
            *map(str, made["runs"]),
            "--output-dir",
            str(out),
            "--verify",
            "--json",
            "--env",
            str(slicegpt_env),
            *extra,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    one, pooled = convert(), convert("--devices", "cpu,cpu")
    same = ("checkpoint", "family", "actual_ratio", "loader", "official_name", "cache_hit", "verify", "error", "ok")
    assert [{key: row[key] for key in same} for row in pooled] == [{key: row[key] for key in same} for row in one]
    assert {row["member"] for row in one} == {""} and {row["member"] for row in pooled} == {"cpu#0", "cpu#1"}
    for mine, theirs in zip(pooled, one, strict=True):
        assert Path(mine["output"]).name == Path(theirs["output"]).name
        assert archive(Path(mine["output"])) == archive(Path(theirs["output"]))


def test_cli_slice_on_two_servers_loads_the_dense_model_once_on_each(slicegpt_env, made, tmp_path):
    """The one-server sweep computes with a pool member's CPU threads: on CPU, a sweep's numbers depend on them."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in SMALL.items()]
    done = run_cli(
        "slice",
        "--model-path",
        str(made["dense"]),
        "--save-dir",
        str(tmp_path / "split"),
        "--sparsity",
        *map(str, (0.2, 0.3, 0.4, 0.5)),
        "--calibration",
        str(made["calibration"]),
        "--devices",
        "cpu,cpu",
        "--json",
        "--env",
        str(slicegpt_env),
        *flags,
    )
    assert done.returncode == 0, done.stderr
    sweep = json.loads(done.stdout)
    assert [checkpoint["sparsity"] for checkpoint in sweep["checkpoints"]] == [0.2, 0.3, 0.4, 0.5]
    assert sweep["ok"] and sweep["failed"] == [] and sweep["dense"]["loads"] == 2 and sweep["dense"]["servers"] == 2
    share = None if split_by_user() else thread_shares(["cpu", "cpu"], usable_cores())[0]
    with Bridge(str(slicegpt_env), attach=False, threads=share) as one:
        alone = one.slice(
            made["dense"], [0.2, 0.3, 0.4, 0.5], tmp_path / "alone", calibration=made["calibration"], **SMALL
        )
    for checkpoint in alone.checkpoints:  # the same files as one request on one server
        ours = torch.load(tmp_path / "split" / Path(checkpoint.checkpoint).name, weights_only=True)
        theirs = torch.load(checkpoint.checkpoint, weights_only=True)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_a_share_whose_server_dies_is_sliced_again_elsewhere(slicegpt_env, made, tmp_path, monkeypatch):
    """Each layer pauses, so that the share [0.2, 0.3] is killed after publishing 0.2 and before 0.3."""
    serving: dict[tuple, list[int]] = {}
    real_share = slicing.slice_share

    def recorded(bridge, device, payload):
        serving.setdefault(tuple(payload["sparsities"]), []).append(bridge.server.pid)
        return real_share(bridge, device, payload)

    monkeypatch.setattr(slicing, "slice_share", recorded)
    monkeypatch.setenv("SLICEBRIDGE_DEBUG_FAULTS", "slice.layer:pause=0.25")
    out = tmp_path / "sweep"
    with Pool(str(slicegpt_env), ["cpu", "cpu"], debug_ops=True) as faulty:
        monkeypatch.delenv("SLICEBRIDGE_DEBUG_FAULTS")  # a fresh server runs clean

        def kill_after_the_first():
            if wait_for(lambda: (out / f"{STEM}_0.2.pt").exists(), 60):
                os.kill(serving[(0.2, 0.3)][0], signal.SIGKILL)

        threading.Thread(target=kill_after_the_first, daemon=True).start()
        shares = []
        sweep = slicing.slice_on_pool(
            faulty,
            made["dense"],
            [0.2, 0.3, 0.4, 0.5],
            made["calibration"],
            out,
            on_share=lambda *seen: shares.append(seen),
            **SMALL,
        )
    assert [c.sparsity for c in sweep.checkpoints] == [0.2, 0.3, 0.4, 0.5] and sweep.ok and sweep.failed == []
    [result] = [result for share, result in shares if share == [0.2, 0.3]]
    assert result.attempts == 2 and len(serving[(0.2, 0.3)]) == 2 and len(set(serving[(0.2, 0.3)])) == 2
    assert sweep.result.dense["servers"] == 1 and sweep.result.dense["loads"] == 1  # the survivor, one dense load
    assert sorted(path.name for path in out.glob("*.pt")) == [f"{STEM}_{s}.pt" for s in (0.2, 0.3, 0.4, 0.5)]
    assert not list(out.glob(".*partial"))


@pytest.mark.gpu
def test_all_devices_of_a_machine(slicegpt_env):
    with Pool(str(slicegpt_env), "all") as everything:
        seen = everything.members[0].bridge.server_hello.cuda_devices
        expected = [f"cuda:{index}" for index in range(len(seen))] or ["cpu"]
        assert [member.device for member in everything.members] == expected
        if not seen:
            assert [member.name for member in everything.members] == ["cpu#0"]
            with pytest.raises(PoolError, match="cuda:1: the env's server sees no CUDA devices; name cpu, or all"):
                Pool(str(slicegpt_env), ["cuda:1"]).start()


def placed_job(bridge, device, payload):
    result = bridge.convert(payload["checkpoint"], payload["output"], device=device)
    return result.device, result.placement


def test_a_member_may_be_a_device_group_one_model_spread_over_its_devices(slicegpt_env, made, tmp_path):
    assert parse_devices("cuda:0+cuda:1, cuda:2 + cuda:3") == ["cuda:0+cuda:1", "cuda:2+cuda:3"]
    assert parse_devices([["cuda:0", "cuda:1"], "cpu"]) == ["cuda:0+cuda:1", "cpu"]
    for bad, words in (
        ("cuda:0+cuda:0", "'cuda:0\\+cuda:0': a device group names each of its GPUs once"),
        ("cuda+cuda:1,cuda:2+", "'cuda\\+cuda:1', 'cuda:2\\+': a pool's devices are cpu, cuda or cuda:N, groups of"),
        ([["cuda:0", "gpu:1"]], "'cuda:0\\+gpu:1'"),
    ):
        with pytest.raises(PoolError, match=words):
            parse_devices(bad)
    assert member_names(["cuda:0+cuda:1", "cuda:2+cuda:3", "cuda:2+cuda:3", "cpu+cpu"]) == [
        "cuda:0+cuda:1",
        "cuda:2+cuda:3#0",
        "cuda:2+cuda:3#1",
        "cpu+cpu#0",
    ]
    a, b, _ = made["runs"]
    items = [convert_item(run, tmp_path / f"{run.name}.bin") for run in (a, b)]
    with Pool(str(slicegpt_env), "cpu+cpu") as spread:
        results = spread.run(items, placed_job)
    assert [result.member for result in results] == ["cpu+cpu#0"] * 2 and all(result.ok for result in results)
    for result in results:
        device, placement = result.value
        assert device == "cpu+cpu" and placement["by"] == "slicebridge", placement
        assert list(placement["devices"]) == ["cpu#0", "cpu#1"] and placement["devices"]["cpu#1"].endswith("head")


def test_a_sweep_on_device_groups_is_refused_before_any_server_starts(slicegpt_env, made, tmp_path):
    pool = Pool(str(slicegpt_env), "cuda:0+cuda:1,cuda:2")
    with pytest.raises(BadRequest, match="cuda:0\\+cuda:1: a sweep slices on one device per server"):
        slicing.slice_on_pool(pool, made["dense"], [0.2], made["calibration"], tmp_path / "out")
    assert pool.members == [] and not (tmp_path / "out").exists()
