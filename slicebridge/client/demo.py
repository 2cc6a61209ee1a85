"""``slicebridge demo`` (``make demo``): the main job, end to end, on a small embedded model.

1. Build a small dense model of every family SliceGPT slices (Llama, OPT, Phi-2, Phi-3) with
   random weights and a tokenizer trained on embedded text.
2. Slice each with our SliceGPT implementation (the run_slicegpt layout): the Llama at two
   sparsities, the others at one.
3. Through ONE warm server in the slicegpt env: convert each to ``.bin``, export each as a
   Hugging Face directory, verify every artifact in this env, print ``info``.
4. Show what this env and the server run on, and a summary table (one row per checkpoint).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from slicebridge.client.bridge import Bridge
from slicebridge.client.progress import ProgressPrinter

# Which families the demo slices, at which sparsities.
RUNS = (("llama", (0.25, 0.5)), ("opt", (0.25,)), ("phi2", (0.25,)), ("phi3", (0.25,)))


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(env: str, workdir: str | None = None, preset: str = "small") -> int:
    import torch
    import transformers

    started = time.perf_counter()
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="slicebridge-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    checkpoints = _make_checkpoints(root, preset)

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
        for family, checkpoint in checkpoints:
            name = f"{family}-{checkpoint.name.removeprefix('sliced-')}"
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
            _say(f"   {name}: {converted.family}, {converted.output}, {exported.output}")
        _say()
        _say("== 4. info of the OPT .bin (read in this env, no server needed)")
        _say(bridge.info(next(row[1].output for row in rows if row[1].family == "opt")).table())
        _say()
        _say("== verification of the first export in this env")
        _say(rows[0][4]["export"].table())

    _say()
    _say(
        f"{'checkpoint':16s}{'family':>7s}{'actual ratio':>13s}{'convert+export s':>18s}{'cached':>8s}"
        f"{'verify .bin':>13s}{'verify export':>15s}"
    )
    for name, converted, exported, seconds, checks in rows:
        verdict = {k: ("PASS" if r.passed else "FAIL") + f" {r.inputs[0]['nmse']:.1e}" for k, r in checks.items()}
        _say(
            f"{name:16s}{converted.family:>7s}{converted.actual_ratio:13.4f}{seconds:18.2f}{str(exported.cache_hit):>8s}"
            f"{verdict['bin']:>13s}{verdict['export']:>15s}"
        )
    passed = all(r.passed for *_, checks in rows for r in checks.values())
    _say(f"\nartifacts in {root}; demo {'passed' if passed else 'FAILED'} in {time.perf_counter() - started:.1f}s")
    return 0 if passed else 1


def _make_checkpoints(root: Path, preset: str) -> list[tuple[str, Path]]:
    """Steps 1 and 2: a dense model of every family, sliced; (family, run_slicegpt save dir) pairs.

    ``preset`` sizes every family's model; a size a family does not have (``1b``, Llama only)
    gives it the ``small`` one.
    """
    from slicebridge.model.dense import PRESETS_BY_FAMILY, make_dense_preset
    from slicebridge.model.slicing import slice_model

    _say(f"== 1. a dense model of every family (random weights) in {root}, 2. sliced with our SliceGPT")
    checkpoints = []
    for family, sparsities in RUNS:
        size = preset if preset in PRESETS_BY_FAMILY[family] else "small"
        dense = make_dense_preset(root / f"dense-{family}", size, family=family)
        for sparsity in sparsities:
            checkpoints.append((family, slice_model(dense, root / family / f"sliced-{sparsity}", sparsity=sparsity)))
        _say(f"   {family:6s} {size} preset, sliced at sparsity {', '.join(map(str, sparsities))}")
    return checkpoints
