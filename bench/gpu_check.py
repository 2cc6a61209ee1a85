"""The GPU check (issue 16): the warm server on a GPU, every family through it, and what only a GPU can measure.

``bench/gpu_check.sh`` makes the two envs and runs the tests marked ``gpu`` first, then this driver, in the base
env. It writes ``gpu.md`` and ``gpu.json`` into ``--out``, each figure with the command that produced it:

- envs: both envs' versions and the CUDA devices each sees;
- families: a tiny model of each family (made here: ``model.dense`` + our maker) converted, exported and verified
  through one warm server on ``--device``, in fp16 and in bf16, each artifact loaded on the CPU here;
- slicing: the server slices a tiny dense model of each family on ``--device`` (``slice`` request, verified);
- scale: a ~1B (TinyLlama's shape) and a ~7B-shaped (Llama-2-7B's) Llama sliced at 0.25, random weights drawn
  here in the sliced shapes (no dense model, no slicing: only the convert is timed): a fresh server's start, the
  cold convert (a cache miss: load and save) and the warm one (a hit: save only), the device memory the warm
  model holds against its bytes, and the 7B-shaped model verified (the artifact on ``--device`` here too);
- does not fit: the warm server asked for the 7B-shaped model's fp32 copy with room for half of its fp16 bytes (on a
  GPU this process takes the rest of the device's free memory; on the CPU the server's address space is capped as
  tight), which must fail as a typed ``OutOfMemory``, with the server still serving its warm model and the memory
  the attempt took given back.

    python bench/gpu_check.py --env ENV --device cuda:0 --out DIR    # the GPU run (~1B and ~7B-shaped)
    python bench/gpu_check.py --env ENV --dry-run --out DIR          # the same steps on cpu, tiny sizes

The exit status is 0 when every check held; gpu.md and gpu.json are written after each section, so that a run cut
short keeps what it measured. Outputs are written under ``--work`` (default: ``/dev/shm`` when it has room for the
biggest model twice over, else the temp dir) and removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slicebridge import Bridge
from slicebridge.bridge.errors import RemoteOutOfMemory
from slicebridge.model import portable
from slicebridge.model.checkpoint import SlicedWidths, sliced_width
from slicebridge.model.dense import (
    PRESETS,
    dense_config_dict,
    make_dense_preset,
    save_tokenizer,
    train_byte_level_bpe,
    write_json,
)
from slicebridge.model.families import BY_KEY
from slicebridge.model.sample_text import embedded_text
from slicebridge.model.slicing import slice_model

log = logging.getLogger(__name__)

FAMILIES = ("llama", "opt", "phi2", "phi3")
DTYPES = ("float16", "bfloat16")
SPARSITY = 0.25
ROUND_INTERVAL = 8
GB = 1024**3
# Llama-2-7B's shape (the "1b" preset is TinyLlama's): 6.7B dense, 5.7B once sliced at 0.25 (11.4 GB in fp16).
LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    vocab_size=32000,
    rope_theta=10000.0,
    max_position_embeddings=4096,
)
# The dry run's stand-in for it: 57 MB, whose fp32 copy holds tensors above glibc's largest mmap threshold (32 MiB),
# so that a capped address space refuses them whatever free heap the server has kept.
DRY_7B = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_layers=2,
    num_heads=8,
    num_kv_heads=8,
    vocab_size=32000,
    rope_theta=10000.0,
    max_position_embeddings=512,
)
# The two sizes the scale section converts: on the GPU, and (their stand-ins) in the dry run.
SCALES = {"gpu": {"1b": PRESETS["1b"], "7b": LLAMA_7B}, "dry": {"1b": PRESETS["tiny"], "7b": DRY_7B}}
# How long the does-not-fit check waits before it reads the memory the server holds a second time.
SETTLE_S = 1.0
# A slice request small enough for tiny models (run_slicegpt's dtype, fp16).
SLICE_OPTIONS = dict(cal_nsamples=8, cal_batch_size=4, cal_max_seqlen=64, ppl_eval_seqlen=64, dtype="fp16")
PACKAGES = ("torch", "transformers", "tokenizers", "huggingface_hub", "safetensors", "zmq", "dill", "msgpack", "numpy")
FACTS_CODE = f"""
import importlib, json, sys
facts = {{"python": sys.version.split()[0], "executable": sys.executable, "prefix": sys.prefix}}
for name in {PACKAGES!r}:
    try:
        facts[name] = importlib.import_module(name).__version__
    except Exception:
        facts[name] = None
