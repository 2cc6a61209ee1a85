"""Slicing sweeps from the base env: one ``slice`` request, its outputs verified here, one summary.

    sweep = bridge.slice("/models/Meta-Llama-3-8B", [0.2, 0.25, 0.3], "results/", calibration="cal.txt",
                         verify=True)
    print(sweep.table())

The server slices every sparsity with one warm dense model (slicegpt's own code when its env
has slicegpt, else slicebridge's maker) and writes run_slicegpt's save-dir layout into the
output directory: ``{name}_{sparsity}.pt`` and ``.json`` per sparsity, the dense model's config
and tokenizer files beside them, and with ``convert`` / ``export`` a ``{name}_{sparsity}.bin`` /
``{name}_{sparsity}/`` made from the warm sliced model. A sparsity that fails mid-sweep (out of
memory, ...) leaves nothing on disk and the others go on.

With ``verify`` every artifact of the sweep is loaded here, as a user would load it, and
compared with its ``.pt`` run in the server (``verification``); verify without ``convert`` or
``export`` implies ``convert``, so there is something to verify. A sweep is ok when every
sparsity was sliced and every artifact passed; otherwise ``SweepIncomplete`` is raised, and
its ``.sweep`` holds what was done (those checkpoints stay on disk).

What needs no server is checked before the request: the sparsities (numbers in (0, 1), no
duplicates, at least one), ``round_interval`` (at least 1), the output directory, and the
calibration (exactly one of a local text and a dataset name).

On a pool of servers (``slice_on_pool``, ``slicebridge slice --devices``) or on the nodes of a Ray
cluster (``client.slice(..., ray=...)``, ``slicebridge slice --ray``) the sweep is split: each member
slices a contiguous share of the sparsities in one ``slice`` request, so each loads the dense model
once, and verifies its share's artifacts on its own bridge; the shares merge into one ``SliceSweep``.
A share whose server (or Ray actor) died is retried once on another member, then reported as failed
sparsities, the others kept. On Ray the paths are on storage every node shares: a member first checks
that its node sees the dense model and the calibration text, and fails its share naming the node if not.
"""

from __future__ import annotations

import itertools
import logging
import numbers
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slicebridge.bridge import protocol
from slicebridge.bridge.channel import EventCallback
from slicebridge.bridge.errors import BadRequest, ServerDied
from slicebridge.client.verification import VerifyReport
from slicebridge.errors import SlicebridgeError
from slicebridge.model.atomic import remove_orphaned_partials, resolve

if TYPE_CHECKING:
    from slicebridge.client.bridge import Bridge
    from slicebridge.client.pool import Pool, WorkResult
    from slicebridge.client.ray_pool import RayPool

log = logging.getLogger(__name__)


class SweepIncomplete(SlicebridgeError):
    """A sparsity of a sweep failed, or an artifact failed verification; ``.sweep`` holds what was done."""

    def __init__(self, sweep: SliceSweep):
        self.sweep = sweep
        done = len(sweep.checkpoints)
        super().__init__(
            f"the sweep did not fully succeed: {'; '.join(sweep.problems())}; {done} of "
            f"{done + len(sweep.failed)} sparsities sliced, kept in {sweep.result.output_dir}"
        )


