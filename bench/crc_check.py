"""the CRC-32 check of a checkpoint's records: reading the ~1B checkpoint with it against without it.

Before loading a ``.pt``, slicebridge sums every record of its zip archive and compares the CRC-32
that torch.save recorded (``model.checkpoint.verify_archive_crcs``), since torch's reader does not:
without it, bytes damaged on disk load as silently wrong weights. This row is the price of that.

Baseline: ``torch.load`` of the checkpoint (every byte read into memory, page cache warm). Subject:
the CRC check, then the same ``torch.load``. Both run in one fresh slicegpt-env process per repeat,
in alternating order, so that both see the same page cache and the same load from other processes.

Bound: a check that only had to read the bytes: one pass of 64 MiB ``readinto`` over the file (page
cache warm), then the same ``torch.load``. There is no option to turn the check off: every cache-miss
load of a checkpoint in the server pays it once per file and process, and ``convert_1b``'s time
includes it.
"""

from __future__ import annotations

from common import (
    REPO,
    Context,
    Row,
    fmt_seconds,
    fmt_value,
    last_json,
    ratio_of_minimums,
    ratio_summary,
    read_through,
    run_python,
    summary,
)
from models import model_set

NAME = "crc_check"
SPARSITY = 0.25

SCRIPT = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import torch
from slicebridge.model.checkpoint import verify_archive_crcs

path, crc_first = Path(sys.argv[1]), sys.argv[3] == "1"

def load():
    started = time.perf_counter()
    torch.load(path, map_location="cpu", weights_only=True)
    return time.perf_counter() - started

def check():
    started = time.perf_counter()
    verify_archive_crcs(path)
    return time.perf_counter() - started

def read():
    buffer = bytearray(64 << 20)
    started = time.perf_counter()
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass
    return time.perf_counter() - started

if crc_first:
    crc = check(); checked_load = load(); plain = load(); read_s = read()
else:
    read_s = read(); plain = load(); crc = check(); checked_load = load()
print(json.dumps({"plain": plain, "crc": crc, "checked": crc + checked_load, "read": read_s}))
"""


def run(ctx: Context) -> list[Row]:
    reps = ctx.reps(5, smoke=2)
    ckpt = model_set(ctx.cache_dir, ctx.big_preset, [SPARSITY], log=ctx.log).checkpoint(SPARSITY)
    size = ckpt.stat().st_size
    read_through(ckpt)
    plain, checked, crc, read = [], [], [], []
    for rep in range(reps):
        _, out = run_python(ctx.env_python, SCRIPT, str(ckpt), str(REPO), "1" if rep % 2 else "0")
        measured = last_json(out)
        plain.append(measured["plain"])
        checked.append(measured["checked"])
        crc.append(measured["crc"])
        read.append(measured["read"])
        ctx.log(
            f"   rep {rep + 1}/{reps}: torch.load {plain[-1]:.3f}s, CRC check {crc[-1]:.3f}s + torch.load, "
            f"one read pass {read[-1]:.3f}s"
        )
    crc_median = summary(crc)["median"]
    row = Row(
        bench=NAME,
        name=NAME,
        what=f"CRC-32 check of every record, then torch.load, of the {ctx.big_preset} checkpoint "
        f"({size / 1024**2:,.0f} MB), page cache warm",
        baseline="torch.load of the same checkpoint in the same process, no check",
        unit="s",
        subject=summary(checked),
        baseline_measured=summary(plain),
        ratio={**ratio_summary(checked, plain), "definition": "(check + torch.load) / torch.load"},
        target={
            "text": "report (the price of refusing damaged checkpoints)",
            "metric": "ratio",
            "op": None,
            "value": None,
        },
        absolute={
            "crc_s": summary(crc),
            "crc_GB_per_second": size / 1e9 / crc_median if crc_median > 0 else 0.0,
            "checkpoint_bytes": size,
            "ratio_of_minimums": ratio_of_minimums(checked, plain),
            "read_pass_s": summary(read),
            "read_GB_per_second": size / 1e9 / summary(read)["median"],
        },
        notes=[
            "the check runs once per file and server process (a file unchanged since is not summed again); "
            "a convert's own load stays memory-mapped, so against a whole convert the check adds "
            "crc_s and nothing else."
        ],
    )
    bound = [r + p for r, p in zip(read, plain, strict=True)]
    row.against_bound(
        "one read pass over the file (64 MiB readinto, page cache warm) + the same torch.load",
        bound,
        {"text": "report", "conditions": []},
        definition="(check + torch.load) / (read pass + torch.load)",
        crc_over_read=crc_median / summary(read)["median"],
    ).judge()
    row.analysis.append(
        f"the check sums {fmt_value(size, 'B')} in {fmt_seconds(crc_median)} "
        f"({row.absolute['crc_GB_per_second']:.2f} GB/s, zlib on up to 8 threads over a read-only mapping); one "
        f"plain read pass over the same pages takes {fmt_seconds(summary(read)['median'])} "
        f"({row.absolute['read_GB_per_second']:.2f} GB/s): the check costs "
        f"{crc_median / summary(read)['median']:.1f}× a read."
    )
    return [row]