import torch
facts["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(json.dumps(facts))
"""


@dataclass
class Plan:
    """What one run does and where."""

    env: str  # the slicegpt env (prefix or python)
    device: str  # where the server computes: cuda:0, or cpu in the dry run
    scales: dict[str, dict[str, Any]]  # label -> the Llama shape the scale section converts
    work: Path  # scratch outputs (removed at the end)
    command: str  # how this run was invoked, quoted in gpu.md
    dry_run: bool

    def call(self, text: str) -> str:
        """A client call as gpu.md quotes it, with this run's device."""
        return text.replace("DEVICE", repr(self.device))


# ------------------------------------------------------------------------------------------------ envs


def env_facts(python: str) -> dict[str, Any]:
    """Versions of the packages that matter, and the CUDA devices, as ``python`` (isolated) sees them."""
    done = subprocess.run([python, "-I", "-c", FACTS_CODE], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def env_python(env: str) -> str:
    path = Path(env).expanduser().absolute()
    return str(path / "bin" / "python") if path.is_dir() else str(path)


def check_envs(env: str, need_cuda: bool) -> dict[str, Any]:
    """Both envs' facts, logged; ``ok`` when each imports everything, the slicegpt env has transformers 4.41.0 and
    (``need_cuda``) each sees a CUDA device."""
    facts: dict[str, Any] = {"base": env_facts(sys.executable), "slicegpt": env_facts(env_python(env))}
    for side, seen in facts.items():
        log.info("%s env: %s", side, json.dumps(seen))
    sides = [facts["base"], facts["slicegpt"]]
    facts["ok"] = (
        all("error" not in seen and None not in seen.values() for seen in sides)
        and facts["slicegpt"].get("transformers") == "4.41.0"
        and (not need_cuda or all(seen.get("cuda") for seen in sides))
    )
    return facts


# ------------------------------------------------------------------------------------------------ models


def tiny_run(root: Path, family: str) -> tuple[Path, Path]:
    """The family's tiny dense model (its official fixture's shape, fp16) and a save dir of it sliced at SPARSITY by
    our maker, here: (dense dir, .pt)."""
    dense = make_dense_preset(root / f"{family}-dense", "tiny", family)
    (checkpoint,) = slice_model(dense, root / f"{family}-run", sparsity=SPARSITY).glob("*.pt")
    return dense, checkpoint


def synthetic_run(root: Path, label: str, shape: dict[str, Any], device: str) -> Path:
    """A run_slicegpt save dir of a Llama of ``shape`` sliced at SPARSITY with random fp16 weights: config.json and a
    tokenizer, ``{name}_{SPARSITY}.pt`` and its SlicingConfig ``.json``. The tensors are drawn in the sliced shapes
    directly, on ``device`` (where drawing billions is fast), with std ``fan_in ** -0.5`` so that activations stay
    of order one through the layers. Returns the ``.pt``."""
    run = root / f"llama-{label}"
    run.mkdir(parents=True)
    config = dense_config_dict("llama", dtype=torch.float16, initializer_range=0.02, **shape)
    write_json(run / "config.json", config)
    save_tokenizer(train_byte_level_bpe(embedded_text(), config["vocab_size"]), run)
    family, hidden = BY_KEY["llama"], config["hidden_size"]
    widths = SlicedWidths.constant(config["num_hidden_layers"], sliced_width(hidden, SPARSITY, ROUND_INTERVAL), hidden)
    slicing_config = widths.as_slicing_config(hidden)
    sliced = portable.sliced_config(family, config, slicing_config, sparsity=SPARSITY, round_interval=ROUND_INTERVAL)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in portable.model_class(family)(sliced).state_dict().items()}
    generator = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, size in shapes.items():
        std = size[-1] ** -0.5 if len(size) == 2 else 0.02
        drawn = torch.empty(size, dtype=torch.float16, device=device).normal_(0.0, std, generator=generator)
        state[name] = drawn.to("cpu")
    stem = f"Llama-{label}-shaped_{SPARSITY}"
    torch.save(state, run / f"{stem}.pt")
    write_json(run / f"{stem}.json", slicing_config)
    return run / f"{stem}.pt"


def cached(bridge: Bridge, checkpoint: Path) -> list[dict[str, Any]]:
    """The server's warm-cache entries of ``checkpoint``."""
    real = os.path.realpath(checkpoint)
    return [entry for entry in bridge.cache_info().entries if entry["checkpoint"] == real]


def model_bytes(bridge: Bridge, checkpoint: Path) -> int:
    """The bytes of the warm model the server holds for ``checkpoint`` (its largest cache entry of it)."""
    return max((entry["bytes"] for entry in cached(bridge, checkpoint)), default=0)


# ------------------------------------------------------------------------------------------------ memory


def proc_status(pid: int) -> dict[str, int]:
    """The memory lines of /proc/<pid>/status, in bytes."""
    with open(f"/proc/{pid}/status") as fh:
        lines = [line.split(":") for line in fh if line.startswith(("Vm", "Rss"))]
    return {key: int(value.split()[0]) * 1024 for key, value in lines}


def nvidia_smi_used(pid: int) -> int | None:
    """The device memory nvidia-smi counts for process ``pid`` (its CUDA context included), in bytes."""
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    try:
        done = subprocess.run(query, capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    used = {int(p): int(mib) * 1024**2 for p, mib in (line.split(",") for line in done.stdout.strip().splitlines())}
    return used.get(pid, 0)  # not listed: no context yet


def held_memory(bridge: Bridge, device: str) -> dict[str, Any]:
    """The memory the server holds on ``device``: on a GPU its CUDA allocator's figures where the server reports them
    (``cache_info().devices``), else what nvidia-smi counts for its process; on the CPU its resident memory."""
    pid = bridge.server.pid
    if not device.startswith("cuda"):
        return {
            "source": "VmRSS of the server (/proc; a model on the CPU maps its checkpoint)",
            "held": proc_status(pid)["VmRSS"],
        }
    name = f"cuda:{device.partition(':')[2] or '0'}"
    reported = getattr(bridge.cache_info(), "devices", None) or {}
    if name in reported:
        figures = reported[name]
        return {
            "source": "torch.cuda.memory_allocated in the server",
            "held": figures["allocated"],
            "peak": figures["max_allocated"],
            "reserved": figures["reserved"],
        }
    return {"source": "nvidia-smi, the server's process (its CUDA context included)", "held": nvidia_smi_used(pid)}


@contextlib.contextmanager
def less_room(device: str, pid: int, room: int) -> Iterator[str]:
    """Leave the server about ``room`` bytes for new allocations on ``device`` while the block runs: on a GPU this
    process takes the rest of the device's free memory; on the CPU the server's address space is capped (its soft
    limit) at what it maps now plus ``room``. Everything is given back after. Yields how, in words."""
    if device.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(device)
        taken = torch.empty(max(free - room, 0), dtype=torch.uint8, device=device)
        try:
            yield f"this process took {taken.numel() / GB:.1f} GB of the device's {total / GB:.1f} GB"
        finally:
            del taken
            torch.cuda.empty_cache()
        return
    soft, hard = resource.prlimit(pid, resource.RLIMIT_AS)
    mapped = proc_status(pid)["VmSize"]
    resource.prlimit(pid, resource.RLIMIT_AS, (mapped + room, hard))
    try:
        yield f"the server's address space was capped at {(mapped + room) / GB:.2f} GB ({room / GB:.3f} GB free)"
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, (soft, hard))


# ------------------------------------------------------------------------------------------------ sections


def attempt(what: str, step, *args: Any) -> dict[str, Any]:
    """``step(*args)``, or its failure as a row (``error``, ``ok`` False): one failed step does not end the run."""
    try:
        return step(*args)
    except Exception as exc:
        log.exception("%s failed", what)
        return {"what": what, "error": f"{type(exc).__name__}: {exc}", "ok": False}


def verify_figures(report) -> dict[str, Any]:
    """What gpu.json keeps of a ``VerifyReport``."""
    return {
        "passed": report.passed,
        "compared_dtype": report.compared_dtype,
        "nmse": max((entry["nmse"] for entry in report.inputs), default=None),
        "top1": min((entry["top1"] for entry in report.inputs), default=None),
        "artifact_device": report.artifact_side.get("device"),
        "reference_device": report.reference_side.get("device"),
        "timings": report.timings,
        "failures": report.failures,
    }


def family_row(plan: Plan, bridge: Bridge, family: str, checkpoint: Path, dtype: str) -> dict[str, Any]:
    """Convert and export ``checkpoint`` on the device in ``dtype``; verify both, loaded on the CPU here."""
    stem = plan.work / f"{family}-{dtype}"
    started = time.perf_counter()
    converted = bridge.convert(checkpoint, f"{stem}.bin", device=plan.device, dtype=dtype)
    exported = bridge.export(checkpoint, stem, device=plan.device, dtype=dtype)
    verified = {
        kind: verify_figures(bridge.verify(path, checkpoint, device=plan.device, artifact_device="cpu"))
        for kind, path in (("bin", f"{stem}.bin"), ("export", stem))
    }
    row = {
        "family": family,
        "dtype": dtype,
        "server_device": [converted.device, exported.device],
        "artifact_dtype": [converted.dtype, exported.dtype],
        "verify": verified,
        "seconds": time.perf_counter() - started,
    }
    row["ok"] = (
        {converted.device, exported.device} == {plan.device}
        and {converted.dtype, exported.dtype} == {dtype}
        and all(figures["passed"] for figures in verified.values())
    )
    return row


def check_families(plan: Plan, bridge: Bridge, runs: dict[str, tuple[Path, Path]]) -> list[dict[str, Any]]:
    return [
        attempt(f"{family} {dtype}", family_row, plan, bridge, family, checkpoint, dtype)
        for family, (_, checkpoint) in runs.items()
        for dtype in DTYPES
    ]


def slice_row(plan: Plan, bridge: Bridge, family: str, dense: Path, calibration: Path) -> dict[str, Any]:
    """The server slices ``dense`` at SPARSITY on the device, converts the result there and verifies it here."""
    started = time.perf_counter()
    sweep = bridge.slice(
        dense,
        [SPARSITY],
        plan.work / f"{family}-sliced-on-device",
        calibration=calibration,
        device=plan.device,
        verify=True,
        **SLICE_OPTIONS,
    )
    (made,) = sweep.checkpoints
    return {
        "family": family,
        "slicer": sweep.result.slicer,
        "device": sweep.result.device,
        "dtype": sweep.result.dtype,
        "seconds": time.perf_counter() - started,
        "timings": made.timings,
        "ppl_dense": sweep.result.baseline_ppl,
        "ppl_sliced": made.ppl,
        "verified": sweep.verdict(SPARSITY),
        "ok": sweep.ok and sweep.result.device == plan.device and sweep.verdict(SPARSITY) == "pass",
    }


def check_slicing(plan: Plan, bridge: Bridge, runs: dict[str, tuple[Path, Path]], calibration: Path) -> list[dict]:
    return [
        attempt(f"slice {family}", slice_row, plan, bridge, family, dense, calibration)
        for family, (dense, _) in runs.items()
    ]


def timed_convert(plan: Plan, bridge: Bridge, checkpoint: Path, output: Path) -> dict[str, Any]:
    started = time.perf_counter()
    result = bridge.convert(checkpoint, output, device=plan.device, overwrite=True)
    return {
        "seconds": time.perf_counter() - started,
        "cache_hit": result.cache_hit,
        "device": result.device,
        "server_timings": result.timings,
        "bytes": result.bytes,
    }


def verify_big(plan: Plan, bridge: Bridge, artifact: Path, checkpoint: Path) -> dict[str, Any]:
    """Verify the big ``.bin``: the artifact on the device here too (a 7B forward pass on the CPU takes minutes)."""
    figures = verify_figures(bridge.verify(artifact, checkpoint, device=plan.device, artifact_device=plan.device))
    gc.collect()
    if plan.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return figures


def scale_row(plan: Plan, label: str, shape: dict[str, Any], biggest: bool) -> tuple[dict, dict | None]:
    """A fresh server: its start, the cold convert and the warm one, the memory the warm model holds (the server's
    after the warm convert less its own before the first); for the biggest model also its verification and the
    does-not-fit check, on that warm server."""
    started = time.perf_counter()
    checkpoint = synthetic_run(plan.work, label, shape, plan.device)
    row: dict[str, Any] = {"model": label, "shape": shape, "checkpoint_bytes": checkpoint.stat().st_size}
    row["made_s"] = time.perf_counter() - started
    output, does_not_fit = plan.work / f"{label}.bin", None
    started = time.perf_counter()
    try:
        with Bridge(env=plan.env, attach=False) as bridge:
            row["start_s"] = time.perf_counter() - started
            row["idle"] = held_memory(bridge, plan.device)
            row["cold"] = timed_convert(plan, bridge, checkpoint, output)
            output.unlink()
            row["warm"] = timed_convert(plan, bridge, checkpoint, output)
            row["model_bytes"] = model_bytes(bridge, checkpoint)
            row["memory"] = held_memory(bridge, plan.device)
            if biggest:
                row["verify"] = verify_big(plan, bridge, output, checkpoint)
            output.unlink()
            if biggest:
                does_not_fit = attempt("does not fit", check_does_not_fit, plan, bridge, checkpoint)
    finally:  # the next model needs the room
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
        output.unlink(missing_ok=True)
    row["ok"] = (
        not row["cold"]["cache_hit"]
        and row["warm"]["cache_hit"]
        and {row["cold"]["device"], row["warm"]["device"]} == {plan.device}
        and row.get("verify", {"passed": True})["passed"]
    )
    return row, does_not_fit


def check_scale(plan: Plan) -> tuple[list[dict], dict | None]:
    rows, does_not_fit = [], None
    for index, (label, shape) in enumerate(plan.scales.items()):
        try:
            row, found = scale_row(plan, label, shape, biggest=index == len(plan.scales) - 1)
        except Exception as exc:
            log.exception("the %s model failed", label)
            row, found = {"model": label, "error": f"{type(exc).__name__}: {exc}", "ok": False}, None
        rows.append(row)
        does_not_fit = found or does_not_fit
    return rows, does_not_fit


def check_does_not_fit(plan: Plan, bridge: Bridge, checkpoint: Path) -> dict[str, Any]:
    """The warm server asked for the fp32 copy of its warm fp16 model (twice its bytes) with room for about half of
    it: a typed ``OutOfMemory``, the warm model still served from the cache, and the attempt's memory given back."""
    size = model_bytes(bridge, checkpoint)
    # On the CPU the checkpoint file is mapped before anything is allocated: that much more room.
    room = size // 2 + (0 if plan.device.startswith("cuda") else checkpoint.stat().st_size)
    record: dict[str, Any] = {"model_bytes": size, "before": held_memory(bridge, plan.device)}
    output = plan.work / "does-not-fit.bin"
    with less_room(plan.device, bridge.server.pid, room) as how:
        record["how"] = how
        started = time.perf_counter()
        try:
            bridge.convert(checkpoint, output, device=plan.device, dtype="float32")
            record["error"] = None
        except RemoteOutOfMemory as exc:
            record["error"] = {"type": type(exc).__name__, "remote_type": exc.error_type, "message": str(exc)}
        record["seconds"] = time.perf_counter() - started
    record["as_the_error_arrived"] = held_memory(bridge, plan.device)
    time.sleep(SETTLE_S)
    record["after"] = held_memory(bridge, plan.device)
    record["output_left"] = output.exists()
    again = timed_convert(plan, bridge, checkpoint, plan.work / "after-does-not-fit.bin")
    (plan.work / "after-does-not-fit.bin").unlink()
    record["then_warm_convert"] = again
    record["cached_entries"] = cached(bridge, checkpoint)
    # What the device sees the server hold (reserved, not only allocated: blocks its allocator keeps are lost to
    # every other process). The attempt held about half the model when it failed: a quarter left behind is a leak.
    held = [record[when].get("reserved", record[when]["held"]) for when in ("before", "after")]
    record["freed"] = None not in held and held[1] - held[0] < size // 4
    record["ok"] = (
        record["error"] is not None
        and record["freed"]
        and again["cache_hit"]
        and not record["output_left"]
        and len(record["cached_entries"]) == 1
    )
    return record


# ------------------------------------------------------------------------------------------------ report


def fmt_bytes(count: int | None) -> str:
    return "-" if count is None else f"{count / GB:.2f} GB" if count >= GB / 10 else f"{count / 1024**2:.1f} MB"


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds * 1e3:.1f} ms"


