"""Slicing with the official slicegpt package, call for call as ``experiments/run_slicegpt.py`` does.

For the same arguments the script runs, per sparsity::

    hf_utils.get_model_and_tokenizer(model, model_path, dtype=...)      # once per sweep here
    data_utils.prepare_dataloader(train, tokenizer, max_seqlen, batch_size, nsamples, varied_seqlen, seed)
    gpu_utils.evaluate_ppl(model, pad_token_id, test_loader)            # the baseline, once per sweep here
    layernorm_fusion.replace_layers(adapter); layernorm_fusion.fuse_modules(adapter)   # once per sweep here
    rotate.rotate_and_slice(adapter, train_loader, ConstSlicingScheduler(width), final_orientation=...)
    torch.save(model.state_dict(), ...); adapter.slicing_conf.to_json_string()
    gpu_utils.evaluate_ppl(model, pad_token_id, test_loader)

The dense model is loaded, measured and fused once (``OfficialDense``); each sparsity slices a
deep copy of the fused model held on the host, so no sparsity reads the disk again. The
calibration loader is prepared right before ``rotate_and_slice`` (it seeds torch's RNG itself,
and nothing draws from it in between, as in the script). Where the script leaves numpy's RNG
unseeded (the ``random`` final orientation), it is seeded with ``seed``: the same request gives
the same checkpoint (the model computes the same function for any orientation). The script's
``--ppl-eval-seqlen`` is honoured (the script itself forgets to pass it on).
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from typing import Any

from slicebridge.bridge.server_loop import HandlerError
from slicebridge.server import faults
from slicebridge.server.slice_plan import Report, SweepPlan

log = logging.getLogger(__name__)


class OfficialNameRefused(HandlerError):
    """slicegpt's adapters take a model by its name alone, and none took this one."""

    error_type = "BadRequest"


def _dataset(texts: list[str]):
    import datasets

    return datasets.Dataset.from_dict({"text": list(texts)})


def _configure(plan: SweepPlan) -> None:
    import torch
    from slicegpt.config import config

    config.device = torch.device(plan.device)
    config.dtype = getattr(torch, plan.dtype)


class OfficialDense:
    """A dense model loaded with slicegpt's hf_utils, its baseline perplexity taken, fused once."""

    def __init__(self, plan: SweepPlan):
        import torch
        from slicegpt import hf_utils, layernorm_fusion

        _configure(plan)
        started = time.perf_counter()
        try:
            self.adapter, self.tokenizer = hf_utils.get_model_and_tokenizer(
                plan.model_name, str(plan.base_dir), token=None, dtype=getattr(torch, plan.dtype)
            )
        except NotImplementedError:
            raise OfficialNameRefused(
                f"slicegpt's adapters do not accept the model name {plan.model_name!r} (its {plan.family.title} "
                f"adapter takes names like {plan.family.official_names}); pass model_name=..."
            ) from None
        _tokenizer_the_script_can_use(self.tokenizer, self.adapter.model)
        self.load_seconds = time.perf_counter() - started
        self.baseline_ppl = self.perplexity(plan, self.adapter) if plan.args.eval_ppl else None
        self.baseline_seconds = time.perf_counter() - started - self.load_seconds
        layernorm_fusion.replace_layers(self.adapter)
        layernorm_fusion.fuse_modules(self.adapter)
        self.nbytes = sum(p.numel() * p.element_size() for p in self.adapter.model.parameters())

    def calibration_loader(self, plan: SweepPlan):
        from slicegpt import data_utils

        args = plan.args
        return data_utils.prepare_dataloader(
            dataset=_train_dataset(plan),
            tokenizer=self.tokenizer,
            max_seqlen=args.cal_max_seqlen,
            batch_size=args.cal_batch_size,
            nsamples=args.cal_nsamples,
            varied_seqlen=args.varied_seqlen,
            seed=args.seed,
        )

    def slice(self, plan: SweepPlan, sparsity: float, report: Report) -> tuple[dict, str, Any]:
        """The sliced state dict, its SlicingConfig's JSON and the sliced slicegpt adapter."""
        import numpy as np
        from slicegpt import rotate
        from slicegpt.slicing_scheduler import ConstSlicingScheduler

        _configure(plan)
        adapter = copy.deepcopy(self.adapter)
        np.random.seed(plan.args.seed)
        loader = self.calibration_loader(plan)
        _report_layers(adapter, report)
        rotate.rotate_and_slice(
            adapter, loader, ConstSlicingScheduler(plan.width(sparsity)), final_orientation=plan.args.final_orientation
        )
        del adapter.get_layers  # the instance's progress wrapper: back to the class's method
        adapter.model.eval()
        state = adapter.model.state_dict()
        return state, adapter.slicing_conf.to_json_string(), adapter

    def perplexity(self, plan: SweepPlan, adapter) -> float:
        """slicegpt's evaluate_ppl on the held-out text, the model on the device (or spread over GPUs) meanwhile."""
        from slicegpt import data_utils, gpu_utils, utils

        loader = data_utils.prepare_test_dataloader(
            dataset=_dataset(plan.calibration.held_out),
            tokenizer=self.tokenizer,
            seqlen=plan.args.ppl_eval_seqlen,
            batch_size=plan.args.ppl_eval_batch_size,
        )
        model = adapter.model
        if plan.args.distribute_model:
            gpu_utils.distribute_model(adapter)
        else:
            model.to(plan.device)
        try:
            return float(gpu_utils.evaluate_ppl(model, model.config.pad_token_id, loader))
        finally:
            model.cpu()
            utils.cleanup_memory()