@dataclass
class SliceSweep:
    """What a ``slice`` request did (``result``) and, per sparsity, the verification of its artifacts."""

    base_model: str
    result: protocol.SliceResult
    verified: bool = False  # verification was asked for
    verification: dict[float, list[VerifyReport]] = field(default_factory=dict)

    @property
    def checkpoints(self) -> list[protocol.SlicedCheckpoint]:
        return self.result.checkpoints

    @property
    def failed(self) -> list[protocol.SliceFailure]:
        return self.result.failed

    @property
    def ok(self) -> bool:
        return not self.failed and all(report.passed for reports in self.verification.values() for report in reports)

    def verdict(self, sparsity: float) -> str:
        """``pass``, ``FAIL`` or ``-`` (not verified) for the artifacts of one sparsity."""
        reports = self.verification.get(sparsity)
        if not reports:
            return "-"
        return "pass" if all(report.passed for report in reports) else "FAIL"

    def problems(self) -> list[str]:
        """One phrase per failed sparsity and per failed verification."""
        phrases = [f"{failure.sparsity:g} failed ({failure.error_type}: {failure.message})" for failure in self.failed]
        for sparsity, reports in self.verification.items():
            phrases += [
                f"the {report.kind} of {sparsity:g} failed verification ({_first_line(' '.join(report.failures[:1]))})"
                for report in reports
                if not report.passed
            ]
        return phrases

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: the server's result, each checkpoint with its verification, and ``ok``."""
        data = protocol.to_wire(self.result)
        for checkpoint in data["checkpoints"]:
            reports = self.verification.get(checkpoint["sparsity"], [])
            checkpoint["verify"] = self.verdict(checkpoint["sparsity"])
            checkpoint["verification"] = [report.as_dict() for report in reports]
        return {"ok": self.ok, "base_model": self.base_model, "verified": self.verified, **data}

    def table(self) -> str:
        """The summary: two lines about the run, then a row for the dense model and one per sparsity, by sparsity."""
        header = ("sparsity", "hidden", "actual ratio", "ppl", "seconds", "checkpoint", "artifacts", "verify", "result")
        by_sparsity = {c.sparsity: self._checkpoint_row(c) for c in self.checkpoints}
        by_sparsity |= {
            f.sparsity: (f"{f.sparsity:g}", *["-"] * 7, f"FAILED: {f.error_type}: {_first_line(f.message)}")
            for f in self.failed
        }
        rows = [header, self._dense_row(), *(by_sparsity[s] for s in sorted(by_sparsity))]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
            for row in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        done, failed = len(self.checkpoints), len(self.failed)
        total = f"{done} of {done + failed} sparsities sliced" + (f", {failed} failed" if failed else "")
        unverified = sum(self.verdict(c.sparsity) == "FAIL" for c in self.checkpoints)
        total += f", {unverified} failed verification" if unverified else ""
        return "\n".join([self._title(), *lines, total])

    def _title(self) -> str:
        r, cal = self.result, self.result.calibration
        dense = "warm (cached)" if r.dense.get("cache_hit") else f"loaded in {r.timings.get('load', 0):.2f}s"
        if r.dense.get("servers", 1) > 1:  # a sweep split over a pool
            dense = f"{dense} by each of {r.dense['servers']} servers, {r.dense['loads']} loads in all"
        return (
            f"slice {self.base_model} ({r.family}, {r.model_name}) with the {r.slicer} slicer on {r.device} in "
            f"{r.dtype} -> {r.output_dir}\ndense model {dense}; calibration {cal.get('source', '?')}: "
            f"{cal.get('samples', '?')} samples of {cal.get('seqlen', '?')} tokens; perplexity on "
            f"{cal.get('held_out', '?')} held-out examples"
        )

    def _dense_row(self) -> tuple[str, ...]:
        r = self.result
        ppl = f"{r.baseline_ppl:.4g}" if r.baseline_ppl is not None else "-"
        seconds = f"{r.timings.get('load', 0) + r.timings.get('baseline_ppl', 0):.2f}"
        return ("dense", "-", "-", ppl, seconds, Path(self.base_model).name, "-", "-", "baseline")

    def _checkpoint_row(self, c: protocol.SlicedCheckpoint) -> tuple[str, ...]:
        artifacts = [Path(made["output"]).name + suffix for made, suffix in ((c.bin, ""), (c.export, "/")) if made]
        verdict = self.verdict(c.sparsity)
        result = "ok" if verdict != "FAIL" else "FAILED: verification"
        return (
            f"{c.sparsity:g}",
            str(c.hidden_size),
            f"{c.actual_ratio:.4f}",
            f"{c.ppl:.4g}" if c.ppl is not None else "-",
            f"{c.timings.get('total', 0):.2f}",
            Path(c.checkpoint).name,
            ", ".join(artifacts) or "-",
            verdict,
            result,
        )


def check_sweep(
    sparsities: Any,
    output_dir: Any,
    calibration: Any = None,
    cal_dataset: str | None = None,
    round_interval: Any = 8,
) -> list[float]:
    """The sparsities as floats, in order; a ``BadRequest`` for what no server need see to refuse."""
    if output_dir is None:
        raise _refused("name the output directory (output_dir, --save-dir) that the sliced models go to")
    if (calibration is None) == (cal_dataset is None):
        which = "both were given" if calibration is not None else "neither was given"
        raise _refused(f"slicing calibrates on a local text (calibration) or on a dataset (cal_dataset): {which}")
    if isinstance(round_interval, bool) or not isinstance(round_interval, numbers.Integral) or round_interval < 1:
        raise _refused(f"round_interval must be a whole number of at least 1, not {round_interval!r}")
    if isinstance(sparsities, (numbers.Real, str)):
        sparsities = [sparsities]
    values = list(sparsities)
    if not values:
        raise _refused("name at least one sparsity to slice at")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _refused(f"a sparsity must be a number in (0, 1), not {value!r}")
        if not 0 < value < 1:
            raise _refused(f"sparsity {value:g} is outside (0, 1): it is the fraction of the hidden size sliced off")
    floats = [float(value) for value in values]
    repeated = sorted({value for value in floats if floats.count(value) > 1})
    if repeated:
        raise _refused(f"sparsity {', '.join(f'{value:g}' for value in repeated)} is named more than once")
    return floats


