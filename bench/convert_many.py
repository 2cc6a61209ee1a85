"""convert N checkpoints of the tiny model: a warm bridge against a fresh process per checkpoint.

Baseline (the seed's workflow): for every checkpoint, spawn the slicegpt env's python and do what
the seed's per-checkpoint script does with the same data: import torch and transformers, load the
checkpoint's tensors (``torch.load``), the base config and the tokenizer, and ``torch.save`` a dict
with them (with dill, as the seed does). It builds no model object, so it is a lower bound of the
seed's script (which also imports slicegpt and builds the model through its adapters).

Bridge: one server, started and warmed up (one convert served) before timing; every timed pass
converts all N checkpoints into portable ``.bin`` files with cache misses only (the checkpoints'
mtimes are bumped before each pass, which changes the warm cache's key). The same N converts with
cache hits are reported too.
"""

from __future__ import annotations

import os
import time

from common import Context, Row, drop_file, ratio_summary, run_python, summary
from models import model_set

NAME = "convert_many"

SPARSITIES = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]

SEED_SCRIPT = r"""
import sys, time
import torch, transformers
from transformers import AutoConfig, AutoTokenizer
try:
    import dill as pickle_module
except ImportError:
    import pickle as pickle_module
pt, base, out = sys.argv[1:4]
state = torch.load(pt, map_location="cpu", weights_only=True)
config = AutoConfig.from_pretrained(base)
tokenizer = AutoTokenizer.from_pretrained(base)
torch.save({"model": state, "tokenizer": tokenizer, "config": config.to_dict(), "method": "SliceGPT",
            "pruning_ratio": float(pt.rsplit("_", 1)[1][:-3])}, out, pickle_module=pickle_module)
"""


def run(ctx: Context) -> list[Row]:
    n = 2 if ctx.smoke else 8
    reps = ctx.reps(3, smoke=1)
    models = model_set(ctx.cache_dir, "tiny", SPARSITIES[:n], log=ctx.log)
    checkpoints = [models.checkpoint(s) for s in SPARSITIES[:n]]
    out_dir = ctx.scratch(NAME)
    bridge = ctx.bridge()

    # Warm-up: one convert so that the server has imported what convert needs.
    warm_out = out_dir / "warmup.bin"
    t0 = time.perf_counter()
    bridge.convert(checkpoints[0], warm_out, overwrite=True)
    first_convert = time.perf_counter() - t0

    baseline, miss, hit = [], [], []
    for rep in range(reps):
        # Baseline: a fresh process per checkpoint.
        started = time.perf_counter()
        for i, ckpt in enumerate(checkpoints):
            run_python(ctx.env_python, SEED_SCRIPT, str(ckpt), str(ckpt.parent), str(out_dir / f"seed-{i}.bin"))
        baseline.append(time.perf_counter() - started)
        # Bridge, cache misses: new mtimes make new cache keys.
        for ckpt in checkpoints:
            os.utime(ckpt)
        started = time.perf_counter()
        for i, ckpt in enumerate(checkpoints):
            result = bridge.convert(ckpt, out_dir / f"bridge-{i}.bin", overwrite=True)
            assert not result.cache_hit
        miss.append(time.perf_counter() - started)
        # Bridge, cache hits.
        started = time.perf_counter()
        for i, ckpt in enumerate(checkpoints):
            bridge.convert(ckpt, out_dir / f"bridge-{i}.bin", overwrite=True)
        hit.append(time.perf_counter() - started)
        ctx.log(
            f"   rep {rep + 1}/{reps}: baseline {baseline[-1]:.2f}s, bridge {miss[-1]:.3f}s (cache hits {hit[-1]:.3f}s)"
        )

    # Where one bridge convert's time goes (server-side timings of a cache miss).
    os.utime(checkpoints[0])
    detail = bridge.convert(checkpoints[0], out_dir / "detail.bin", overwrite=True)
    drop_file(out_dir)

    row = Row(
        bench=NAME,
        name=NAME,
        what=f"convert {n} tiny checkpoints (fp16, {n} sparsities)",
        baseline="a fresh slicegpt-env process per checkpoint: import torch+transformers, torch.load, "
        "config+tokenizer, torch.save (dill)",
        unit="s",
        subject=summary(miss),
        baseline_measured=summary(baseline),
        ratio={**ratio_summary(miss, baseline, invert=True), "definition": "baseline time / bridge time (speed-up)"},
        target={"text": "warm bridge ≥ 20× faster", "metric": "ratio", "op": ">=", "value": 20.0},
        absolute={
            "per_checkpoint_bridge_s": summary([m / n for m in miss])["median"],
            "per_checkpoint_baseline_s": summary([b / n for b in baseline])["median"],
            "bridge_cache_hits_s": summary(hit),
            "first_convert_on_fresh_server_s": first_convert,
            "n_checkpoints": n,
        },
        breakdown={"server_timings_one_miss_s": detail.timings},
    ).judge()
    if miss:
        t = detail.timings
        row.analysis.append(
            f"one cache-miss convert takes {t['total'] * 1e3:.0f} ms in the server (load {t['load'] * 1e3:.0f} ms, "
            f"save {t['save'] * 1e3:.0f} ms); the baseline's per-checkpoint cost is dominated by interpreter start "
            "and the torch+transformers imports, which the bridge pays once."
        )
    return [row]
