"""verify the ~1B model's export against its checkpoint, against two plain forward passes.

Verification runs the same inputs (``model.compare.verification_inputs``: fixed ids and a text
window) through the checkpoint's model in the server and through the artifact in this env, and
compares the logits. Its irreducible work is therefore two forward passes of those inputs, one per
side. Baseline: the artifact's model, already loaded in this process, runs the inputs twice
(``model(ids)`` for each input, no_grad). Subject: ``bridge.verify(export_dir, checkpoint)`` on a
warm server whose cache holds the checkpoint's model; it loads the artifact itself every time, as a
user's call does. Its own timings (load_artifact, reference, artifact_forward) are the breakdown.
"""

from __future__ import annotations

import time

from common import Context, PySpy, Row, busy_frames, drop_file, fmt_seconds, ratio_summary, read_through, summary
from models import model_set

NAME = "verify_1b"
SPARSITY = 0.25


def run(ctx: Context) -> list[Row]:
    import torch

    import slicebridge
    from slicebridge.model.compare import verification_inputs

    reps = ctx.reps(5, smoke=1)
    models = model_set(ctx.cache_dir, ctx.big_preset, [SPARSITY], log=ctx.log)
    ckpt = models.checkpoint(SPARSITY)
    read_through(ckpt)
    out_dir = ctx.scratch(NAME)
    bridge = ctx.bridge()
    artifact = out_dir / "export"
    bridge.export(ckpt, artifact, overwrite=True)  # also puts the model in the server's warm cache

    contents = slicebridge.load(artifact)
    model = contents["model"].eval()
    inputs = verification_inputs(model.config.vocab_size, contents["tokenizer"])

    def two_passes(model=model) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for _ in range(2):
                for ids in inputs.values():
                    model(ids)
        return time.perf_counter() - started

    two_passes()  # warm-up (first-call allocations)
    report = bridge.verify(artifact, ckpt)  # warm-up: server and client paths
    assert report.passed, report.table()

    baseline, subject, timings = [], [], []
    profile = {}
    for rep in range(reps):
        baseline.append(two_passes())
        started = time.perf_counter()
        report = bridge.verify(artifact, ckpt)
        subject.append(time.perf_counter() - started)
        timings.append(report.timings)
        ctx.log(
            f"   rep {rep + 1}/{reps}: two forward passes {baseline[-1]:.2f}s, verify {subject[-1]:.2f}s "
            f"(load {report.timings['load_artifact']:.2f}s, reference {report.timings['reference']:.2f}s, "
            f"artifact forward {report.timings['artifact_forward']:.2f}s)"
        )
    # The reference request on its own: the server's handler time against what the client sees.
    from slicebridge.bridge import protocol

    started = time.perf_counter()
    reference = bridge.request(
        "reference", protocol.ReferenceArgs(slicegpt_model=str(ckpt), inputs=list(inputs.values()))
    )
    reference_request_s = time.perf_counter() - started
    logits_bytes = sum(t.numel() * t.element_size() for t in reference.logits)
    if ctx.profile:
        import os

        client_spy = PySpy(os.getpid(), out_dir / "client.txt", rate=200)
        with client_spy:
            bridge.verify(artifact, ckpt)
        profile = {"client": client_spy.top(12, thread="MainThread")}
    del model, contents, two_passes  # free the artifact's model before the next benchmark
    drop_file(out_dir)

    med = lambda xs: summary(xs)["median"]  # noqa: E731
    parts = {k: med([t[k] for t in timings]) for k in timings[0]}
    one_pass = med(baseline) / 2
    tokens = sum(int(ids.numel()) for ids in inputs.values())
    row = Row(
        bench=NAME,
        name=NAME,
        what=f"verify the {ctx.big_preset} model's export against its checkpoint ({tokens} tokens in "
        f"{len(inputs)} inputs), warm server cache",
        baseline="two plain forward passes of the same inputs (the artifact's model, loaded, in this process)",
        unit="s",
        subject=summary(subject),
        baseline_measured=summary(baseline),
        ratio={**ratio_summary(subject, baseline), "definition": "verify time / two forward passes"},
        target={"text": "≤ 1.5× baseline", "metric": "ratio", "op": "<=", "value": 1.5},
        absolute={"one_forward_pass_s": one_pass, "tokens": tokens},
        breakdown={
            "verify_timings_s": parts,
            "reference_request_s": reference_request_s,
            "reference_server_handler_s": reference.seconds,
            "reference_logits_bytes": logits_bytes,
            **({"pyspy": profile} if profile else {}),
        },
    ).judge()
    if timings:
        rest = parts["total"] - parts["load_artifact"] - parts["reference"] - parts["artifact_forward"]
        overhead = parts["total"] - parts["reference"] - parts["artifact_forward"]
        row.analysis += [
            f"verify = load the artifact in this env {fmt_seconds(parts['load_artifact'])} + reference request "
            f"(server forward of the inputs, logits back as float32 tensors) {fmt_seconds(parts['reference'])} + "
            f"the artifact's forward here {fmt_seconds(parts['artifact_forward'])} + comparison "
            f"{fmt_seconds(rest)}; one plain forward pass of the inputs takes {fmt_seconds(one_pass)}. A reference "
            f"request alone took {fmt_seconds(reference_request_s)} at the client, "
            f"{fmt_seconds(reference.seconds)} in the server's handler (the rest: queueing, "
            f"{logits_bytes / 2**20:.0f} MB of logits, decoding).",
            f"so the two forward passes are {100 * (1 - overhead / parts['total']):.0f} % of a verify; what is "
            f"left ({fmt_seconds(overhead)}) is loading, transfer and comparison. The passes run one after the "
            "other (server, then client); sending the reference request before loading the artifact and "
            "awaiting it after the local forward would overlap them, bounded by the CPUs both sides share.",
        ]
        if profile.get("client", {}).get("samples"):
            row.analysis.append("py-spy, client (self time): " + busy_frames(profile["client"], 6, "self"))
    return [row]