def md_cell(value: Any) -> str:
    """A table cell on one line (an error message may span several)."""
    return " ".join(str(value).split()).replace("|", "\\|")


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(md_cell, row)) + " |" for row in rows]


def envs_section(data: dict[str, Any]) -> list[str]:
    envs = data.get("envs", {})
    base, slicegpt = envs.get("base", {}), envs.get("slicegpt", {})
    keys = ["python", *PACKAGES, "cuda", "prefix"]
    rows = [[key, base.get(key, "-"), slicegpt.get(key, "-")] for key in keys]
    command = (
        f"`{data['meta']['python']} bench/gpu_check.py --env ENV --envs-only`: each env's python, isolated, imports "
        "each package; the CUDA devices are `torch.cuda.get_device_name(i)`."
    )
    return ["## The two envs", "", command, "", *table(["", "base", "slicegpt"], rows)]


def tests_section(data: dict[str, Any]) -> list[str]:
    tests = data.get("tests") or {}
    if not tests:
        return []
    verdict = "passed" if tests["status"] == 0 else f"exit status {tests['status']}"
    return ["## The tests marked gpu", "", f"`{tests['command']}`: {tests['summary']} ({verdict})"]


def families_section(plan: Plan, rows: list[dict[str, Any]]) -> list[str]:
    calls = plan.call(
        "`bridge.convert(pt, bin, device=DEVICE, dtype=D)`, `bridge.export(pt, dir, device=DEVICE, dtype=D)`, then "
        "`bridge.verify(artifact, pt, device=DEVICE, artifact_device='cpu')` of each"
    )
    body = []
    for row in rows:
        if "error" in row:
            body.append([row["what"], "", "", "", "", "", "", "", "", "FAILED: " + row["error"]])
            continue
        bin_, export = row["verify"]["bin"], row["verify"]["export"]
        nmse = max(bin_["nmse"] or 0.0, export["nmse"] or 0.0)
        top1 = min(bin_["top1"] or 0.0, export["top1"] or 0.0)
        verdicts = ["PASS" if figures["passed"] else "FAIL" for figures in (bin_, export)]
        body.append(
            [row["family"], row["dtype"], "/".join(row["server_device"]), "/".join(row["artifact_dtype"]), *verdicts]
            + [f"{nmse:.1e}", f"{top1:.0%}", bin_["compared_dtype"], "ok" if row["ok"] else "FAILED"]
        )
    header = ["family", "dtype", "server device", "artifact dtype", "verify .bin", "verify export"]
    header += ["NMSE (worst)", "top-1 (lowest)", "compared in", "check"]
    intro = (
        f"A tiny model of each family (its official fixture's shape, made by `model.dense`, sliced at {SPARSITY} "
        f"by our maker), through one warm server: {calls}."
    )
    return ["## Every family through the server", "", intro, "", *table(header, body)]


