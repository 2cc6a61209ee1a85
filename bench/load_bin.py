"""load a .bin in the base env: a plain ``torch.load(p)`` after ``import slicebridge``, against safetensors.

Evaluation code loads a model with ``torch.load(path)``, torch's default ``weights_only=True`` since 2.6.
After ``import slicebridge`` that loads our ``.bin`` (its two rebuild functions are allowed in torch's
weights_only unpickler: ``model.binfile.allow_rebuild_functions``) and gives the model object and the
tokenizer. Baseline: the same tensors from a safetensors file (``safetensors.torch.load_file``), a dict of
tensors and nothing else, memory-mapped: its pages are read when the tensors are first used, so it is a
report, not a peer of a load that copies. Its like is ``torch.load(p, mmap=True)``, timed too. Bound: the
``.bin``'s bytes read once into new memory (``torch.empty``, then ``readinto``), what any load that gives
tensors of their own costs at least. Both files are in the page cache (read once before timing),
everything runs in this process, measured in turn. One ``torch.load`` is profiled (cProfile) to split
its time between reading the tensors and the rebuild functions (model, tokenizer).
"""

from __future__ import annotations

import cProfile
import gc
import pstats
import time
from pathlib import Path

from common import (
    Context,
    Row,
    dir_bytes,
    drop_file,
    fmt_seconds,
    ratio_of_minimums,
    ratio_summary,
    read_through,
    summary,
)
from models import model_set

NAME = "load_bin"
SPARSITY = 0.25
BOUND_RATIO = 1.3  # torch.load of the .bin ≤ 1.3× reading its bytes into new memory

# The functions one torch.load's time is split between (cProfile's cumulative time of each).
PROFILED = {
    "rebuild_model": "rebuild_model (checks, then the model around the loaded tensors)",
    "_check_model_recipe": "of which the recipe's checks",
    "build_model": "of which building the model",
    "rebuild_tokenizer": "rebuild_tokenizer (files to a temp dir, AutoTokenizer)",
}


def run(ctx: Context) -> list[Row]:
    import safetensors.torch
    import torch

    reps = ctx.reps(5, smoke=2)
    models = model_set(ctx.cache_dir, ctx.big_preset, [SPARSITY], log=ctx.log)
    out_dir = ctx.scratch(NAME)
    bin_path, st_path = out_dir / "model.bin", out_dir / "model.safetensors"
    ctx.bridge().convert(models.checkpoint(SPARSITY), bin_path, overwrite=True)
    contents = torch.load(bin_path)  # plain: weights_only=True, as evaluation code calls it
    state = {name: tensor.detach().clone() for name, tensor in contents["model"].state_dict().items()}
    safetensors.torch.save_file(state, st_path)
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    del contents, state
    for path in (bin_path, st_path):
        read_through(path)

    baseline, subject, bound, mapped = [], [], [], []
    for rep in range(reps):
        baseline.append(_timed(lambda: safetensors.torch.load_file(st_path)))
        subject.append(_timed(lambda: torch.load(bin_path)))
        bound.append(_timed(lambda: _read_into(bin_path)))
        mapped.append(_timed(lambda: torch.load(bin_path, mmap=True)))
        ctx.log(
            f"   rep {rep + 1}/{reps}: torch.load {subject[-1]:.3f}s, read the bytes {bound[-1]:.3f}s, "
            f"load_file {baseline[-1]:.3f}s, torch.load(mmap=True) {mapped[-1]:.3f}s"
        )
    split = _profiled_load(bin_path)
    absolute = {
        "torch_load_mmap_s": summary(mapped),
        "bin_bytes": dir_bytes(bin_path),
        "safetensors_bytes": dir_bytes(st_path),
        "tensor_bytes": tensor_bytes,
    }
    drop_file(out_dir)
    return [_row(ctx, subject, baseline, bound, split, absolute)]


def _timed(load) -> float:
    """Seconds of one load; what it gave is freed before the next one."""
    started = time.perf_counter()
    loaded = load()
    seconds = time.perf_counter() - started
    del loaded
    gc.collect()
    return seconds


def _read_into(path: Path):
    """The file's bytes, read once into new memory (allocated as torch allocates a storage: not touched before)."""
    import torch

    buffer = torch.empty(path.stat().st_size, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as fh:
        fh.readinto(buffer.numpy())
    return buffer


def _profiled_load(path: Path) -> dict[str, float]:
    """One plain torch.load under cProfile: its total and the cumulative seconds of the ``PROFILED`` functions."""
    import torch

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.runcall(torch.load, path)
    total = time.perf_counter() - started
    gc.collect()
    stats = pstats.Stats(profiler).stats  # {(file, line, function): (calls, prim, tottime, cumtime, callers)}
    split = {"total_under_cprofile": total}
    for (_, _, function), (_, _, _, cumulative, _) in stats.items():
        if function in PROFILED:
            split[function] = split.get(function, 0.0) + cumulative
    return split


def _row(ctx: Context, subject, baseline, bound, split, absolute) -> Row:
    med = lambda xs: summary(xs)["median"]  # noqa: E731
    row = Row(
        bench=NAME,
        name=NAME,
        what=f"load a .bin in the base env: torch.load(p) of the {ctx.big_preset} model's .bin after import "
        f"slicebridge ({absolute['bin_bytes'] / 2**20:,.0f} MB; gives the model and the tokenizer), page cache warm",
        baseline="safetensors.torch.load_file of the same tensors (a dict of tensors, memory-mapped: read on first "
        "use), page cache warm",
        unit="s",
        subject=summary(subject),
        baseline_measured=summary(baseline),
        ratio={**ratio_summary(subject, baseline), "definition": "torch.load time / load_file time"},
        target={"text": "report (a copying load against a mapping one)", "metric": "ratio", "op": None, "value": None},
        absolute=absolute,
        breakdown={"one_load_under_cprofile_s": split},
    )
    row.against_bound(
        "read the .bin's bytes once into new memory (torch.empty + readinto), page cache warm",
        bound,
        {"text": f"≤ {BOUND_RATIO}× bound", "conditions": [{"metric": "ratio", "op": "<=", "value": BOUND_RATIO}]},
        definition="torch.load time / read time",
        ratio_of_minimums=ratio_of_minimums(subject, bound),
    ).judge()
    rebuilt = split.get("rebuild_model", 0.0) + split.get("rebuild_tokenizer", 0.0)
    parts = "; ".join(f"{text} {fmt_seconds(split[name])}" for name, text in PROFILED.items() if name in split)
    row.analysis += [
        f"one torch.load under cProfile took {fmt_seconds(split['total_under_cprofile'])}: {parts}; the rest, "
        f"{fmt_seconds(split['total_under_cprofile'] - rebuilt)}, is torch's unpickler reading the tensors' "
        f"records out of the zip into new memory, which reading the .bin's bytes alone does in "
        f"{fmt_seconds(med(bound))}.",
        f"load_file returns in {fmt_seconds(med(baseline))} because it maps the file: the copy a plain torch.load "
        f"makes is deferred to the first use of each page. torch.load(p, mmap=True) maps the .bin the same way "
        f"and returns the model and tokenizer in {fmt_seconds(absolute['torch_load_mmap_s']['median'])}.",
    ]
    return row
