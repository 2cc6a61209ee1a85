"""The pool on Ray (``client.ray_pool``), on a real Ray cluster of two nodes on this machine.

Two Ray nodes of one CPU each (Ray's own ``Cluster`` helper: a head and a worker node, each its own
raylet, on loopback) stand for two machines: a batch is spread over one actor per node, an item goes
where its key is warm, conversions equal a local bridge's, an input that is not there fails its item
naming the node, and an actor killed under an item costs that item one retry on the other actor.
``address="local"`` starts a private instance and leaves no process behind, and ``slicebridge convert
--ray local`` gives the rows and files of a run without Ray. A slicing sweep on Ray (``slicebridge slice
--ray``, ``client.slice(ray=...)``) gives each actor a share of the sparsities and makes a local sweep's
files, and a calibration text no node sees fails the sweep naming the node. Skipped without Ray
(``slicebridge[ray]``); CI installs it.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

# Ray's nodes on loopback only (with this switch off Ray takes 127.0.0.1 as a node's address, not the
# machine's outward one), and no usage reports.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")

from helpers.paths import SHARED_FIXTURES  # noqa: E402
from helpers.run import run_cli, run_python  # noqa: E402
from helpers.waiting import wait_for  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from slicebridge import Bridge, client  # noqa: E402
from slicebridge.bridge.errors import BadRequest, EnvNotFound, RemoteError, remote_error  # noqa: E402
from slicebridge.client.pool import PoolError, WorkItem  # noqa: E402
from slicebridge.client.ray_pool import RayPool, arrived, plan_members, portable  # noqa: E402
from slicebridge.errors import InputNotFound  # noqa: E402
from slicebridge.model.dense import make_dense_preset  # noqa: E402
from slicebridge.model.errors import NotASliceGPTCheckpoint, SparsityMismatch  # noqa: E402
from slicebridge.model.sample_text import embedded_text  # noqa: E402
from slicebridge.processes import pid_alive  # noqa: E402

pytestmark = pytest.mark.timeout(240)

# The jobs below travel to the actors by value: the nodes cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CHECKPOINTS = {
    "llama": ("slicegpt-llama-tiny", "Meta-Llama-3-tiny_0.25.pt"),
    "opt": ("slicegpt-opt-tiny", "opt-tiny_0.2.pt"),
}

SMALL = dict(cal_nsamples=4, cal_batch_size=2, cal_max_seqlen=32, ppl_eval_seqlen=32, dtype="fp32")  # a quick sweep


def whoami(bridge, device, payload):
    time.sleep(payload.get("pause", 0))
    omp = os.environ["OMP_NUM_THREADS"]
    return {"actor": os.getpid(), "server": bridge.server_hello.pid, "device": device, "omp": omp}


def convert(bridge, device, payload):
    return bridge.convert(payload["checkpoint"], payload["output"], base_model=payload["base_model"], device=device)


def held_or_whoami(bridge, device, payload):
    """An item with a marker says where its first attempt runs (actor and server pid) and waits there to be killed."""
    if "marker" not in payload:
        return whoami(bridge, device, payload)
    marker = Path(payload["marker"])
    if not marker.exists():
        marker.with_suffix(".tmp").write_text(f"{os.getpid()} {bridge.server_hello.pid}")
        marker.with_suffix(".tmp").rename(marker)
        time.sleep(120)
    return os.getpid()


@pytest.fixture(scope="module")
def cluster():
    """A Ray head node and one worker node, one CPU each, on loopback; the test process is not connected."""
    made = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    made.add_node(num_cpus=1)
    made.wait_for_nodes()
    yield made
    made.shutdown()


@pytest.fixture(scope="module")
def pool(cluster, slicegpt_env):
    with RayPool(str(slicegpt_env), address=cluster.address, debug_ops=True) as started:
        yield started


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny dense preset and a calibration text, to slice."""
    root = tmp_path_factory.mktemp("dense")
    calibration = root / "cal.txt"
    calibration.write_text(embedded_text(), encoding="utf-8")
    return make_dense_preset(root / "tiny", "tiny"), calibration


