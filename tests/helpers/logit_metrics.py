"""Logit comparisons shared by the tests and the helper scripts (any interpreter: torch only)."""

from __future__ import annotations

import torch


def nmse(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Sum of squared differences over the sum of squared reference logits (in float64)."""
    logits, reference = logits.double(), reference.double()
    return float(((logits - reference) ** 2).sum() / (reference**2).sum())


def top1(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of positions whose argmax agrees."""
    return float((logits.argmax(-1) == reference.argmax(-1)).double().mean())


def compare_logits(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    return {
        "nmse": nmse(logits, reference),
        "max_abs_diff": float((logits.double() - reference.double()).abs().max()),
        "top1_agreement": top1(logits, reference),
    }
