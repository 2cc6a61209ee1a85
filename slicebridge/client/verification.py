"""Verification: does an artifact, loaded where it will be used, compute what the checkpoint does?

The reference side runs in the server (the official slicegpt model when the env has
slicegpt, else our loader there, in transformers 4.41). The artifact side runs here, in
the caller's env, loaded the way a user would load it (``slicebridge.load``). Both get
the same inputs — fixed token ids and a text window (the user's text, or a small
embedded default) — and ``model.compare`` turns the two sets of logits into metrics and
a pass/fail against per-dtype tolerances.

A ``.bin`` made the seed's way is not loaded at all: its pickle is scanned, and the
report says which of the three known failures it meets here and that ``upgrade`` fixes it.

Logits come back from the server as float32 tensors, never pickled: through shared memory
when they are 1 MiB or more (see ``bridge.shm``), so their size does not make verification
slow. ``make bench`` measured it on the ~1B model: 27 MB of logits for 224 positions, and a
verification that takes 1.07× the time of the two plain forward passes it has to run (make bench: verify_1b).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slicebridge.bridge import protocol
from slicebridge.dtypes import dtype_name
from slicebridge.model.compare import compare, forward_logits, verification_inputs
from slicebridge.model.families import BY_KEY
from slicebridge.model.portable import family_of


@dataclass
class VerifyReport:
    artifact: str
    kind: str  # "bin", "export" or "seed-bin"
    checkpoint: str
    family: str = ""  # the artifact's model family (llama, opt, phi2, phi3)
    passed: bool = False
    failures: list = field(default_factory=list)
    diagnosis: list = field(default_factory=list)  # for seed-format files: the failures met in this env
    fix: str = ""
    compared_dtype: str = ""
    tolerance: dict = field(default_factory=dict)
    inputs: list = field(default_factory=list)  # one metrics map per input
    artifact_side: dict = field(default_factory=dict)
    reference_side: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=1)

    def table(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        family = f", {self.family}" if self.family else ""
        lines = [f"verify {self.artifact} ({self.kind}{family}) against {self.checkpoint}: {verdict}"]
        if self.diagnosis:
            lines += ["it does not load in this env:"] + [f"  - {d}" for d in self.diagnosis]
            lines.append(f"fix: {self.fix}")
            return "\n".join(lines)
        if self.inputs:
            a, r = self.artifact_side, self.reference_side
            lines += [
                f"{'':16s}{'artifact (this env)':32s}reference (server)",
                f"{'dtype / device':16s}{a['dtype'] + ' / ' + a['device']:32s}{r['dtype']} / {r['device']}",
                f"{'loaded by':16s}{a['loader']:32s}{r['loader']} loader",
                f"{'transformers':16s}{a['transformers']:32s}{r['versions'].get('transformers') or '-'}",
                "",
                f"{'input':8s}{'tokens':>7s}{'max|Δlogit|':>13s}{'NMSE':>11s}{'top-1':>9s}"
                f"{'ppl':>11s}{'ppl ref':>11s}{'Δppl rel':>10s}",
            ]
            for m in self.inputs:
                lines.append(
                    f"{m['name']:8s}{m['tokens']:7d}{m['max_abs_diff']:13.3g}{m['nmse']:11.3g}"
                    f"{m['top1']:9.1%}{m['ppl_artifact']:11.4g}{m['ppl_reference']:11.4g}"
                    f"{m['ppl_rel_diff']:10.2g}"
                )
            t = self.tolerance
            lines.append(
                f"tolerance ({self.compared_dtype}): NMSE ≤ {t['nmse']:g}, top-1 ≥ {t['top1']:.0%}, "
                f"|Δppl|/ppl ≤ {t['ppl_rel']:g}"
            )
        lines += [f"  - {f}" for f in self.failures]
        return "\n".join(lines)


def load_artifact(path: Path) -> dict:
    """Load an artifact the way a user would: ``slicebridge.load`` (safe for .bin files)."""
    import slicebridge

    return slicebridge.load(path)


def verify_artifact(
    bridge,
    artifact: str | os.PathLike,
    checkpoint: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    sparsity: float | None = None,
    round_interval: int | None = None,
    text: str | None = None,
    loader: str = "auto",
    device: str = "auto",
    artifact_device: str = "cpu",
    on_event=None,
) -> VerifyReport:
    """Compare ``artifact`` (loaded here) with ``checkpoint`` (run in the server)."""
    import torch
    import transformers

    from slicebridge.model.pickle_scan import diagnose_seed_bin

    started = time.perf_counter()
    path = Path(artifact).expanduser().absolute()
    checkpoint_path = os.path.abspath(os.path.expanduser(os.fspath(checkpoint)))
    report = VerifyReport(str(path), "export" if path.is_dir() else "bin", checkpoint_path, passed=False)
    if path.is_file():
        diagnosis = diagnose_seed_bin(path)
        if diagnosis.is_seed_format:
            report.kind, report.diagnosis, report.fix = "seed-bin", diagnosis.failures, diagnosis.fix
            report.failures = [
                "a .bin made the seed's way (a dill pickle of the slicegpt model object) does not load in this env"
            ]
            return report
    try:
        contents = load_artifact(path)
    except Exception as exc:  # a broken artifact is a failed verification, said in a sentence
        report.failures = [f"the artifact does not load here: {type(exc).__name__}: {exc}"]
        return report
    model = contents["model"].to(artifact_device).eval()
    report.family = family_of(model.config).key
    loaded_at = time.perf_counter()
    if sparsity is None and os.path.isdir(checkpoint_path):  # the run dir's checkpoint the artifact was made from
        sparsity = (contents.get("provenance" if report.kind == "export" else "config") or {}).get("sparsity")

    tokenizer = contents.get("tokenizer")
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_model or Path(checkpoint_path).parent, trust_remote_code=False)
    inputs = verification_inputs(model.config.vocab_size, tokenizer, text)

    reference = bridge.request(
        "reference",
        protocol.ReferenceArgs(
            slicegpt_model=checkpoint_path,
            inputs=list(inputs.values()),
            base_model=os.path.abspath(base_model) if base_model else None,
            sparsity=sparsity,
            round_interval=round_interval,
            loader=loader,
            device=device,
            family=report.family,
        ),
        on_event=on_event,
    )
    referenced_at = time.perf_counter()
    if reference.family != report.family:
        report.failures = [
            f"the artifact is a sliced {BY_KEY[report.family].title} but the checkpoint is a sliced "
            f"{BY_KEY[reference.family].title}: it was not made from that checkpoint"
        ]
        return report

    artifact_dtype = dtype_name(next(model.parameters()).dtype)
    try:
        artifact_logits = forward_logits(model, inputs.values(), artifact_device)
    except (RuntimeError, ValueError, IndexError, KeyError) as exc:  # a model its own config breaks
        report.failures = [f"the artifact loads but does not run here: {type(exc).__name__}: {exc}"]
        return report
    comparison = compare(inputs, artifact_logits, reference.logits, (artifact_dtype, reference.dtype))
    report.compared_dtype, report.tolerance = comparison.dtype, comparison.tolerance
    report.inputs = [c.as_dict() for c in comparison.inputs]
    report.failures, report.passed = comparison.failures, comparison.passed
    report.artifact_side = {
        "dtype": artifact_dtype,
        "device": artifact_device,
        "loader": "slicebridge.load",
        "transformers": transformers.__version__,
        "torch": str(torch.__version__),
    }
    report.reference_side = {
        "dtype": reference.dtype,
        "device": reference.device,
        "loader": reference.loader,
        "official_name": reference.official_name,
        "versions": reference.versions,
        "cache_hit": reference.cache_hit,
    }
    done = time.perf_counter()
    report.timings = {
        "load_artifact": loaded_at - started,
        "reference": referenced_at - loaded_at,
        "artifact_forward": done - referenced_at,
        "total": done - started,
    }
    return report