def records(path: Path) -> dict[str, bytes]:
    """A ``.bin``'s records by their names inside the archive (whose top folder is named after the temp file)."""
    with zipfile.ZipFile(path) as archive:
        return {name.partition("/")[2]: archive.read(name) for name in archive.namelist()}


def test_a_batch_is_spread_over_one_actor_per_node_and_each_key_stays_where_it_is_warm(pool):
    assert len(pool.members) == 2 and len({member.node for member in pool.members}) == 2
    assert all(member.name.endswith("/cpu#0") and member.device == "cpu" for member in pool.members)
    items = [WorkItem(key, {"pause": 0.5}) for key in ("a", "a", "b", "b", "a", "b")]
    seen = []

    results = pool.run(items, whoami, on_result=seen.append)

    assert [result.index for result in results] == list(range(len(items))) and all(r.ok for r in results)
    assert sorted(result.index for result in seen) == list(range(len(items)))
    by_key = {key: {r.member for r, item in zip(results, items, strict=True) if item.key == key} for key in "ab"}
    assert len(by_key["a"]) == len(by_key["b"]) == 1 and by_key["a"] != by_key["b"], by_key
    assert {result.value["actor"] for result in results} == {member.pid for member in pool.members}
    assert len({result.value["server"] for result in results}) == 2  # a server of its own each
    assert {result.value["omp"] for result in results} == {"1"}  # each node's one CPU, as its server's threads
    assert all(result.attempts == 1 and result.seconds >= 0.5 for result in results)


def test_conversions_on_ray_equal_a_local_bridges(pool, bridge, tmp_path):
    items, local = [], {}
    for family, (fixture, name) in CHECKPOINTS.items():
        checkpoint, base = SHARED_FIXTURES / fixture / "sliced" / name, SHARED_FIXTURES / fixture / "base"
        payload = {"checkpoint": str(checkpoint), "base_model": str(base), "inputs": [str(checkpoint), str(base)]}
        items.append(WorkItem(str(checkpoint), {**payload, "output": str(tmp_path / f"ray-{family}.bin")}))
        local[family] = bridge.convert(checkpoint, tmp_path / f"local-{family}.bin", base_model=base).output

    results = pool.run(items, convert)

    assert [result.error for result in results] == [None, None]
    assert len({result.member for result in results}) == 2
    for family, result in zip(CHECKPOINTS, results, strict=True):
        assert result.value.family == family and result.value.output == str(tmp_path / f"ray-{family}.bin")
        assert records(Path(result.value.output)) == records(Path(local[family])), family


def test_an_input_not_on_the_node_fails_its_item_naming_the_node_and_server_errors_keep_their_types(pool, tmp_path):
    missing, not_a_checkpoint = tmp_path / "gone.pt", tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    base = SHARED_FIXTURES / "slicegpt-llama-tiny" / "base"
    payload = {"base_model": str(base), "output": str(tmp_path / "out.bin")}
    items = [
        WorkItem("x", {**payload, "checkpoint": str(missing), "inputs": [str(missing)]}),
        WorkItem("y", {**payload, "checkpoint": str(not_a_checkpoint), "inputs": [str(not_a_checkpoint)]}),
        WorkItem("z", {"pause": 0}),
    ]

    missed, refused, fine = pool.run(items[:2], convert) + pool.run(items[2:], whoami)

    node = next(member.node for member in pool.members if member.name == missed.member)
    assert isinstance(missed.error, InputNotFound) and missed.attempts == 1
    assert f"the input {missing} is not there on the Ray node {node}" in str(missed.error)
    assert "storage that every node of the cluster shares" in str(missed.error)
    assert isinstance(refused.error, NotASliceGPTCheckpoint) and isinstance(refused.error, RemoteError)
    assert fine.ok and not (tmp_path / "out.bin").exists()


