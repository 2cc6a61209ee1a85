"""Scale-out: a pool of warm servers on one machine, and the Ray path's cost per item.

``pool_cpu``: the tiny checkpoints of ``convert_many``, converted on a 2-server CPU pool
(``devices=["cpu", "cpu"]``) against a 1-member pool (one server, the same dispatch), measured
alternately. Every member is warmed up (one convert each) before timing, and every timed pass has
cache misses only (the checkpoints' mtimes are bumped before it). On a machine with few cores the
two servers share them, so this row shows what the pool costs, not a speed-up.

``ray_overhead``: the same cheap items (a ``ping`` of the member's server each) run through a
``RayPool(address="local")`` of one member against the local 1-member pool; the per-item time of
each and their difference. Skipped, with a note on ``pool_cpu``, when Ray is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from common import Context, Row, drop_file, ratio_summary, summary
from convert_many import SPARSITIES
from models import model_set

from slicebridge.client.pool import Pool, WorkItem, WorkResult

NAME = "pool"


def convert_job(bridge, device: str, payload: dict) -> bool:
    """A pool's job: convert one checkpoint on the member's device; whether it was a cache hit."""
    return bridge.convert(payload["checkpoint"], payload["output"], device=device, overwrite=True).cache_hit


def ping_job(bridge, device: str, payload: dict) -> float:
    """A pool's job that costs the server next to nothing: one ``ping``; its round trip in seconds."""
    return bridge.ping()


def run(ctx: Context) -> list[Row]:
    env = str(ctx.env_prefix)
    with Pool(env, devices=["cpu"]) as single, Pool(env, devices=["cpu", "cpu"]) as double:
        rows = [_pool_cpu(ctx, single, double)]
        if importlib.util.find_spec("ray") is None:
            rows[0].notes.append("ray_overhead skipped: Ray is not installed in the base env (slicebridge[ray])")
        else:
            rows.append(_ray_overhead(ctx, env, single))
    return rows


def _warm_up(pool: Pool, items: list[WorkItem]) -> None:
    """One convert on every member at once, so that each server has imported what convert needs."""
    with ThreadPoolExecutor(max_workers=len(pool.members)) as calling:
        for member, item in zip(pool.members, items, strict=False):
            calling.submit(convert_job, member.bridge, member.device, item.payload)


def _timed_pass(pool: Pool, items: list[WorkItem], checkpoints: list) -> tuple[float, list[WorkResult]]:
    """Bump the mtimes (new cache keys), then run every item; (seconds, results)."""
    for checkpoint in checkpoints:
        os.utime(checkpoint)
    started = time.perf_counter()
    results = pool.run(items, convert_job)
    seconds = time.perf_counter() - started
    failed = [result.error for result in results if not result.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} convert(s) failed on the pool: {failed[0]}")
    assert not any(result.value for result in results), "a timed pass had a cache hit"
    return seconds, results


def _pool_cpu(ctx: Context, single: Pool, double: Pool) -> Row:
    n = 2 if ctx.smoke else 8
    reps = ctx.reps(5, smoke=1)
    models = model_set(ctx.cache_dir, "tiny", SPARSITIES[:n], log=ctx.log)
    checkpoints = [models.checkpoint(s) for s in SPARSITIES[:n]]
    out_dir = ctx.scratch("pool_cpu")
    items = [
        WorkItem(str(c), {"checkpoint": str(c), "output": str(out_dir / f"out-{i}.bin")})
        for i, c in enumerate(checkpoints)
    ]
    _warm_up(single, items)
    _warm_up(double, items)
    one, two, spread = [], [], {}
    for rep in range(reps):
        one.append(_timed_pass(single, items, checkpoints)[0])
        seconds, results = _timed_pass(double, items, checkpoints)
        two.append(seconds)
        spread = {member.name: sum(r.member == member.name for r in results) for member in double.members}
        ctx.log(f"   rep {rep + 1}/{reps}: one server {one[-1]:.3f}s, two servers {two[-1]:.3f}s ({spread})")
    drop_file(out_dir)
    cpus = os.cpu_count()
    row = Row(
        bench=NAME,
        name="pool_cpu",
        what=f"convert {n} tiny checkpoints (cache misses) on a 2-server CPU pool (devices=['cpu', 'cpu'])",
        baseline="the same items on a 1-member pool (one server), warm, measured alternately",
        unit="s",
        subject=summary(two),
        baseline_measured=summary(one),
        ratio={**ratio_summary(two, one, invert=True), "definition": "one-server time / two-server time (speed-up)"},
        target={"text": "report (two servers on few cores: ≤ 1× expected for compute-bound items)", "op": None},
        absolute={
            "per_item_one_server_s": summary([t / n for t in one])["median"],
            "per_item_two_servers_s": summary([t / n for t in two])["median"],
            "items_per_member_last_pass": spread,
            "n_checkpoints": n,
            "cpus": cpus,
        },
    ).judge()
    row.notes.append(
        f"this machine has {cpus} CPUs and the two servers share them (each with cores // 2 threads): what "
        "overlaps is the part of a convert that is not compute (reading, writing, messaging), so the speed-up is "
        "bounded by min(2, cores) and falls to ≤ 1× for compute-bound items; on N GPUs each server has its own device"
    )
    return row


def _ray_overhead(ctx: Context, env: str, local: Pool) -> Row:
    from slicebridge.client.ray_pool import RayPool, ray_module

    ray_module().cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the nodes cannot import bench/
    n = 30 if ctx.smoke else 200
    reps = ctx.reps(5, smoke=2)
    items = [WorkItem("ping", {}) for _ in range(n)]
    started = time.perf_counter()
    with RayPool(env, address="local") as ray_pool:
        ray_start = time.perf_counter() - started
        ray_pool.run(items[:1], ping_job)  # warm-up: the job's first trip to the actor
        local.run(items[:1], ping_job)
        on_local, on_ray = [], []
        for rep in range(reps):
            for pool, times in ((local, on_local), (ray_pool, on_ray)):
                began = time.perf_counter()
                results = pool.run(items, ping_job)
                times.append((time.perf_counter() - began) / n)
                assert all(result.ok for result in results), [r.error for r in results if not r.ok][:1]
            ctx.log(f"   rep {rep + 1}/{reps}: local pool {on_local[-1] * 1e3:.2f} ms/item, Ray {on_ray[-1] * 1e3:.2f}")
    overhead = summary([r - p for r, p in zip(on_ray, on_local, strict=True)])
    return Row(
        bench=NAME,
        name="ray_overhead",
        what=f"{n} ping items through RayPool(address='local'), one member, per item",
        baseline=f"the same {n} items through the local 1-member pool, per item, measured alternately",
        unit="s",
        subject=summary(on_ray),
        baseline_measured=summary(on_local),
        ratio={**ratio_summary(on_ray, on_local), "definition": "Ray per-item time / local pool per-item time"},
        target={"text": "report", "op": None},
        absolute={
            "overhead_per_item_ms": overhead["median"] * 1e3,
            "ray_start_with_member_s": ray_start,
            "n_items": n,
        },
        notes=[
            "the Ray pool's start (ray.init of a private instance, its actor, the actor's server) is paid once per "
            "batch: it is ray_start_with_member_s, not in the per-item figures"
        ],
    ).judge()