def run_sweep(
    bridge, args: protocol.SliceArgs, *, verify: bool = False, on_event: EventCallback | None = None
) -> SliceSweep:
    """Send the ``slice`` request, verify what it made when asked; ``SweepIncomplete`` unless all went well."""
    try:
        result = bridge.request("slice", args, on_event=on_event)
    except ServerDied:
        _remove_orphaned_partials_in(Path(args.output_dir))
        raise
    sweep = SliceSweep(args.base_model, result, verified=verify)
    if verify:
        for checkpoint in result.checkpoints:
            sweep.verification[checkpoint.sparsity] = [
                _verify(bridge, args, checkpoint, artifact, on_event)
                for artifact in (checkpoint.bin, checkpoint.export)
                if artifact is not None
            ]
    if not sweep.ok:
        raise SweepIncomplete(sweep)
    return sweep


def _verify(
    bridge, args: protocol.SliceArgs, checkpoint: protocol.SlicedCheckpoint, artifact: dict, on_event
) -> VerifyReport:
    """Verify one artifact against its ``.pt``; an error doing so is a failed verification, said in a sentence."""
    try:
        report = bridge.verify(
            artifact["output"],
            checkpoint.checkpoint,
            base_model=args.output_dir,  # run_slicegpt's save dir holds the dense model's config and tokenizer
            sparsity=checkpoint.sparsity,
            round_interval=args.round_interval,
            device=args.device,
            on_event=on_event,
        )
    except SlicebridgeError as exc:
        kind = "export" if Path(artifact["output"]).is_dir() else "bin"
        failure = f"{getattr(exc, 'error_type', '') or type(exc).__name__}: {_first_line(str(exc))}"
        report = VerifyReport(artifact["output"], kind, checkpoint.checkpoint, failures=[failure])
    log.info("verified %s: %s", report.artifact, "pass" if report.passed else "FAIL")
    return report


def slice_on_pool(
    pool: Pool | RayPool,
    base_model: str | os.PathLike,
    sparsities: list[float],
    calibration: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    *,
    on_share: Callable[[list[float], WorkResult], None] | None = None,
    **options,
) -> SliceSweep:
    """``client.slice`` split over a pool (a ``Pool`` or a ``RayPool``): each member slices a contiguous share
    of the sparsities in one request on its own device; one merged ``SliceSweep`` (``SweepIncomplete``
    unless all went well).

    Options are ``Bridge.slice``'s but ``device`` (each member's own; an ``on_event`` is called from the
    members' threads, and is refused on Ray, whose members run on their nodes); ``on_share`` sees each
    share's sparsities and ``WorkResult`` as it ends. What ``client.slice`` refuses before any server
    starts is refused here too; if every share failed, the first share's error is raised.
    """
    from slicebridge.client.pool import WorkItem
    from slicebridge.client.ray_pool import RayPool

    cal_dataset, round_interval = options.get("cal_dataset"), options.get("round_interval", 8)
    floats = check_sweep(sparsities, output_dir, calibration, cal_dataset, round_interval)
    if options.pop("device", "auto") != "auto":
        raise _refused("a sweep on a pool computes on each server's own device: name the devices of the pool instead")
    if isinstance(pool, RayPool) and options.get("on_event") is not None:
        raise _refused("on Ray, events stay on the nodes that slice: pass on_share, which sees each share as it ends")
    listed = [] if isinstance(pool, RayPool) or pool.devices == "all" else pool.devices
    groups = [device for device in listed if "+" in device]
    if groups:
        raise _refused(
            f"{', '.join(groups)}: a sweep slices on one device per server, not on a device group (those are for "
            "convert, export and verify); name single devices"
        )
    started = time.perf_counter()
    pool.start()
    shares = contiguous_shares(floats, len(pool.members))
    paths = {
        "base_model": str(resolve(base_model, follow_final=False)),
        "output_dir": str(resolve(output_dir, follow_final=False)),
    }
    if calibration is not None:
        options["calibration"] = str(resolve(calibration, follow_final=False))
    before = sorted(os.listdir(paths["output_dir"])) if os.path.isdir(paths["output_dir"]) else []
    inputs = [paths["base_model"], *([options["calibration"]] if calibration is not None else [])]
    common = {**paths, "before": before, "inputs": inputs, "options": options}  # a Ray node checks the inputs
    items = [WorkItem(os.path.realpath(base_model), {**common, "sparsities": share}) for share in shares]
    report = (lambda result: on_share(shares[result.index], result)) if on_share else None
    results = pool.run(items, slice_share, report)
    sweep = merged_sweep(paths["base_model"], shares, results, bool(options.get("verify")), started)
    if not sweep.ok:
        raise SweepIncomplete(sweep)
    return sweep