def test_an_actor_killed_under_an_item_costs_it_one_retry_on_the_other(cluster, slicegpt_env, tmp_path):
    marker, killed = tmp_path / "held", []
    items = [WorkItem("held", {"marker": str(marker)})] + [WorkItem(f"k{n}", {"pause": 0.2}) for n in range(3)]
    with RayPool(str(slicegpt_env), address=cluster.address, debug_ops=True) as pool:
        members = list(pool.members)

        def kill_the_holder() -> None:
            if wait_for(marker.exists, 60):
                actor_pid, server_pid = map(int, marker.read_text().split())
                killed.append((next(member for member in members if member.pid == actor_pid), server_pid))
                ray.kill(killed[0][0].actor)

        killer = threading.Thread(target=kill_the_holder)
        killer.start()
        results = pool.run(items, held_or_whoami)
        killer.join()

    assert killed, "the held item never started"
    (victim, victim_server), survivor = killed[0], next(member for member in members if member is not killed[0][0])
    assert results[0].ok and results[0].attempts == 2 and results[0].member == survivor.name != victim.name
    assert results[0].value == survivor.pid
    assert all(result.ok and result.attempts == 1 for result in results[1:])
    assert victim.retired is not None and "died" in str(victim.retired)
    assert wait_for(lambda: not pid_alive(victim_server), 10)  # its server went with it


# A fresh process: address="local" starts its own instance, runs an item, and after close nothing it started is left.
LOCAL_RUN = r"""
import json, os, sys, time
import ray
from slicebridge.client.pool import WorkItem
from slicebridge.client.ray_pool import RayPool

def server_pid(bridge, device, payload):
    return bridge.server_hello.pid

def descendants():
    children = {}
    for stat in os.listdir("/proc"):
        try:
            fields = open(f"/proc/{stat}/stat").read().rpartition(")")[2].split()
        except (OSError, ValueError):
            continue
        if stat.isdigit() and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat))
    found, todo = [], [os.getpid()]
    while todo:
        below = children.get(todo.pop(), [])
        found, todo = found + below, todo + below
    return sorted(found)

before = ray.is_initialized()
with RayPool(sys.argv[1], address="local", debug_ops=True) as pool:
    [result] = pool.run([WorkItem("k", None)], server_pid)
    during, temp_dir, started = ray.is_initialized(), pool.temp_dir, len(descendants())
deadline = time.monotonic() + 20
while descendants() and time.monotonic() < deadline:
    time.sleep(0.2)
print(json.dumps({"before": before, "during": during, "after": ray.is_initialized(), "ok": result.ok,
                  "server": result.value, "started": started, "left": descendants(),
                  "temp_dir_left": os.path.exists(temp_dir)}))
"""


