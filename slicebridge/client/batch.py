"""Many checkpoints in one command: expand paths, globs and sweep dirs; run each; summarise.

Every checkpoint goes through the same warm server (``run_batch``), or through a pool of them
(``run_batch_on``: each checkpoint one item of ``client.pool``, here or on Ray, kept where its model
is warm; an item names its inputs, which a Ray node checks it can see before it runs it); one
that fails is reported and the rest go on. The summary has one row per checkpoint (checkpoint,
output, seconds, actual ratio, verify result, error; on a pool, the server that ran it), and the
command's exit status is non-zero if any failed.

Outputs are planned before anything runs: checkpoints whose derived output names are equal
(run_slicegpt names its files after the model, so every run dir of a sweep holds the same
name) are named apart by the directories they are in (``run1-NAME.bin``, then
``sweep-run1-NAME.bin`` if that is not enough), deterministically; a plan in which two
outputs still coincide, or an output is one of the inputs, is refused with the list.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slicebridge.errors import SlicebridgeError
from slicebridge.model import atomic
from slicebridge.model.guards import OutputCollision, job_inputs, output_over_input

if TYPE_CHECKING:
    from slicebridge.client.pool import Job, Pool, WorkResult
    from slicebridge.client.ray_pool import RayPool


@dataclass
class BatchRow:
    checkpoint: str
    output: str
    seconds: float = 0.0
    family: str = ""
    actual_ratio: float | None = None
    loader: str = ""
    official_name: str | None = None  # the model name slicegpt's adapter was given (official loader)
    cache_hit: bool | None = None
    verify: str = "-"  # "pass", "FAIL" or "-"
    error: str = ""
    member: str = ""  # the pool's server that ran it ("cpu#1", "cuda:0"); "" without a pool

    @property
    def ok(self) -> bool:
        return not self.error and self.verify != "FAIL"


def expand_checkpoints(specs: list[str], sparsity: float | None = None) -> list[Path]:
    """Checkpoint ``.pt`` files from paths, globs and sweep directories, in a stable order.

    A directory is a run_slicegpt save dir (its ``*.pt`` files) or a sweep of them (the
    ``*.pt`` files of its subdirectories); with ``sparsity``, only the files named for it,
    as ``--sliced-model-path DIR --sparsity S`` picks one. A path that matches nothing is
    kept as it is, so that its conversion fails with a clear error in the summary.
    """
    found: list[Path] = []
    for spec in specs:
        matches = sorted(glob.glob(os.path.expanduser(spec))) if glob.has_magic(spec) else [spec]
        for match in matches:
            path = Path(match).expanduser()
            found += _checkpoints_in(path, sparsity) if path.is_dir() else [path]
    return list(dict.fromkeys(atomic.resolve(p, follow_final=False) for p in found))


def _checkpoints_in(directory: Path, sparsity: float | None) -> list[Path]:
    from slicebridge.model.checkpoint import choose_checkpoint_in_dir, named_for

    if sparsity is not None and any(directory.glob("*.pt")):
        return [choose_checkpoint_in_dir(directory, sparsity)]  # none for it: a typed error, before any work
    inside = sorted(directory.glob("*.pt")) or sorted(directory.glob("*/*.pt"))
    if sparsity is not None:
        inside = [path for path in inside if named_for(path, sparsity)]
    return inside or [directory]


def output_for(checkpoint: Path, output: str | None, output_dir: str | None, suffix: str, depth: int = 0) -> Path:
    """The output of ``checkpoint``; ``depth`` names of the directories above it go in front of its name."""
    if output is not None:
        return atomic.resolve(output)
    directory = atomic.resolve(output_dir) if output_dir else checkpoint.parent
    name = checkpoint.name if checkpoint.is_dir() else checkpoint.stem
    above = checkpoint.parent.parts[len(checkpoint.parent.parts) - depth :] if depth else ()
    return directory / "-".join((*above, f"{name}{suffix}"))


def outputs_for(
    checkpoints: list[Path], output: str | None, output_dir: str | None, suffix: str, base_model: str | None = None
) -> list[Path]:
    """One distinct output per checkpoint (see the module docstring); ``OutputCollision`` if impossible,
    or if an output is an input (a checkpoint, its ``.json``, ``base_model``) or a directory above one."""
    depths = [0] * len(checkpoints)
    outputs = [output_for(c, output, output_dir, suffix) for c in checkpoints]
    while clashing := _clashing(outputs):
        deeper = [i for i in clashing if output is None and depths[i] < len(checkpoints[i].parent.parts) - 1]
        if not deeper:
            raise OutputCollision(
                _collision_message(
                    checkpoints,
                    outputs,
                    clashing,
                    "is the output of several checkpoints",
                    "run them separately, each with its --output",
                )
            )
        for i in deeper:
            depths[i] += 1
            outputs[i] = output_for(checkpoints[i], output, output_dir, suffix, depths[i])
    inputs = [item for c in checkpoints for item in job_inputs(c, base_model)]  # through any symlink too
    overwritten = [i for i, path in enumerate(outputs) if output_over_input(path, inputs) is not None]
    if overwritten:
        raise OutputCollision(
            _collision_message(
                checkpoints,
                outputs,
                overwritten,
                "is one of the inputs (or a directory above one)",
                "choose another --output or --output-dir",
            )
        )
    return outputs


def _clashing(outputs: list[Path]) -> list[int]:
    return [i for i, path in enumerate(outputs) if outputs.count(path) > 1]


def _collision_message(checkpoints: list[Path], outputs: list[Path], indices: list[int], why: str, advice: str) -> str:
    pairs = "; ".join(f"{checkpoints[i]} -> {outputs[i]}" for i in indices)
    return f"refusing to start: an output {why} ({pairs}); {advice}"


def run_batch(checkpoints: list[Path], outputs: list[Path], one: Callable[[Path, Path], BatchRow]) -> list[BatchRow]:
    rows = []
    for checkpoint, output in zip(checkpoints, outputs, strict=True):
        started = time.perf_counter()
        try:
            row = one(checkpoint, output)
        except SlicebridgeError as exc:  # fails this checkpoint, not the batch (remote errors are ones too)
            row = _failed_row(checkpoint, output, exc)
        row.seconds = time.perf_counter() - started
        rows.append(row)
    return rows


def run_batch_on(
    pool: Pool | RayPool,
    checkpoints: list[Path],
    outputs: list[Path],
    job: Job,
    options: dict[str, Any],
    on_row: Callable[[BatchRow], None] | None = None,
) -> list[BatchRow]:
    """``run_batch`` spread over a pool (a ``Pool`` or a ``RayPool``): each checkpoint is one item keyed by
    its real path (so a model stays where it is warm), run as ``job(bridge, device, {"checkpoint", "output",
    "inputs", **options})``, which returns its ``BatchRow``; ``inputs`` are the checkpoint and
    ``options["base_model"]`` if given (absolute paths, for a Ray node to check). Rows in the checkpoints'
    order; ``on_row`` sees each as it ends."""
    from slicebridge.client.pool import WorkItem

    pairs = list(zip(checkpoints, outputs, strict=True))
    base_model = [str(options["base_model"])] if options.get("base_model") is not None else []
    items = [
        WorkItem(
            os.path.realpath(checkpoint),
            {"checkpoint": str(checkpoint), "output": str(output), "inputs": [str(checkpoint), *base_model], **options},
        )
        for checkpoint, output in pairs
    ]

    def row_of(result: WorkResult) -> BatchRow:
        checkpoint, output = pairs[result.index]
        if isinstance(result.error, SlicebridgeError):  # it failed this checkpoint, not the batch
            row = _failed_row(checkpoint, output, result.error)
        elif result.error is not None:  # a bug, raised as run_batch raises it
            raise result.error
        else:
            row = result.value
        row.seconds, row.member = result.seconds, result.member
        return row

    results = pool.run(items, job, on_result=(lambda result: on_row(row_of(result))) if on_row else None)
    return [row_of(result) for result in results]


def _failed_row(checkpoint: Path, output: Path, exc: SlicebridgeError) -> BatchRow:
    kind = getattr(exc, "error_type", "") or type(exc).__name__  # a remote type with no local class
    return BatchRow(str(checkpoint), str(output), error=f"{kind}: {_first_line(exc)}")


def _first_line(exc: Exception) -> str:
    text = getattr(exc, "remote_message", None) or str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


def summary_table(rows: list[BatchRow]) -> str:
    """One line per row; a ``server`` column when a pool ran them."""
    pooled = any(row.member for row in rows)
    server = ["server"] if pooled else []
    table = [("checkpoint", "output", "seconds", "family", "actual ratio", "loader", "verify", *server, "result")]
    for row in rows:
        table.append(
            (
                Path(row.checkpoint).name,
                _short(row.output),
                f"{row.seconds:.2f}",
                row.family or "-",
                f"{row.actual_ratio:.4f}" if row.actual_ratio is not None else "-",
                _loader_cell(row),
                row.verify,
                *([row.member or "-"] if pooled else []),
                "ok" if row.ok else f"FAILED: {row.error}" if row.error else "FAILED",
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in table]
    lines.insert(1, "-" * len(lines[0]))
    failed = sum(not r.ok for r in rows)
    lines.append(f"{len(rows) - failed} of {len(rows)} succeeded" + (f", {failed} failed" if failed else ""))
    return "\n".join(lines)


def _loader_cell(row: BatchRow) -> str:
    """``official as facebook/opt-tiny (cached)``: the loader, the name it took the model by, the cache."""
    if not row.loader:
        return "-"
    named = f" as {row.official_name}" if row.official_name else ""
    return row.loader + named + (" (cached)" if row.cache_hit else "")


def _short(path: str) -> str:
    """Relative to the current dir when it is below it, else absolute."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return path
    return path if relative.startswith("..") else relative


def rows_as_dicts(rows: list[BatchRow]) -> list[dict]:
    return [{**asdict(r), "ok": r.ok} for r in rows]
