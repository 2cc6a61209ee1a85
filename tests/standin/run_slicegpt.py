"""Test stand-in for the official ``experiments/run_slicegpt.py`` (microsoft/TransformerCompression @ 6b12cde).

Runs the official call sequence with the package importable as ``slicegpt`` (the stand-in, which
sits next to this file): load the dense model, build the calibration and perplexity loaders,
optionally evaluate the baseline and the fused model, ``replace_layers`` + ``fuse_modules``,
``rotate_and_slice`` with a ``ConstSlicingScheduler`` at ``int((1 - sparsity) * hidden)`` rounded
down to a multiple of ``--round-interval``, save, then evaluate the sliced model. The flags, their
defaults and the log lines are the official ones; with ``--save-dir`` it writes the official
layout: ``{Path(model).name}_{sparsity}.pt`` (``torch.save`` of the state dict),
``{Path(model).name}_{sparsity}.json`` (the SlicingConfig) and, for a local ``--model-path``, its
``*.json`` files (none whose PATH contains "safetensors"), ``*token*.model`` and ``merges.txt``.
``--sliced-model-path`` loads a saved model and only evaluates it, as does ``--ppl-only``.

Quirks kept: ``--ppl-eval-seqlen`` and ``--ppl-eval-nsamples`` are parsed but unused (the
perplexity loader always cuts rows of 2048 tokens, so a short test split gives no rows and the
last evaluation fails); ``--final-orientation random`` (the default) draws from numpy's global
RNG, which the script never seeds.
Dropped: wandb (``--wandb-project``, ``--no-wandb``) and any network use (``--hf-token`` is
accepted and passed on, but the stand-in only reads local files).
Stand-in only: ``--cal-data-path DIR``, a ``DatasetDict`` saved with ``save_to_disk`` holding
``train`` and ``test``, used instead of ``data_utils.get_dataset(--cal-dataset)``.

    python tests/standin/run_slicegpt.py --model meta-llama/Meta-Llama-3-tiny --model-path BASE \\
        --sparsity 0.25 --cal-data-path CAL --save-dir OUT
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import shutil

import datasets
import torch
from slicegpt import data_utils, gpu_utils, hf_utils, layernorm_fusion, rotate, utils
from slicegpt.config import config
from slicegpt.slicing_scheduler import ConstSlicingScheduler

log = logging.getLogger(__name__)


def slicing_arg_parser(interactive: bool = True) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=str, default="facebook/opt-125m", help="Model to load")
    paths = parser.add_mutually_exclusive_group()
    paths.add_argument("--model-path", type=str, default=None, help="Path to load the model and tokenizer from")
    paths.add_argument("--sliced-model-path", type=str, default=None, help="Path to load a sliced model from")
    parser.add_argument("--dtype", type=str, choices=["fp32", "fp16"], default="fp16", help="Data type to use.")
    parser.add_argument(
        "--cal-dataset", type=str, choices=["wikitext2", "ptb", "c4", "alpaca"], default="wikitext2", help="Dataset."
    )
    parser.add_argument("--cal-data-path", type=str, default=None, help="Stand-in only: a saved DatasetDict to use.")
    parser.add_argument("--cal-nsamples", type=int, default=128, help="Number of calibration samples.")
    parser.add_argument("--cal-batch-size", type=int, default=16, help="Batch size for the calibration data.")
    parser.add_argument("--cal-max-seqlen", type=int, default=2048, help="Maximum calibration sequence length.")
    parser.add_argument("--varied-seqlen", action="store_true", help="Varied sequence lengths in the calibration data.")
    parser.add_argument("--seed", type=int, default=42, help="Seed for sampling the calibration data.")
    parser.add_argument("--sparsity", type=float, default=0.0, help="How much slicing is applied, in [0, 1)")
    parser.add_argument("--round-interval", type=int, default=8, help="Interval for rounding the weights")
    parser.add_argument("--final-orientation", type=str, default="random", choices=["random", "pca"])
    parser.add_argument("--ppl-eval-seqlen", type=int, default=2048, help="Unused, as in the official.")
    parser.add_argument("--ppl-eval-batch-size", type=int, default=8, help="Batch size for the perplexity.")
    parser.add_argument("--ppl-eval-nsamples", type=int, default=128, help="Unused, as in the official.")
    parser.add_argument("--eval-baseline", action="store_true", help="Evaluate the baseline model.")
    parser.add_argument("--eval-fused-model", action="store_true", help="Evaluate the fused model.")
    parser.add_argument("--ppl-only", action="store_true", help="Evaluate the loaded model without compression.")
    parser.add_argument("--distribute-model", action="store_true", help="Use accelerate over every GPU.")
    parser.add_argument("--save-dir", type=str, default=None, help="Path to save the model.")
    parser.add_argument("--hf-token", type=str, default=os.getenv("HF_TOKEN", None))
    parser.add_argument("--device", type=str, default=None, help="PyTorch device: cpu, cuda, cuda:0 (default: auto)")
    return parser.parse_args() if interactive else parser.parse_args("")


def process_slicing_args(args: argparse.Namespace) -> None:
    for name, value in vars(args).items():
        log.debug("%s = %s", name, value)
    if not 0 <= args.sparsity < 1:
        raise argparse.ArgumentTypeError("Sparsity should be in the range [0, 1)")
    if args.device:
        config.device = torch.device(args.device)
    config.dtype = {"fp16": torch.float16, "fp32": torch.float32}[args.dtype]


def _datasets(args: argparse.Namespace) -> datasets.DatasetDict:
    if args.cal_data_path:
        return datasets.load_from_disk(args.cal_data_path)
    return data_utils.get_dataset(args.cal_dataset)


def _evaluate(model, test_loader, message: str) -> float:
    ppl = gpu_utils.evaluate_ppl(model, model.config.pad_token_id, test_loader)
    log.info(message, ppl)
    return ppl


def _save(args: argparse.Namespace, model_adapter) -> None:
    """The official save-dir layout (see the module docstring)."""
    save_dir = pathlib.Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    weights = save_dir / f"{pathlib.Path(args.model).name}_{args.sparsity}.pt"
    torch.save(model_adapter.model.state_dict(), weights)
    weights.with_suffix(".json").write_text(model_adapter.slicing_conf.to_json_string())
    if args.model_path:
        model_path = pathlib.Path(args.model_path)
        try:
            for file in model_path.glob("*.json"):
                if "safetensors" not in str(file):
                    shutil.copy(str(file), save_dir)
            for file in [*model_path.glob("*token*.model"), *model_path.glob("merges.txt")]:
                shutil.copy(str(file), save_dir)
        except OSError as exc:
            log.info("Failed to copy configs and tokenizer files: %s", exc)
    log.info("Saved sliced model to %s", args.save_dir)


def _loaders(args: argparse.Namespace, tokenizer) -> tuple:
    dataset = _datasets(args)
    train_loader = data_utils.prepare_dataloader(
        dataset=dataset["train"],
        tokenizer=tokenizer,
        max_seqlen=args.cal_max_seqlen,
        batch_size=args.cal_batch_size,
        nsamples=args.cal_nsamples,
        varied_seqlen=args.varied_seqlen,
        seed=args.seed,
    )
    test_loader = data_utils.prepare_test_dataloader(
        dataset=dataset["test"], tokenizer=tokenizer, batch_size=args.ppl_eval_batch_size
    )
    return train_loader, test_loader


def _rotate_and_slice(args: argparse.Namespace, model_adapter, train_loader) -> int:
    """Fuse, rotate and slice to the constant width of ``--sparsity``; returns the fused model's parameter count."""
    model = model_adapter.model
    original_params = sum(int(p.nelement()) for p in model.parameters())
    log.info("Original model parameters: %s", f"{original_params:,d}")
    width = int((1 - args.sparsity) * model_adapter.hidden_size)
    width -= width % args.round_interval
    log.info("New embedding dimension: %d (sparsity %.4f %%)", width, 100 * (1 - width / model_adapter.hidden_size))
    rotate.rotate_and_slice(
        model_adapter, train_loader, ConstSlicingScheduler(width), final_orientation=args.final_orientation
    )
    return original_params


