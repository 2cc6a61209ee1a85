"""Load a converted ``.bin`` and an export every way a user would, and compare with the official logits.

Run by the base env (transformers 5.x) and by the stand-in slicegpt env (transformers 4.41):

    python tests/helpers/family_artifacts_check.py <reference.pt> <model.bin> <export_dir>

It puts the repository root on sys.path itself (slicebridge need not be installed), shares
``family_check.py``'s greedy loop without cache (this folder is the script's first sys.path entry), and prints one
JSON object: for each load path (the ``.bin`` with ``slicebridge.load``, with ``torch.load`` and
``weights_only=False``, with ``torch.load`` and ``pickle_module=dill``; the export with
``AutoModelForCausalLM`` and ``trust_remote_code=True``, and with ``slicebridge.load``) the fp32
metrics on the probe and text ids, the fp16 metrics (as stored), and whether greedy ``generate()``
with the KV cache gives the tokens of a greedy loop without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
from family_check import greedy_without_cache  # noqa: E402

import slicebridge  # noqa: E402
from slicebridge.model.compare import logit_metrics  # noqa: E402

NEW_TOKENS = 6


def _bin_models(path: str) -> dict[str, torch.nn.Module]:
    models = {"bin:slicebridge.load": slicebridge.load(path)["model"]}
    models["bin:torch.load"] = torch.load(path, weights_only=False)["model"]
    try:
        import dill
    except ImportError:  # the base env may lack dill; the slicegpt env has it
        return models
    models["bin:torch.load+dill"] = torch.load(path, weights_only=False, pickle_module=dill)["model"]
    return models


def _export_models(directory: str) -> dict[str, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    remote = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, torch_dtype="auto")
    # the export's own code, as transformers copied it from the directory (not slicebridge's modules)
    assert type(remote).__module__.startswith("transformers_modules."), type(remote).__module__
    return {"export:AutoModelForCausalLM": remote, "export:slicebridge.load": slicebridge.load(directory)["model"]}


def _metrics(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    report: dict[str, Any] = {"stored_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    with torch.no_grad():
        report["fp16"] = logit_metrics(model.half()(reference["probe_ids"]).logits.float(), reference["logits_fp16"])
        model = model.float()
        report["fp32"] = logit_metrics(model(reference["probe_ids"]).logits, reference["logits_fp32"])
        report["fp32_text"] = logit_metrics(model(reference["text_ids"]).logits, reference["text_logits_fp32"])
        prompt = reference["probe_ids"][:, :10]
        model.generation_config.eos_token_id = None  # run every step: the loop without cache does
        cached = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        report["generate_cache_equals_no_cache"] = bool(
            torch.equal(cached, greedy_without_cache(model, prompt, NEW_TOKENS))
        )
    return report


def run(reference_path: str, bin_path: str, export_dir: str) -> dict[str, Any]:
    reference = torch.load(reference_path, weights_only=True)
    models = {**_bin_models(bin_path), **_export_models(export_dir)}
    return {
        "transformers": transformers.__version__,
        "loads": {name: _metrics(model, reference) for name, model in models.items()},
    }


if __name__ == "__main__":
    if len(sys.argv) != 4:
        print(f"usage: {sys.argv[0]} <reference.pt> <model.bin> <export_dir>", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(run(*sys.argv[1:])))
