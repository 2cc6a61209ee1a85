"""verify the ~1B model's export against its checkpoint, against two plain forward passes.

Verification runs the same inputs (``model.compare.verification_inputs``: fixed ids and a text
window) through the checkpoint's model in the server and through the artifact in this env, and
compares the logits. Its irreducible work is therefore two forward passes of those inputs, one per
side: that is the row's bound (and its baseline). Measured: the artifact's model, already loaded in
this process, runs the inputs twice (``model(ids)`` for each input, no_grad). Subject:
``bridge.verify(export_dir, checkpoint)`` on a warm server whose cache holds the checkpoint's model;
it loads the artifact itself every time, as a user's call does. Its own timings (load_artifact,
reference, artifact_forward) are the breakdown, with the comparison of the logits timed on its own.
"""

from __future__ import annotations

import time

from common import (
    Context,
    PySpy,
    Row,
    busy_frames,
    drop_file,
    fmt_seconds,
    ratio_of_minimums,
    ratio_summary,
    read_through,
    summary,
)
from models import model_set

NAME = "verify_1b"
SPARSITY = 0.25
BOUND_RATIO = 1.1  # verify ≤ 1.1× the two forward passes it has to run


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
    steps = _steps(bridge, ckpt, model, inputs)
    if ctx.profile:
        import os

        client_spy = PySpy(os.getpid(), out_dir / "client.txt", rate=200)
        with client_spy:
            bridge.verify(artifact, ckpt)
        steps["pyspy"] = {"client": client_spy.top(12, thread="MainThread")}
    del model, contents, two_passes  # free the artifact's model before the next benchmark
    drop_file(out_dir)
    tokens = sum(int(ids.numel()) for ids in inputs.values())
    return [_row(ctx, subject, baseline, timings, steps, tokens, len(inputs))]


def _steps(bridge, ckpt, model, inputs) -> dict:
    """verify's steps beyond the forward passes, each timed on its own: the reference request (at the
    client, and its handler in the server), the local forward as verify runs it, and the comparison."""
    from slicebridge.bridge import protocol
    from slicebridge.dtypes import dtype_name
    from slicebridge.model.compare import compare, forward_logits

    started = time.perf_counter()
    reference = bridge.request(
        "reference", protocol.ReferenceArgs(slicegpt_model=str(ckpt), inputs=list(inputs.values()))
    )
    reference_request = time.perf_counter() - started
    started = time.perf_counter()
    logits = forward_logits(model, inputs.values(), "cpu")
    local_forward = time.perf_counter() - started
    started = time.perf_counter()
    compare(inputs, logits, reference.logits, (dtype_name(next(model.parameters()).dtype), reference.dtype))
    return {
        "reference_request_s": reference_request,
        "reference_server_handler_s": reference.seconds,
        "reference_logits_bytes": sum(t.numel() * t.element_size() for t in reference.logits),
        "local_forward_logits_s": local_forward,
        "compare_s": time.perf_counter() - started,
    }


def _row(ctx: Context, subject, baseline, timings, steps, tokens: int, n_inputs: int) -> Row:
    med = lambda xs: summary(xs)["median"]  # noqa: E731
    parts = {k: med([t[k] for t in timings]) for k in timings[0]}
    one_pass = med(baseline) / 2
    profile = steps.pop("pyspy", {})
    row = Row(
        bench=NAME,
        name=NAME,
        what=f"verify the {ctx.big_preset} model's export against its checkpoint ({tokens} tokens in "
        f"{n_inputs} inputs), warm server cache",
        baseline="two plain forward passes of the same inputs (the artifact's model, loaded, in this process)",
        unit="s",
        subject=summary(subject),
        baseline_measured=summary(baseline),
        ratio={**ratio_summary(subject, baseline), "definition": "verify time / two forward passes"},
        target={"text": f"≤ {BOUND_RATIO}× baseline", "metric": "ratio", "op": "<=", "value": BOUND_RATIO},
        absolute={"one_forward_pass_s": one_pass, "tokens": tokens},
        breakdown={"verify_timings_s": parts, **steps, **({"pyspy": profile} if profile else {})},
    )
    row.against_bound(
        "two forward passes of the inputs (one per side), plain model(ids) in this process",
        baseline,
        {
            "text": f"≤ {BOUND_RATIO}× bound",
            "conditions": [{"metric": "ratio", "op": "<=", "value": BOUND_RATIO}],
        },
        definition="verify time / two forward passes",
        ratio_of_minimums=ratio_of_minimums(subject, baseline),
    ).judge()
    beyond = med(subject) - med(baseline)
    transfer = steps["reference_request_s"] - steps["reference_server_handler_s"]
    row.analysis += [
        f"verify = load the artifact in this env {fmt_seconds(parts['load_artifact'])} + reference request "
        f"(server forward of the inputs, logits back as float32 tensors) {fmt_seconds(parts['reference'])} + "
        f"the artifact's forward here and the comparison {fmt_seconds(parts['artifact_forward'])}; one plain "
        f"forward pass of the inputs takes {fmt_seconds(one_pass)}.",
        f"beyond the two passes verify spends {fmt_seconds(beyond)} ({100 * beyond / med(subject):.0f} % of it), "
        f"timed step by step: loading the artifact {fmt_seconds(parts['load_artifact'])}; the reference request "
        f"{fmt_seconds(steps['reference_request_s'])} at the client, of which the server's handler "
        f"{fmt_seconds(steps['reference_server_handler_s'])} and transfer + decoding of "
        f"{steps['reference_logits_bytes'] / 2**20:.0f} MB of logits {fmt_seconds(transfer)}; the local forward "
        f"as verify runs it (logits to float32) {fmt_seconds(steps['local_forward_logits_s'])} against "
        f"{fmt_seconds(one_pass)} plain; the comparison {fmt_seconds(steps['compare_s'])}. The server's forward "
        "runs in the other env (transformers 4.41, its own threads): its pass is not the same cost as this one's.",
    ]
    if profile.get("client", {}).get("samples"):
        row.analysis.append("py-spy, client (self time): " + busy_frames(profile["client"], 6, "self"))
    return row