def test_address_local_starts_a_private_instance_and_leaves_nothing_behind(slicegpt_env):
    done = run_python(LOCAL_RUN, str(slicegpt_env), timeout=120, env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert (run["before"], run["during"], run["after"], run["ok"]) == (False, True, False, True), run
    assert run["started"] >= 3 and run["left"] == [] and not run["temp_dir_left"], run
    assert not pid_alive(run["server"])


def test_cli_convert_on_a_local_ray_gives_the_rows_and_files_of_a_run_without_it(slicegpt_env, tmp_path):
    checkpoints = [str(SHARED_FIXTURES / fixture / "sliced" / name) for fixture, name in CHECKPOINTS.values()]

    def convert(*extra: str) -> list[dict]:
        out = tmp_path / ("ray" if extra else "one")
        flags = ["--output-dir", str(out), "--json", "--env", str(slicegpt_env)]
        done = run_cli("convert", *checkpoints, *flags, *extra, env={"RAY_ADDRESS": ""}, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr[-3000:]
        return json.loads(done.stdout)

    one, on_ray = convert(), convert("--ray", "local")
    same = ("checkpoint", "family", "actual_ratio", "loader", "official_name", "verify", "error", "ok")
    assert [{key: row[key] for key in same} for row in on_ray] == [{key: row[key] for key in same} for row in one]
    assert [row["family"] for row in one] == list(CHECKPOINTS)
    assert {row["member"] for row in one} == {""} and all(row["member"].endswith("/cpu#0") for row in on_ray)
    for mine, theirs in zip(on_ray, one, strict=True):
        assert Path(mine["output"]).name == Path(theirs["output"]).name
        assert records(Path(mine["output"])) == records(Path(theirs["output"]))

    both = run_cli("convert", *checkpoints, "--ray", "local", "--devices", "cpu,cpu", "--env", str(slicegpt_env))
    assert both.returncode == 2 and both.stdout == ""
    assert (
        both.stderr.splitlines()[-1]
        == "slicebridge convert: error: argument --devices: not allowed with argument --ray"
    )


def test_cli_slice_on_ray_gives_each_actor_a_share_and_makes_a_local_sweeps_files(
    cluster, slicegpt_env, dense, tmp_path, monkeypatch
):
    """The local sweep computes with one CPU thread, as each actor's server does (its node's one CPU): on CPU,
    a sweep's numbers depend on its thread count."""
    model, calibration = dense
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in SMALL.items()]
    done = run_cli(
        "slice",
        *("--model-path", str(model), "--save-dir", str(tmp_path / "ray"), "--sparsity", "0.2", "0.3"),
        *("--calibration", str(calibration), "--ray", cluster.address, "--json", "--env", str(slicegpt_env)),
        *flags,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    sweep = json.loads(done.stdout)
    assert [checkpoint["sparsity"] for checkpoint in sweep["checkpoints"]] == [0.2, 0.3]
    assert sweep["ok"] and sweep["failed"] == [] and (sweep["dense"]["servers"], sweep["dense"]["loads"]) == (2, 2)

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with Bridge(str(slicegpt_env), attach=False, debug_ops=True) as local:
        alone = local.slice(model, [0.2, 0.3], tmp_path / "alone", calibration=calibration, **SMALL)

    names = sorted(path.name for path in (tmp_path / "alone").iterdir())
    assert sorted(path.name for path in (tmp_path / "ray").iterdir()) == names
    for name in names:
        ours, theirs = tmp_path / "ray" / name, tmp_path / "alone" / name
        if name.endswith(".pt"):
            ours, theirs = torch.load(ours, weights_only=True), torch.load(theirs, weights_only=True)
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours), name
        else:
            assert ours.read_bytes() == theirs.read_bytes(), name
    assert [checkpoint["ppl"] for checkpoint in sweep["checkpoints"]] == [c.ppl for c in alone.checkpoints]


def test_a_sweep_on_ray_whose_calibration_no_node_sees_fails_naming_the_node(
    pool, cluster, slicegpt_env, dense, tmp_path
):
    model, _ = dense
    gone, out = tmp_path / "gone.txt", tmp_path / "out"
    on_ray = dict(env=str(slicegpt_env), ray=cluster.address, **SMALL)

    with pytest.raises(InputNotFound) as raised:
        client.slice(model, [0.2, 0.3], gone, out, **on_ray)

    nodes = {member.node for member in pool.members}  # the same two nodes as the sweep's own actors
    assert any(f"the input {gone} is not there on the Ray node {node}:" in str(raised.value) for node in nodes)
    assert not out.exists()
    with pytest.raises(BadRequest, match="on Ray, events stay on the nodes that slice: pass on_share"):
        client.slice(model, [0.2, 0.3], dense[1], out, on_event=print, **on_ray)


def test_without_ray_the_pool_says_how_to_get_it_and_importing_slicebridge_never_imports_ray():
    done = run_python(
        "import sys; sys.modules['ray'] = None\n"  # as if it were not installed
        "import slicebridge.client, slicebridge.client.ray_pool as ray_pool\n"
        "assert 'ray' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n    ray_pool.RayPool('slicegpt').start()\n"
        "except ray_pool.RayUnavailable as exc:\n    print(type(exc).__mro__[1].__name__, exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("PoolError Ray is not installed in this env")
    assert "pip install 'slicebridge[ray]'" in done.stdout and done.stdout.count("\n") == 1


def test_a_job_that_cannot_travel_is_refused_before_any_item_runs(pool):
    lock = threading.Lock()
    with pytest.raises(
        PoolError, match=r"<lambda> cannot be sent to the Ray nodes \(cannot pickle .*lock.*\): pass a module-level"
    ):
        pool.run([WorkItem("k", None)], lambda bridge, device, payload: lock)


def test_a_job_the_nodes_cannot_import_fails_its_items_saying_so(pool, tmp_path, monkeypatch):
    (tmp_path / "only_here.py").write_text("def job(bridge, device, payload):\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # importable in this process, not on the nodes
    only_here = importlib.import_module("only_here")

    results = pool.run([WorkItem("k", None)], only_here.job)

    assert isinstance(results[0].error, PoolError) and results[0].attempts == 1
    assert "could not run the job" in str(results[0].error) and "No module named 'only_here'" in str(results[0].error)
    assert all(member.retired is None for member in pool.members)


def test_the_env_is_named_so_that_every_node_finds_it_there(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert RayPool("slicegpt").env_spec == "slicegpt"  # a conda env name: each node resolves it itself
    assert RayPool(Path(".envs") / "slicegpt").env_spec == str(tmp_path / ".envs" / "slicegpt")
    assert RayPool("/opt/envs/slicegpt").env_spec == "/opt/envs/slicegpt"


def node(node_id: str, host: str, cpus: int, gpus: int = 0, alive: bool = True) -> dict:
    return {"NodeID": node_id * 8, "Alive": alive, "NodeManagerHostname": host, "Resources": {"CPU": cpus, "GPU": gpus}}


def test_members_are_one_per_gpu_else_devices_per_node_on_cpu_nodes():
    nodes = [node("a", "gpu1", 32, 8), node("b", "gpu2", 16, 2), node("c", "head", 0), node("d", "cpu1", 8)]
    nodes.append(node("e", "gone", 8, 8, alive=False))
    plans = plan_members(nodes)
    assert [(p.node, p.gpu, p.threads) for p in plans] == [("gpu1", True, 4)] * 8 + [("gpu2", True, 8)] * 2 + [
        ("cpu1", False, 8)
    ]
    capped = plan_members(nodes, devices_per_node=4)
    assert [(p.node, p.index, p.threads) for p in capped if p.node != "gpu1"] == [
        ("gpu2", 0, 8),
        ("gpu2", 1, 8),
        *[("cpu1", index, 2) for index in range(4)],
    ]
    twins = plan_members([node("a", "vm", 1), node("b", "vm", 1)])
    assert [p.node for p in twins] == ["vm:aaaaaaaa", "vm:bbbbbbbb"]
    with pytest.raises(PoolError, match="no alive node with a GPU or a CPU"):
        plan_members([node("c", "head", 0)])
    with pytest.raises(PoolError, match="devices_per_node is 0"):
        plan_members(nodes, devices_per_node=0)


@pytest.mark.parametrize(
    "error",
    [
        remote_error("SparsityMismatch", "0.25 is not 0.3", "remote traceback"),
        remote_error("SomethingElse", "a remote type with no local class", ""),
        EnvNotFound("slicegpt", ["conda: not found"]),  # its __init__ takes other arguments than its message
        InputNotFound("the input /x is not there"),
    ],
    ids=["remote-twin", "remote-unknown", "local-other-init", "local-plain"],
)
def test_errors_cross_the_cluster_as_their_own_types(error):
    sent = pickle.loads(pickle.dumps(portable(error)))
    came = arrived(sent)
    assert type(came) is type(error) and str(came) == str(error) and vars(came) == vars(error)
    if isinstance(error, SparsityMismatch):
        assert isinstance(came, RemoteError) and came.remote_traceback == "remote traceback"