def slicing_section(plan: Plan, rows: list[dict[str, Any]]) -> list[str]:
    options = ", ".join(f"{key}={value!r}" for key, value in SLICE_OPTIONS.items())
    call = plan.call(
        f"`bridge.slice(dense, [{SPARSITY}], out, calibration=text, device=DEVICE, verify=True, {options})`"
    )
    body = [
        [row["what"], "", "", "", "", "", "", "", "FAILED: " + row["error"]]
        if "error" in row
        else [row["family"], row["slicer"], row["device"], row["dtype"], f"{row['ppl_dense']:.4g}"]
        + [f"{row['ppl_sliced']:.4g}", row["verified"], fmt_s(row["seconds"]), "ok" if row["ok"] else "FAILED"]
        for row in rows
    ]
    header = ["family", "slicer", "device", "dtype", "ppl dense", "ppl sliced", "verify", "time", "check"]
    note = (
        "The builtin slicer (no slicegpt in the env) rotates on the host; the perplexities and the sliced model "
        "it hands to convert are on the device."
    )
    return [
        "## Slicing on the device",
        "",
        f"Each family's tiny dense model: {call}.",
        "",
        *table(header, body),
        "",
        note,
    ]


def scale_section(plan: Plan, rows: list[dict[str, Any]]) -> list[str]:
    body, verified = [], []
    for row in rows:
        if "error" in row:
            body.append([row["model"], *[""] * 10, "FAILED: " + row["error"]])
            continue
        cold, warm, memory = row["cold"], row["warm"], row["memory"]
        held = None if memory.get("held") is None else memory["held"] - (row["idle"].get("held") or 0)
        body.append(
            [row["model"], fmt_bytes(row["checkpoint_bytes"]), fmt_s(row["start_s"]), fmt_s(cold["seconds"])]
            + [f"{fmt_s(cold['server_timings']['load'])} / {fmt_s(cold['server_timings']['save'])}"]
            + [fmt_s(warm["seconds"]), f"{cold['seconds'] / warm['seconds']:.1f}×", fmt_bytes(row["model_bytes"])]
            + [fmt_bytes(held), f"{held / row['model_bytes']:.2f}×" if held and row["model_bytes"] else "-"]
            + [fmt_bytes(memory.get("peak")), "ok" if row["ok"] else "FAILED"]
        )
        if "verify" in row:
            figures, timings = row["verify"], row["verify"]["timings"]
            verified.append(
                f"Verify of the {row['model']} model, "
                + plan.call("`bridge.verify(bin, pt, device=DEVICE, artifact_device=DEVICE)`: ")
                + f"{'PASS' if figures['passed'] else 'FAIL'} in {fmt_s(timings.get('total'))} (artifact load "
                f"{fmt_s(timings.get('load_artifact'))}, reference in the server {fmt_s(timings.get('reference'))}, "
                f"artifact forward {fmt_s(timings.get('artifact_forward'))}); NMSE {figures['nmse']:.1e}, top-1 "
                f"{figures['top1']:.0%}, compared in {figures['compared_dtype']}."
            )
    header = ["model", "checkpoint", "server start", "cold convert", "load / save", "warm convert", "cold/warm"]
    header += ["model bytes", "held on device", "held/model", "peak", "check"]
    source = next((row["memory"]["source"] for row in rows if "memory" in row), "-")
    intro = (
        f"Llama checkpoints sliced at {SPARSITY} (fp16, random weights drawn in the sliced shapes on the machine; "
        + ", ".join(
            f"{label}: hidden {shape['hidden_size']}, {shape['num_layers']} layers"
            for label, shape in plan.scales.items()
        )
        + "). For each a fresh server (`Bridge(env, attach=False)`), then "
        + plan.call(
            "`bridge.convert(pt, bin, device=DEVICE, overwrite=True)` twice: cold (a cache miss: load and save) "
        )
        + f"and warm (a hit: save only); times are the client's, load / save the server's. Held: {source}. "
        f"Files under {plan.work.parent}{' (memory: no disk in these times)' if in_memory(plan.work) else ''}."
    )
    return ["## Converting at scale: cold and warm", "", intro, "", *table(header, body), "", *verified]