def _tokenizer_the_script_can_use(tokenizer, model) -> None:
    """Mend what would make the script's calibration loader fail on a tokenizer saved incompletely.

    The loader pads each batch and passes it whole to ``model(**batch)``. A tokenizer without a pad
    token gets its EOS as pad token (what slicegpt's Llama adapter does for Llama tokenizers); one
    saved without ``model_input_names`` stops returning ``token_type_ids`` when the model's forward
    does not take them. Released Llama, OPT and Phi tokenizers need neither, so neither changes a
    checkpoint made from them.
    """
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        log.info("the tokenizer has no pad token: padding calibration batches with its EOS, as slicegpt does for Llama")
        tokenizer.pad_token = tokenizer.eos_token
    if (
        "token_type_ids" in tokenizer.model_input_names
        and "token_type_ids" not in inspect.signature(model.forward).parameters
    ):
        log.info("the tokenizer returns token_type_ids, which %s does not take: leaving them out", type(model).__name__)
        tokenizer.model_input_names = [name for name in tokenizer.model_input_names if name != "token_type_ids"]


def _train_dataset(plan: SweepPlan):
    calibration = plan.calibration
    if calibration.dataset is not None:
        return calibration.dataset["train"]
    return _dataset(calibration.train)


def _report_layers(adapter, report: Report) -> None:
    """Make ``adapter.get_layers()`` a list that reports each layer rotate_and_slice takes from it."""
    get_layers = adapter.get_layers

    class ReportingLayers(list):
        def __iter__(self):
            total = len(self)
            for index, layer in enumerate(list.__iter__(self)):
                faults.at("slice.layer")
                report(index, total)
                yield layer
            report(total, total)

    adapter.get_layers = lambda: ReportingLayers(get_layers())


def load_named_dataset(name: str):
    """``data_utils.get_dataset(name)`` (a DatasetDict with train and test splits), or a sentence why not."""
    from slicegpt import data_utils

    from slicebridge.model.calibration import CalibrationError

    try:
        return data_utils.get_dataset(name)
    except Exception as exc:  # noqa: BLE001 - datasets fails in many ways offline; one sentence for all
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise CalibrationError(
            f"slicegpt could not load the {name} dataset ({type(exc).__name__}: {first}); without network access "
            "or a local datasets cache, pass calibration=PATH (a text file, .jsonl or directory) instead"
        ) from None
