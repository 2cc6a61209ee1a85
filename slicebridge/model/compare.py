"""Comparing two models' logits: the numbers verification reports, and its tolerances.

For each input (fixed token ids, a text window) we compare the artifact's logits with
the reference's: max |Δlogit|, NMSE (sum of squared differences over sum of squared
reference logits), top-1 agreement, and the perplexity of each side on the input's
own next tokens.

Default tolerances, by the lower precision of the two sides:

| dtype | NMSE ≤ | top-1 ≥ | |Δppl| / ppl ≤ |
| --- | --- | --- | --- |
| float32 | 1e-6 | 0.99 | 1e-3 |
| float16 | 1e-4 | 0.95 | 1e-2 |
| bfloat16 | 1e-3 | 0.90 | 3e-2 |

Why: an artifact built from the same tensors computes the same function, and differs
from the reference by rounding only. Measured on the shared fixture: the official fp16
model against itself cast to fp32 gives NMSE 6.5e-7 (100 % top-1); our portable model
against the official one gives 1.7e-11 in fp32 and 7.7e-7 in fp16 (reference made on
another CPU), and exactly 0 when both sides run fp16 on the same CPU. fp16 rounds at
2^-11 per operation, bf16 at 2^-8, and GPUs accumulate in other orders than CPUs, so
the fp16 bound leaves two orders of magnitude for other hardware, bf16 ten times more.

What it catches: one flipped exponent bit in a single fp16 weight (bit rot, a bad
copy) gives NMSE 0.08 to 1.9 and top-1 down to 0 % on the fixture. What it does not: a
small nudge to one weight (+1.0 on one q_proj entry) gives NMSE 5.6e-6 and passes in
fp16. Verification proves the function is the same within rounding, not that every
byte is; compare checksums for that. Top-1 allows a few flips between near-tied logits
at low precision.

``compare`` is the one comparison: ``verify`` runs it in the caller's env, and the server
runs it for the export's check against the official model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from slicebridge.dtypes import dtype_name

TOLERANCES: dict[str, dict[str, float]] = {
    "float32": {"nmse": 1e-6, "top1": 0.99, "ppl_rel": 1e-3},
    "float16": {"nmse": 1e-4, "top1": 0.95, "ppl_rel": 1e-2},
    "bfloat16": {"nmse": 1e-3, "top1": 0.90, "ppl_rel": 3e-2},
}
_PRECISION_ORDER = ["bfloat16", "float16", "float32"]  # lowest first

# The inputs every verification uses: fixed token ids, and a window of text.
PROBE_SHAPE = (2, 48)
PROBE_SEED = 1234
TEXT_WINDOW = 128


def comparison_dtype(*dtypes) -> str:
    """The lowest precision among the sides (float64 counts as float32)."""
    names = [dtype_name(d).replace("float64", "float32") for d in dtypes]
    return min(names, key=lambda d: _PRECISION_ORDER.index(d) if d in _PRECISION_ORDER else 2)


def working_copies(*logits) -> list:
    """The logits on the CPU in float32 (float64 if one of them is): exact for float16 and bfloat16 ones, and no
    copy of float32 ones on the CPU. Verification compares ~30 MB of logits per side on a 1B model: working on
    float64 copies of them, its comparison took 3× as long (0.42 s against 0.13 s, best of 9, 2 CPUs)."""
    import torch

    dtype = torch.float64 if any(t.dtype == torch.float64 for t in logits) else torch.float32
    return [t.detach().to("cpu", dtype) for t in logits]


def nmse(artifact_logits, reference_logits) -> float:
    """Sum of squared differences over the sum of squared reference logits (see ``working_copies``)."""
    got, want = working_copies(artifact_logits, reference_logits)
    return _nmse(got - want, want)


def _nmse(difference, reference) -> float:
    """The ratio of the two sums of squares, each the dot product of the flattened tensor with itself (BLAS,
    in the tensors' dtype: ~1e-5 relative in float32, far inside any tolerance), taken in float64: 0/0 is NaN
    and x/0 is inf, which fail every tolerance."""
    import torch

    squares = [torch.dot(flat, flat).double() for flat in (difference.reshape(-1), reference.reshape(-1))]
    return float(squares[0] / squares[1])


def top1_agreement(artifact_logits, reference_logits) -> float:
    """The fraction of positions whose argmax agrees (``max(-1).indices``: the first maximum, as ``argmax``
    gives, in half its time on the CPU)."""
    return float((artifact_logits.max(-1).indices == reference_logits.max(-1).indices).double().mean())


def logit_metrics(artifact_logits, reference_logits) -> dict[str, float]:
    """max |Δlogit|, NMSE and top-1 agreement of two logit tensors of one shape (any float dtype, any device)."""

    got, want = working_copies(artifact_logits, reference_logits)
    if got.shape != want.shape:
        raise ValueError(f"artifact logits {tuple(got.shape)} vs reference {tuple(want.shape)}")
    difference = got - want
    return {
        "max_abs_diff": float(difference.abs().max()),
        "nmse": _nmse(difference, want),
        "top1": top1_agreement(got, want),
    }


@dataclass
class InputComparison:
    name: str
    tokens: int
    max_abs_diff: float
    nmse: float
    top1: float
    ppl_artifact: float
    ppl_reference: float

    @property
    def ppl_rel_diff(self) -> float:
        return abs(self.ppl_artifact - self.ppl_reference) / self.ppl_reference

    def failures(self, tolerance: dict[str, float]) -> list[str]:
        problems = []
        if not self.nmse <= tolerance["nmse"]:  # "not <=" also catches NaN
            problems.append(f"{self.name}: NMSE {self.nmse:.3g} > {tolerance['nmse']:g}")
        if not self.top1 >= tolerance["top1"]:
            problems.append(f"{self.name}: top-1 agreement {self.top1:.1%} < {tolerance['top1']:.0%}")
        if not self.ppl_rel_diff <= tolerance["ppl_rel"]:
            problems.append(
                f"{self.name}: perplexity {self.ppl_artifact:.4g} vs {self.ppl_reference:.4g} "
                f"(relative difference {self.ppl_rel_diff:.3g} > {tolerance['ppl_rel']:g})"
            )
        return problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ppl_rel_diff": self.ppl_rel_diff}


def compare_logits(name: str, input_ids, artifact_logits, reference_logits) -> InputComparison:
    """Metrics of one input: ``*_logits`` are [batch, seq, vocab] (any float dtype)."""
    try:
        metrics = logit_metrics(artifact_logits, reference_logits)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return InputComparison(
        name=name,
        tokens=int(input_ids.numel()),
        **metrics,
        ppl_artifact=perplexity(artifact_logits, input_ids),
        ppl_reference=perplexity(reference_logits, input_ids),
    )


@dataclass
class Comparison:
    """A whole verification's numbers: per-input metrics, the precision compared at and its tolerance."""

    dtype: str
    tolerance: dict[str, float]
    inputs: list[InputComparison]

    @property
    def failures(self) -> list[str]:
        return [problem for c in self.inputs for problem in c.failures(self.tolerance)]

    @property
    def passed(self) -> bool:
        return not self.failures

    def by_input(self) -> dict[str, dict[str, Any]]:
        """Each input's metrics and whether it passed, by input name (the export's model card form)."""
        return {
            c.name: {**{k: v for k, v in c.as_dict().items() if k != "name"}, "passed": not c.failures(self.tolerance)}
            for c in self.inputs
        }


def compare(
    inputs: Mapping[str, Any], artifact_logits: Sequence, reference_logits: Sequence, dtypes: Sequence
) -> Comparison:
    """Compare the artifact's logits with the reference's on each named input, at the lowest of ``dtypes``."""
    dtype = comparison_dtype(*dtypes)
    compared = [
        compare_logits(name, ids, got, want)
        for (name, ids), got, want in zip(inputs.items(), artifact_logits, reference_logits, strict=True)
    ]
    return Comparison(dtype, TOLERANCES[dtype], compared)


def forward_logits(model, inputs: Iterable, device, on_input: Callable[[int], None] | None = None) -> list:
    """The model's logits for each [batch, seq] id tensor, as float32 on the CPU (no gradients)."""
    import torch

    logits = []
    with torch.no_grad():
        for index, ids in enumerate(inputs):
            if on_input is not None:
                on_input(index)
            logits.append(model(ids.to(device, torch.long)).logits.float().cpu())
    return logits


def perplexity(logits, input_ids) -> float:
    """exp of the mean next-token cross entropy of ``input_ids`` under ``logits``."""
    import torch

    (shifted,) = working_copies(logits[:, :-1].reshape(-1, logits.shape[-1]))
    targets = input_ids[:, 1:].reshape(-1).to(shifted.device)
    loss = torch.nn.functional.cross_entropy(shifted, targets)
    value = float(loss)
    return math.exp(value) if value < 700 else math.inf


def default_text() -> str:
    from slicebridge.model.sample_text import embedded_text

    return embedded_text()


def probe_ids(vocab_size: int, first_regular_id: int = 3):
    """Fixed token ids: the same for every run, spread over the vocabulary."""
    import torch

    generator = torch.Generator().manual_seed(PROBE_SEED)
    return torch.randint(first_regular_id, vocab_size, PROBE_SHAPE, generator=generator)


def text_ids(tokenizer, text: str, window: int = TEXT_WINDOW):
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :window]
    if ids.shape[1] < 2:
        raise ValueError("the verification text gives fewer than 2 tokens; pass a longer text")
    return ids


def verification_inputs(vocab_size: int, tokenizer, text: str | None = None) -> dict:
    """The named inputs of a verification: ``probe`` (fixed ids) and ``text`` (a window of text)."""
    return {"probe": probe_ids(vocab_size), "text": text_ids(tokenizer, text if text is not None else default_text())}