def does_not_fit_section(plan: Plan, record: dict[str, Any] | None) -> list[str]:
    if not record:
        return []
    if "error" in record and "model_bytes" not in record:
        return ["## A model that does not fit", "", "FAILED: " + record["error"]]
    error = record["error"]
    again = record["then_warm_convert"]
    rows = [
        ["room left", record["how"]],
        ["asked", plan.call("`bridge.convert(pt, bin, device=DEVICE, dtype='float32')` (a new cache entry)")],
        ["error", f"{error['type']} ({error['remote_type']}): {error['message']}" if error else "none: it fitted"],
        ["took", fmt_s(record["seconds"])],
        *[
            [f"{what} before / as the error arrived / {SETTLE_S:g} s later", " / ".join(map(fmt_bytes, figures))]
            for what, figures in memory_figures(record).items()
        ],
        ["freed", f"yes ({SETTLE_S:g} s later)" if record["freed"] else "NO"],
        ["then the warm model", f"{'cache hit' if again['cache_hit'] else 'cache MISS'}, {fmt_s(again['seconds'])}"],
        ["output left behind", "yes" if record["output_left"] else "no"],
        ["check", "ok" if record["ok"] else "FAILED"],
    ]
    intro = f"The biggest model's warm server, asked for its fp32 copy ({fmt_bytes(2 * record['model_bytes'])})."
    return ["## A model that does not fit", "", intro, "", *table(["", ""], rows)]