def contiguous_shares(sparsities: list[float], members: int) -> list[list[float]]:
    """``sparsities`` cut in order into ``min(members, len)`` runs whose lengths differ by at most one."""
    count = max(1, min(members, len(sparsities)))
    size, extra = divmod(len(sparsities), count)
    bounds = [index * size + min(index, extra) for index in range(count + 1)]
    return [sparsities[start:end] for start, end in itertools.pairwise(bounds)]


def slice_share(bridge: Bridge, device: str, payload: dict) -> SliceSweep:
    """A pool's job: one ``slice`` request for a share of a sweep on the member's device; what it did,
    complete or not (a share that failed as a whole raises)."""
    _remove_earlier_attempt(payload)
    try:
        return bridge.slice(
            payload["base_model"], payload["sparsities"], payload["output_dir"], device=device, **payload["options"]
        )
    except SweepIncomplete as exc:
        return exc.sweep


def _remove_earlier_attempt(payload: dict) -> None:
    """A retried share starts clean: the outputs of its sparsities that were not in the output directory when
    the sweep began (``before``) were published by its attempt whose server died; they are removed, so that
    the retry makes them again rather than be refused because they exist."""
    directory = Path(payload["output_dir"])
    if not directory.is_dir():
        return
    before = set(payload["before"])
    suffixes = (".pt", ".json", ".bin", "")  # run_slicegpt's files, convert's and export's: {name}_{sparsity}...
    endings = tuple(f"_{sparsity}{suffix}" for sparsity in payload["sparsities"] for suffix in suffixes)
    for path in sorted(directory.iterdir()):
        if path.name not in before and path.name.endswith(endings):
            log.warning("removing %s, made by an attempt of this share whose server died", path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def merged_sweep(
    base_model: str, shares: list[list[float]], results: list[WorkResult], verify: bool, started: float
) -> SliceSweep:
    """One sweep of the shares' sweeps; a share that failed as a whole is one ``SliceFailure`` per sparsity of it."""
    for result in results:
        if result.error is not None and not isinstance(result.error, SlicebridgeError):
            raise result.error  # a bug, not a failed share
    done = [result for result in results if result.ok]
    if not done:
        raise results[0].error
    lost = [
        protocol.SliceFailure(sparsity, _error_type(result.error), _first_line(str(result.error)))
        for result in results
        if not result.ok
        for sparsity in shares[result.index]
    ]
    sweep = SliceSweep(base_model, _merged_result(done, lost, time.perf_counter() - started), verified=verify)
    for result in done:
        sweep.verification.update(result.value.verification)
    return sweep


def _merged_result(done: list[WorkResult], lost: list[protocol.SliceFailure], seconds: float) -> protocol.SliceResult:
    """The shares' results as one: the checkpoints in the sweep's order, the dense loads of every server."""
    parts = [result.value.result for result in done]
    loads: dict[str, int] = {}  # by server: its count covers its whole life, so its latest one
    for result, part in zip(done, parts, strict=True):
        loads[result.member] = max(loads.get(result.member, 0), part.dense.get("loads", 0))
    first = parts[0]
    return protocol.SliceResult(
        output_dir=first.output_dir,
        slicer=first.slicer,
        family=first.family,
        model_name=first.model_name,
        device=", ".join(dict.fromkeys(part.device for part in parts)),
        dtype=first.dtype,
        dense={
            "cache_hit": all(part.dense.get("cache_hit") for part in parts),
            "load_seconds": max(part.dense.get("load_seconds", 0.0) for part in parts),
            "loads": sum(loads.values()),
            "servers": len(loads),
        },
        calibration=first.calibration,
        baseline_ppl=first.baseline_ppl,
        checkpoints=[checkpoint for part in parts for checkpoint in part.checkpoints],
        failed=[failure for part in parts for failure in part.failed] + lost,
        copied=list(dict.fromkeys(name for part in parts for name in part.copied)),
        timings={
            "load": max(part.timings.get("load", 0.0) for part in parts),
            "baseline_ppl": max(part.timings.get("baseline_ppl", 0.0) for part in parts),
            "total": seconds,
        },
    )


def _error_type(exc: BaseException) -> str:
    return getattr(exc, "error_type", "") or type(exc).__name__


def _remove_orphaned_partials_in(directory: Path) -> None:
    """Remove the temporaries (``.NAME.<pid>-<id>.partial``) that a dead server left in ``directory``."""
    targets = {partial.name[1:].rsplit(".", 2)[0] for partial in directory.glob(".*.*-*.partial")}
    for target in sorted(targets):
        for removed in remove_orphaned_partials(directory / target):
            log.info("removed %s, left by the server that died", removed)


def _refused(message: str) -> BadRequest:
    return BadRequest("BadRequest", message)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