def slicing_main(args: argparse.Namespace) -> None:
    log.info("Running SliceGPT experiment.")
    log.info("PyTorch device: %s", config.device)
    log.info("Number of available cuda devices: %d", torch.cuda.device_count())
    if args.sliced_model_path:
        model_adapter, tokenizer = hf_utils.load_sliced_model(
            args.model,
            args.sliced_model_path,
            sparsity=args.sparsity,
            round_interval=args.round_interval,
            token=args.hf_token,
        )
    else:
        model_adapter, tokenizer = hf_utils.get_model_and_tokenizer(
            args.model, args.model_path, token=args.hf_token, dtype=config.dtype
        )
    model = model_adapter.model

    def reset_model_device() -> None:
        if args.distribute_model:
            gpu_utils.distribute_model(model_adapter)
        else:
            model.to(config.device)

    train_loader, test_loader = _loaders(args, tokenizer)
    if args.sliced_model_path or args.ppl_only:
        reset_model_device()
        _evaluate(model, test_loader, "Loaded model perplexity: %s")
        return
    if args.eval_baseline:
        reset_model_device()
        _evaluate(model, test_loader, "Original ppl: %.4f")
        model.cpu()
        utils.cleanup_memory()

    layernorm_fusion.replace_layers(model_adapter)
    layernorm_fusion.fuse_modules(model_adapter)
    if args.eval_fused_model and not args.distribute_model:
        model.to(config.device)
        _evaluate(model, test_loader, "Post-fusion: %.4f")
        model.cpu()
        utils.cleanup_memory()

    original_params = _rotate_and_slice(args, model_adapter, train_loader)
    if args.save_dir:
        _save(args, model_adapter)
    reset_model_device()
    _evaluate(model, test_loader, "After rotating and slicing %.4f")
    sliced_params = sum(int(p.nelement()) for p in model.parameters())
    fraction = 1.0 - sliced_params / original_params
    log.info("Sliced model parameters: %s (sliced fraction %.4f)", f"{sliced_params:,d}", fraction)


if __name__ == "__main__":
    utils.configure_logging(log_to_console=True, log_to_file=False, level=logging.INFO)
    slicing_args = slicing_arg_parser()
    process_slicing_args(slicing_args)
    slicing_main(slicing_args)