def memory_figures(record: dict[str, Any]) -> dict[str, list[int | None]]:
    """The memory figures of the does-not-fit check: held (and reserved, where reported) at each moment."""
    moments = [record[when] for when in ("before", "as_the_error_arrived", "after")]
    figures = {"held": [moment["held"] for moment in moments]}
    if "reserved" in moments[0]:
        figures["reserved"] = [moment.get("reserved") for moment in moments]
    return figures


def markdown(plan: Plan, data: dict[str, Any]) -> str:
    meta = data["meta"]
    title = f"# GPU check: the warm server on {meta['device_name']}"
    lines = [title, ""]
    if plan.dry_run:
        lines += [
            "**Dry run on the CPU** with tiny stand-ins for the ~1B and ~7B models: it proves the script, not the "
            "figures.",
            "",
        ]
    if not meta["complete"]:
        lines += ["**Incomplete**: written after each section; the run did not get past the last one below.", ""]
    lines += [
        f"`{meta['command']}` on {meta['date']} ({meta['host']}), {fmt_s(meta['seconds'])} in all; every check "
        f"{'held' if data['ok'] else 'did NOT hold: ' + ', '.join(k for k, v in data['checks'].items() if not v)}.",
        "",
        *envs_section(data),
        "",
        *tests_section(data),
        "",
        *families_section(plan, data.get("families", [])),
        "",
        *slicing_section(plan, data.get("slicing", [])),
        "",
        *scale_section(plan, data.get("scale", [])),
        "",
        *does_not_fit_section(plan, data.get("does_not_fit")),
    ]
    return "\n".join(lines).replace("\n\n\n", "\n\n").rstrip() + "\n"


