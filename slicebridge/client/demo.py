"""``slicebridge demo`` (``make demo``): the main job, end to end, on a small embedded model.

1. Build a small dense Llama with random weights and a tokenizer trained on embedded text.
2. Slice it with our SliceGPT implementation at two sparsities (the run_slicegpt layout).
3. Through ONE warm server in the slicegpt env: convert both to ``.bin``, export both as
   Hugging Face directories, verify all four artifacts in this env, print ``info``.
4. Show what this env and the server run on, and a summary table.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from slicebridge.client.bridge import Bridge
from slicebridge.client.progress import ProgressPrinter

SPARSITIES = (0.25, 0.5)


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(env: str, workdir: str | None = None, preset: str = "small") -> int:
    import torch
    import transformers

    from slicebridge.model.dense import make_dense_preset
    from slicebridge.model.slicing import slice_llama

    started = time.perf_counter()
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="slicebridge-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    _say(f"== 1. a dense Llama ({preset} preset, random weights) in {root / 'dense'}")
    dense = make_dense_preset(root / "dense", preset)
    _say(f"== 2. slicing it at sparsity {', '.join(map(str, SPARSITIES))} with our SliceGPT")
    checkpoints = []
    for sparsity in SPARSITIES:
        out = slice_llama(
            dense, root / f"sliced-{sparsity}", sparsity=sparsity, model_name="meta-llama/Meta-Llama-3-demo"
        )
        checkpoints.append(out)
        _say(f"   {out}")

    _say("== 3. one warm server in the slicegpt env")
    with Bridge(env=env) as bridge:
        hello = bridge.server_hello
        _say(
            f"   server pid {hello.pid}: python {hello.python}, torch {hello.versions['torch']}, "
            f"transformers {hello.versions['transformers']}, slicegpt {hello.versions['slicegpt'] or '-'}, "
            f"device {hello.device}"
        )
        _say(
            f"   this env:   python {sys.version.split()[0]}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}"
        )
        rows = []
        for checkpoint in checkpoints:
            name = checkpoint.name
            progress = ProgressPrinter(name)
            t0 = time.perf_counter()
            converted = bridge.convert(checkpoint, root / f"{name}.bin", overwrite=True, on_event=progress)
            exported = bridge.export(checkpoint, root / f"{name}-hf", overwrite=True, on_event=progress)
            seconds = time.perf_counter() - t0
            checks = {
                kind: bridge.verify(path, checkpoint)
                for kind, path in (("bin", converted.output), ("export", exported.output))
            }
            progress.close()
            rows.append((name, converted, exported, seconds, checks))
        _say()
        _say("== 4. info of the first .bin (read in this env, no server needed)")
        _say(bridge.info(rows[0][1].output).table())
        _say()
        _say("== verification of the first export in this env")
        _say(rows[0][4]["export"].table())

    _say()
    _say(
        f"{'checkpoint':24s}{'actual ratio':>13s}{'convert+export s':>18s}{'cached':>8s}"
        f"{'verify .bin':>13s}{'verify export':>15s}"
    )
    for name, converted, exported, seconds, checks in rows:
        verdict = {k: ("PASS" if r.passed else "FAIL") + f" {r.inputs[0]['nmse']:.1e}" for k, r in checks.items()}
        _say(
            f"{name:24s}{converted.actual_ratio:13.4f}{seconds:18.2f}{str(exported.cache_hit):>8s}"
            f"{verdict['bin']:>13s}{verdict['export']:>15s}"
        )
    passed = all(r.passed for *_, checks in rows for r in checks.values())
    _say(f"\nartifacts in {root}; demo {'passed' if passed else 'FAILED'} in {time.perf_counter() - started:.1f}s")
    return 0 if passed else 1
