"""The base-env API: one call per job, one warm server per env for the life of the process.

    from slicebridge import client
    client.convert(slicegpt_model="results/Llama-3-8B-Instruct_0.2.pt",
                   base_model="/models/Llama-3-8B-Instruct", output="pruned_model.bin", env="slicegpt")
    client.verify("pruned_model.bin", checkpoint="results/Llama-3-8B-Instruct_0.2.pt", env="slicegpt")
    client.slice("/models/Meta-Llama-3-8B", sparsities=[0.2, 0.25], calibration="cal.txt",
                 output_dir="results/", env="slicegpt")      # results/Meta-Llama-3-8B_0.2.pt, ...

The first call for an env attaches to its detached server (``slicebridge server start``)
or starts one owned by this process; later calls reuse it, so a loop over many
checkpoints pays start-up and model loading once. If the server dies, the next call
starts a fresh one, up to three times, then raises ``ServerKeepsDying``.
``Bridge(env=...)`` gives the same with an explicit lifetime.

``pool(env, devices=[...])`` is a ``Pool``: one server per device (``"cpu"`` twice is two CPU
servers; ``"all"`` every GPU the env's server sees), each with its own warm cache, that a batch is
spread over (``client.pool``'s module; ``slicebridge convert|export|slice --devices``);
``pool(env, ray="auto")`` is a ``RayPool``: the same on the nodes of a Ray cluster (``client.ray_pool``;
``slicebridge convert|export|slice --ray``).
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slicebridge.bridge.envs import find_env
from slicebridge.bridge.errors import ServerKeepsDying
from slicebridge.client.bridge import Bridge, default_env

# Imported first, so that the function ``pool`` defined below, not the module of that name, is ``client.pool``
# (importing a submodule binds its name in the package once, on its first import: this one).
from slicebridge.client.pool import Pool, PoolError

if TYPE_CHECKING:
    from slicebridge.client.ray_pool import RayPool

__all__ = [
    "Bridge",
    "convert",
    "export",
    "verify",
    "info",
    "upgrade",
    "slice",
    "bridge_for",
    "pool",
    "close",
    "ServerKeepsDying",
]

_bridges: dict[str, Bridge] = {}  # by the env as the caller named it
_by_python: dict[str, Bridge] = {}  # by the interpreter it was resolved to: two names, one env, one bridge
_lock = threading.Lock()


def bridge_for(env: str | os.PathLike | None = None) -> Bridge:
    """The process-wide warm bridge of ``env``, started on first use (it restarts a dead server itself).

    ``env`` is resolved (``conda env list``, ...) once, the first time this process names it.
    """
    spec = os.fspath(env) if env is not None else default_env()
    with _lock:
        bridge = _bridges.get(spec)
        if bridge is None:
            resolved = find_env(spec)
            bridge = _by_python.get(resolved.python) or Bridge(env=resolved).start()
            if not _by_python:
                atexit.register(close)
            _bridges[spec] = _by_python[resolved.python] = bridge
        return bridge


def pool(
    env: str | os.PathLike | None = None,
    devices: str | Sequence[str] | None = None,
    *,
    ray: str | None = None,
    **options,
) -> Pool | RayPool:
    """A pool of warm servers of ``env``, one per device (``["cuda:0", "cuda:1"]``, ``["cpu", "cpu"]``,
    ``"all"``; default one ``"cpu"``), not yet started: ``with client.pool(...) as pool:`` starts them and
    stops them after. With ``ray`` (a Ray address, ``"auto"`` or ``"local"``) and no ``devices``, a
    ``RayPool``: one server per GPU of each node of that Ray cluster (``slicebridge.client.ray_pool``).

        with client.pool(env="slicegpt", devices="all") as pool:
            results = pool.run(items, job)     # see slicebridge.client.pool

    Options: ``debug_ops`` (and ``devices_per_node`` on Ray). Its servers are its own (never the env's
    detached one), and unlike ``bridge_for``'s bridge it is not shared: each call makes a new pool.
    """
    if ray is None:
        return Pool(
            os.fspath(env) if env is not None else None, devices if devices is not None else ("cpu",), **options
        )
    if devices is not None:
        raise PoolError(
            f"devices={devices!r} and ray={ray!r}: give one of them (on Ray, each node's GPUs are its servers)"
        )
    from slicebridge.client.ray_pool import RayPool

    return RayPool(env, address=ray, **options)


def _call(env, method: str, *args, **kwargs) -> Any:
    """Run one Bridge method on the env's warm bridge (a ServerDied propagates; the next call restarts)."""
    return getattr(bridge_for(env), method)(*args, **kwargs)


def close() -> None:
    """Close every bridge this process opened (servers it owns stop; detached ones stay)."""
    with _lock:
        for bridge in _by_python.values():
            bridge.close()
        _bridges.clear()
        _by_python.clear()


def default_output(checkpoint: str | os.PathLike, suffix: str = ".bin", sparsity: float | None = None) -> str:
    """``<checkpoint dir>/<stem><suffix>`` for a ``.pt`` or a run_slicegpt dir's checkpoint (its only
    one, or the one named for ``sparsity``)."""
    path = Path(checkpoint).expanduser().absolute()
    if path.is_dir():
        from slicebridge.model.checkpoint import choose_checkpoint_in_dir

        path = choose_checkpoint_in_dir(path, sparsity)
    return str(path.with_suffix(suffix) if suffix else path.with_suffix(""))


