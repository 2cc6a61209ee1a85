"""Slicing with slicebridge's own maker (``model.slicing``), for a server env without slicegpt.

The dense weights are read into host memory once per sweep (``BuiltinDense``); the maker never
changes them, so each sparsity slices the same tensors without a second disk read. Calibration
takes the samples the official ``prepare_dataloader`` would draw (``model.calibration``) and the
maker fuses as slicegpt does (embeddings centred for every family), so both slicers give the same
model up to rounding; the
perplexity is the official formula (``model.perplexity``) on the held-out text, the dense model's
computed once from the same in-memory weights.
"""

from __future__ import annotations

import json
import logging
import time

from slicebridge.server import faults
from slicebridge.server.slice_plan import Report, SweepPlan

log = logging.getLogger(__name__)


def load_tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)


def pad_token_id(config: dict, tokenizer) -> int | None:
    """The token perplexity ignores: the config's pad token, else the tokenizer's, else EOS (as slicegpt's
    Llama adapter makes its pad token)."""
    for candidate in (config.get("pad_token_id"), tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(candidate, int):
            return candidate
    return None


class BuiltinDense:
    """A dense model's tensors in host memory, its tokenizer, and its baseline perplexity."""

    def __init__(self, plan: SweepPlan):
        from slicebridge.model.slicing import DenseCheckpoint

        started = time.perf_counter()
        self.dense = DenseCheckpoint.load(plan.base_dir)
        self.tokenizer = load_tokenizer(plan.base_dir)
        self.pad_token_id = pad_token_id(plan.base_config, self.tokenizer)
        self.load_seconds = time.perf_counter() - started
        self.nbytes = self.dense.nbytes
        self.baseline_ppl = self._dense_perplexity(plan) if plan.args.eval_ppl else None
        self.baseline_seconds = time.perf_counter() - started - self.load_seconds

    def slice(self, plan: SweepPlan, sparsity: float, report: Report) -> tuple[dict, str, None]:
        """The sliced state dict and its SlicingConfig's JSON (as the maker writes it); no slicegpt model."""
        from slicebridge.model.slicing import slice_dense

        def progress(stage: str, done: int, total: int) -> None:
            """The maker counts the embeddings, each layer and the head; the request reports layers."""
            layers = total - 2
            if stage == "embeddings":
                report(0, layers)
            elif stage == "layers":
                faults.at("slice.layer")
                report(done - 1, layers)

        outcome = slice_dense(
            self.dense,
            None,
            sparsity=sparsity,
            round_interval=plan.args.round_interval,
            model_name=plan.model_name,
            calibration_ids=plan.calibration.ids,
            seed=plan.args.seed,
            dtype=plan.dtype,
            progress=progress,
            final_orientation=plan.args.final_orientation,
            center_embeddings=True,  # as slicegpt's fusion does, for every family
        )
        return outcome.tensors, json.dumps(outcome.slicing_config), None

    def _dense_perplexity(self, plan: SweepPlan) -> float:
        import torch

        from slicebridge.model.slicing import dense_model

        model = dense_model(self.dense, getattr(torch, plan.dtype))
        try:
            return self.perplexity(plan, model)
        finally:
            del model

    def perplexity(self, plan: SweepPlan, model) -> float:
        """The official formula on the held-out text, ``model`` on the device."""
        from slicebridge.model.perplexity import evaluate_perplexity, perplexity_windows

        windows = perplexity_windows(plan.calibration.held_out, self.tokenizer, plan.args.ppl_eval_seqlen)
        model.to(plan.device)
        return evaluate_perplexity(
            model, windows, batch_size=plan.args.ppl_eval_batch_size, pad_token_id=self.pad_token_id
        )
