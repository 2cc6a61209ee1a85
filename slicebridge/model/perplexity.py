"""Perplexity on held-out text, as the official ``run_slicegpt.py`` measures it.

``perplexity_windows`` cuts the text as ``data_utils.prepare_test_dataloader`` does (the texts
joined by ``"\\n\\n"``, tokenized once, cut into whole windows of ``seqlen`` tokens, the rest
dropped), and ``evaluate_perplexity`` is ``gpu_utils.evaluate_ppl``'s formula: per window, the
mean negative log-likelihood of its next tokens (labels equal to the pad token ignored when the
model has a non-zero one), then ``exp`` of the mean over windows. The logits are taken in
float32. Any causal LM whose call takes ``input_ids`` and ``attention_mask`` and returns
``.logits`` works: a transformers model (4.41 or 5.x) or slicebridge's portable sliced model.

torch + transformers' tokenizers only (no ``datasets``, no slicegpt): it runs in both envs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .calibration import CalibrationError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# What CrossEntropyLoss ignores when no pad token is given (its default ignore_index).
NO_PAD = -100

WindowProgress = Callable[[int, int], None]  # (windows done, windows in all)


def perplexity_windows(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, seqlen: int) -> torch.Tensor:
    """``[n, seqlen]`` token ids: ``"\\n\\n".join(texts)`` tokenized once and cut into the ``n``
    whole windows it holds (the tokens after the last whole window are dropped)."""
    if seqlen < 1:
        raise CalibrationError(f"ppl_eval_seqlen must be positive, not {seqlen}")
    ids = torch.as_tensor(tokenizer("\n\n".join(texts))["input_ids"], dtype=torch.long)
    count = ids.numel() // seqlen
    if count == 0:
        raise CalibrationError(
            f"the held-out text has {ids.numel()} tokens, fewer than ppl_eval_seqlen={seqlen}; "
            "add text (or hold more of it out), or lower ppl_eval_seqlen"
        )
    return ids[: count * seqlen].reshape(count, seqlen)


def window_nlls(model: nn.Module, input_ids: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Each window's mean negative log-likelihood of its tokens after the first (float32, one per row)."""
    logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits
    labels = input_ids[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1, :].float().permute(0, 2, 1), labels, reduction="none", ignore_index=ignore_index
    )
    counted = labels != ignore_index
    return (nll * counted).sum(dim=1) / counted.sum(dim=1)


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int,
    pad_token_id: int | None,
    device: torch.device | str | None = None,
    progress: WindowProgress | None = None,
) -> float:
    """``model``'s perplexity on ``windows`` ([n, seqlen] token ids), ``batch_size`` windows per
    call, on ``device`` (default: where the model's first parameter is). As the official,
    ``pad_token_id`` (when truthy) is the label ignored, and the model is put in eval mode.
    ``progress(done, total)`` is called after each batch."""
    if batch_size < 1:
        raise ValueError(f"ppl_eval_batch_size must be positive, not {batch_size}")
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(
            f"windows must be [n, seqlen] token ids with n >= 1 and seqlen >= 2, not {tuple(windows.shape)}"
        )
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ignore_index = pad_token_id if pad_token_id else NO_PAD
    model.eval()
    total = windows.shape[0]
    means = []
    for start in range(0, total, batch_size):
        batch = windows[start : start + batch_size].to(device)
        means.append(window_nlls(model, batch, ignore_index).cpu())
        if progress is not None:
            progress(min(start + batch_size, total), total)
    ppl = float(torch.exp(torch.cat(means).mean()))
    logger.info("perplexity %.4f on %d windows of %d tokens", ppl, total, windows.shape[1])
    return ppl