def output_path(
    checkpoint: str | os.PathLike, output: str | os.PathLike | None, suffix: str = ".bin", sparsity: float | None = None
) -> str:
    """Where ``checkpoint``'s output goes: ``output``; inside it, named after the checkpoint, when it
    ends in a slash (a directory, made like ``mkdir -p``); beside the checkpoint when it is None."""
    if output is None:
        return default_output(checkpoint, suffix, sparsity)
    text = os.fspath(output)
    if not text.endswith(("/", os.sep)):
        return text
    from slicebridge.model.atomic import make_directories

    return str(make_directories(text) / Path(default_output(checkpoint, suffix, sparsity)).name)


def convert(
    slicegpt_model: str | os.PathLike,
    base_model: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    env: str | None = None,
    **options,
):
    """Convert a SliceGPT checkpoint into a portable ``.bin``; returns a ``ConvertResult``.

    Options: sparsity (default: from the checkpoint or its file name), round_interval,
    loader ("auto" | "official" | "builtin"), device ("auto" | "cpu" | "cuda"), dtype ("float32" |
    "float16" | "bfloat16"; default: the checkpoint's own, whichever loader runs), overwrite,
    pickle_module, on_event. ``output`` defaults to ``<checkpoint>.bin`` beside it; ending in a
    slash, it is a directory that gets ``<checkpoint>.bin``.
    """
    output = output_path(slicegpt_model, output, sparsity=options.get("sparsity"))
    return _call(env, "convert", slicegpt_model, output, base_model=base_model, **options)


def export(
    slicegpt_model: str | os.PathLike,
    base_model: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    env: str | None = None,
    **options,
):
    """Export a SliceGPT checkpoint as a pickle-free Hugging Face directory; returns an ``ExportResult``."""
    output = output_path(slicegpt_model, output, suffix="", sparsity=options.get("sparsity"))
    return _call(env, "export", slicegpt_model, output, base_model=base_model, **options)


def verify(
    artifact: str | os.PathLike,
    checkpoint: str | os.PathLike,
    base_model: str | os.PathLike | None = None,
    *,
    env: str | None = None,
    **options,
):
    """Verify an artifact in this env against the checkpoint in the server; returns a ``VerifyReport``."""
    return _call(env, "verify", artifact, checkpoint, base_model=base_model, **options)


def info(path: str | os.PathLike, base_model: str | os.PathLike | None = None, *, env: str | None = None):
    """Describe a checkpoint, ``.bin`` or export dir.

    A seed-format ``.bin`` is described from its pickle's opcodes, never unpickled; with ``env``
    the server does it and also says whether its env could read the file for ``upgrade``.
    """
    from slicebridge.client.artifact_info import info as local_info
    from slicebridge.model.pickle_scan import diagnose_seed_bin

    target = Path(path)
    if env is not None and target.is_file() and target.suffix != ".pt" and diagnose_seed_bin(target).is_seed_format:
        return _call(env, "info", path, base_model=base_model)
    return local_info(path, base_model=base_model)


def upgrade(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    env: str | None = None,
    trust_pickle: bool = False,
    **options,
):
    """Turn a ``.bin`` made the seed's way into a portable one, in the slicegpt env.

    That unpickles ``source``, which runs code from the file: pass ``trust_pickle=True`` only
    for a file you trust (without it the server refuses, and says so).
    """
    return _call(env, "upgrade", source, output, trust_pickle=trust_pickle, **options)


def slice(
    base_model: str | os.PathLike,
    sparsities: list[float],
    calibration: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    env: str | None = None,
    ray: str | None = None,
    **options,
):
    """Slice a dense model at every sparsity in one request, as run_slicegpt does; returns a ``SliceSweep``.

        sweep = client.slice("/models/Meta-Llama-3-8B", sparsities=[0.2, 0.25, 0.3], calibration="cal.txt",
                             output_dir="results/", env="slicegpt", convert=True, verify=True)
        print(sweep.table())        # sparsity, hidden size, actual ratio, perplexity, seconds, files, verify
        sweep.checkpoints[0].checkpoint   # results/Meta-Llama-3-8B_0.2.pt (+ .json, + .bin with convert)

    ``calibration`` is a local text (a .txt / .jsonl file or a directory of them); pass
    ``cal_dataset="wikitext2"`` (ptb, c4, alpaca) instead to calibrate as run_slicegpt does. Options are
    ``Bridge.slice``'s (run_slicegpt's flags, underscored, plus slicer, held_out, eval_ppl, overwrite,
    convert, export, verify, on_event). Arguments that are wrong whatever the server are refused
    before any server starts. ``SweepIncomplete`` if a sparsity failed or an artifact failed
    verification; its ``.sweep`` holds what was done, which stays on disk.

    With ``ray`` (a Ray address, ``"auto"`` or ``"local"``) the sweep runs on a ``RayPool`` of that cluster,
    started for it and stopped after: each member (one per GPU of each node) slices a contiguous share
    of the sparsities, loading the dense model once (``slicing.slice_on_pool``, whose ``on_share`` it
    takes instead of ``on_event``); every path must be on storage that the nodes share.
    """
    from slicebridge.client.slicing import check_sweep, slice_on_pool

    check_sweep(sparsities, output_dir, calibration, options.get("cal_dataset"), options.get("round_interval", 8))
    if ray is None:
        return _call(env, "slice", base_model, sparsities, output_dir, calibration=calibration, **options)
    cluster = pool(env, ray=ray)
    try:
        return slice_on_pool(cluster, base_model, sparsities, calibration, output_dir, **options)
    finally:
        cluster.close()
