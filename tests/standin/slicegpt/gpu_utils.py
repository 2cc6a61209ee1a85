"""Test stand-in for the official ``slicegpt.gpu_utils`` (microsoft/TransformerCompression).

Reproduces:
- ``evaluate_ppl(model, pad_token_id, testloader)``: the model (already on ``config.device``)
  runs each batch as ``model(**batch)``; per sample, the mean cross-entropy of the shifted labels
  (``input_ids[:, 1:]``) over the positions whose label is not the pad id; the perplexity is the
  exp of the mean over samples. Quirks kept: a pad id of 0 (falsy) ignores nothing; padding is
  judged by the LABEL being the pad token, not by the attention mask; an empty loader fails in
  ``torch.cat``.
- ``distribute_model(model_adapter)``: accelerate's balanced device map over every GPU (the
  adapter's ``no_split_module_classes`` kept whole), buffers offloaded to ``offload/``. Only
  reachable with CUDA.
- ``sync_gpus``: ``torch.cuda.synchronize`` on every GPU (nothing without one).
(``benchmark`` is not reproduced.)
"""

from __future__ import annotations

import logging
import time

import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import get_balanced_memory
from torch.utils.data import DataLoader

from slicegpt import utils
from slicegpt.config import config
from slicegpt.model_adapter import ModelAdapter

log = logging.getLogger(__name__)


def sync_gpus() -> None:
    """Wait for every GPU to finish its queued work."""
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(device=i)


@torch.no_grad()
def evaluate_ppl(model: torch.nn.Module, pad_token_id: int | None, testloader: DataLoader) -> float:
    """Perplexity: exp of the mean over samples of each sample's mean next-token NLL (pad labels ignored)."""
    sync_gpus()
    started = time.time()
    model.eval()
    if pad_token_id:
        loss_fn = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=pad_token_id)
    else:
        loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    nlls = []
    log.info("Evaluating perplexity...")
    for batch in testloader:
        log.debug("Evaluating batch %d", len(nlls))
        batch = utils.map_tensors(batch, config.device)
        logits = model(**batch).logits[:, :-1, :]
        labels = batch["input_ids"][:, 1:]
        nll = loss_fn(logits.permute(0, 2, 1), labels).float()
        counted = labels != loss_fn.ignore_index
        nlls.append((nll * counted).sum(dim=1) / counted.sum(dim=1))
    ppl = torch.exp(torch.cat(nlls).mean())
    sync_gpus()
    elapsed = time.time() - started
    log.info(
        "Time spent on evaluation: %s", time.strftime(f"%H:%M:%S.{str(elapsed % 1)[2:]}"[:13], time.gmtime(elapsed))
    )
    return ppl.item()


def distribute_model(model_adapter: ModelAdapter) -> None:
    """Spread the model over every GPU with accelerate, keeping each decoder layer on one device."""
    model = model_adapter.model
    no_split = model_adapter.no_split_module_classes
    max_memory = get_balanced_memory(model, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    dispatch_model(
        model, device_map=device_map, offload_buffers=True, offload_dir="offload", state_dict=model.state_dict()
    )
    utils.cleanup_memory()