def write_report(plan: Plan, out: Path, data: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (out / "gpu.md").write_text(markdown(plan, data))
    log.info("wrote %s and %s", out / "gpu.md", out / "gpu.json")


# ------------------------------------------------------------------------------------------------ run


def run_checks(plan: Plan, report: Callable[[dict[str, Any]], None]) -> None:
    """Every section, in order, into one dict that ``report`` gets after each (so that a run cut short still leaves
    what it measured); a failed step is a row saying so, and the run goes on."""
    data: dict[str, Any] = {"envs": attempt("envs", check_envs, plan.env, not plan.dry_run)}
    log.info("making a tiny model of each family in %s", plan.work)
    runs = {family: tiny_run(plan.work, family) for family in FAMILIES}
    calibration = plan.work / "calibration.txt"
    calibration.write_text(embedded_text(), encoding="utf-8")
    with Bridge(env=plan.env, attach=False) as bridge:
        log.info("every family, fp16 and bf16, on %s", plan.device)
        data["families"] = check_families(plan, bridge, runs)
        report(data)
        log.info("slicing each family on %s", plan.device)
        data["slicing"] = check_slicing(plan, bridge, runs, calibration)
        report(data)
    log.info("converting at scale: %s", ", ".join(plan.scales))
    data["scale"], data["does_not_fit"] = check_scale(plan)
    report(data)


def tests_record(log_path: str | None, status: int | None, command: str) -> dict[str, Any] | None:
    """What the tests marked gpu did: pytest's last summary line from its log."""
    if not log_path:
        return None
    lines = Path(log_path).read_text(errors="replace").splitlines() if Path(log_path).is_file() else []
    counts = re.compile(r"\d+ (passed|failed|skipped|deselected|errors?)\b.* in [\d.]+s")
    summary = next((line.strip("= ") for line in reversed(lines) if counts.search(line)), "")
    return {"command": command, "status": status, "summary": summary or "no summary line"}


def in_memory(path: Path) -> bool:
    """Whether ``path`` is on a tmpfs (or ramfs): files there are memory, never disk."""
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    under = [mount for mount in mounts if str(path).startswith(mount[1].rstrip("/") + "/")]
    return bool(under) and max(under, key=lambda mount: len(mount[1]))[2] in ("tmpfs", "ramfs")


def estimated_bytes(shape: dict[str, Any]) -> int:
    """An upper bound of a Llama of ``shape``'s fp16 bytes, sliced or not."""
    hidden, layers = shape["hidden_size"], shape["num_layers"]
    return 2 * hidden * (2 * shape["vocab_size"] + layers * (4 * hidden + 3 * shape["intermediate_size"]))


def work_root(requested: str | None, scales: dict[str, dict[str, Any]]) -> Path:
    """``requested``; else /dev/shm when it has room for the biggest model twice over (its checkpoint and one
    ``.bin`` of it at a time), else the temp dir."""
    if requested:
        return Path(requested)
    need = 2 * max(estimated_bytes(shape) for shape in scales.values())
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > need:
        return shm
    return Path(tempfile.gettempdir())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", required=True, help="the slicegpt env: a prefix dir or its python")
    parser.add_argument("--out", required=True, help="where gpu.md and gpu.json go")
    parser.add_argument("--device", default="cuda:0", help="where the server computes (default cuda:0)")
    parser.add_argument("--dry-run", action="store_true", help="on cpu, with tiny stand-ins for the ~1B and ~7B")
    parser.add_argument("--scales", default="1b,7b", help="which of the big models to convert (default 1b,7b)")
    parser.add_argument("--work", help="scratch dir (default: /dev/shm when it has room, else the temp dir)")
    parser.add_argument("--command", help="how the run was invoked, quoted in gpu.md (default: this command line)")
    parser.add_argument("--tests-log", help="the log of the tests marked gpu, run before (its summary is quoted)")
    parser.add_argument("--tests-status", type=int, help="their exit status")
    parser.add_argument("--tests-command", default="pytest -m gpu", help="how they were run")
    parser.add_argument("--envs-only", action="store_true", help="print both envs' versions and devices, and stop")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    sizes = SCALES["dry" if args.dry_run else "gpu"]
    scales = {label: sizes[label] for label in args.scales.split(",") if label}
    device = "cpu" if args.dry_run else args.device
    work = Path(tempfile.mkdtemp(prefix="slicebridge-gpu-check-", dir=work_root(args.work, scales)))
    command = args.command or " ".join(["python", *sys.argv])
    return Plan(args.env, device, scales, work, command, args.dry_run)


def completed(plan: Plan, args: argparse.Namespace, data: dict[str, Any], seconds: float) -> dict[str, Any]:
    """``data`` with what the run was (``meta``), the tests' record and each section's verdict (``checks``: a
    section not run yet is not held)."""
    cuda = (data["envs"].get("base") or {}).get("cuda") or []
    meta = {
        "command": plan.command,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": os.uname().nodename,
        "device": plan.device,
        "device_name": cuda[0] if cuda and plan.device.startswith("cuda") else "cpu",
        "dry_run": plan.dry_run,
        "work": str(plan.work),
        "python": sys.executable,
        "seconds": seconds,
        "complete": "scale" in data,
    }
    tests = tests_record(args.tests_log, args.tests_status, args.tests_command)
    rows = {name: data.get(name) or [] for name in ("families", "slicing", "scale")}
    checks = {
        "envs": data["envs"].get("ok", False),
        "tests": tests is None or tests["status"] == 0,
        **{name: bool(found) and all(row["ok"] for row in found) for name, found in rows.items()},
        "does_not_fit": bool(data.get("does_not_fit")) and data["does_not_fit"]["ok"],
    }
    return {**data, "meta": meta, "tests": tests, "checks": checks, "ok": all(checks.values())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.envs_only:
        return 0 if check_envs(args.env, need_cuda=not args.dry_run)["ok"] else 1
    plan = make_plan(args)
    started = time.perf_counter()
    last: dict[str, Any] = {}

    def report(data: dict[str, Any]) -> None:
        last.update(completed(plan, args, data, time.perf_counter() - started))
        write_report(plan, Path(args.out), last)

    try:
        run_checks(plan, report)
    finally:
        shutil.rmtree(plan.work, ignore_errors=True)
    return 0 if last["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
