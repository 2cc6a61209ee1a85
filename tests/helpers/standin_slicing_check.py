"""Slice one official SliceGPT fixture's dense model with the stand-in ``slicegpt``, as run_slicegpt does.

Run by the stand-in slicegpt env's interpreter (transformers 4.41):

    .envs/slicegpt/bin/python tests/helpers/standin_slicing_check.py family <fixture_dir> <work_dir>
    .envs/slicegpt/bin/python tests/helpers/standin_slicing_check.py data <fixture_dir> <work_dir>

It puts ``tests/standin`` and the repository on sys.path itself and prints one JSON object.

Both prepare ``<work_dir>/base``, a copy of the fixture's ``base/`` whose ``tokenizer_config.json``
asks for ``model_input_names`` input_ids + attention_mask (the fixtures' tokenizers also return
``token_type_ids``, which the official ``get_layer0_inputs`` passes to ``model(**batch)``: a
``TypeError``) and names a pad token (the config's ``pad_token_id``) where it has none (the
official calibration loader pads: a ``ValueError`` without one) -- as real models' tokenizers
are; and ``<work_dir>/cal``, a ``DatasetDict`` (``save_to_disk``) whose train and test splits are
the paragraphs of slicebridge's sample text.

``family`` reports, for the fixture's model (fp32 unless said otherwise, calibration
``CALIBRATION``, probe inputs from ``reference.pt``):
- ``raw_tokenizer``: the error the official sequence gives with the fixture's own tokenizer;
- ``fusion``: the fused model against the dense one, as fused (embeddings centred) and with the
  dense (uncentred) embeddings put back; structure facts;
- ``no_slicing``: ``rotate_and_slice`` at ``ConstSlicingScheduler(hidden)`` against the fused model;
- ``sliced``: at the fixture's sparsity: two runs after the same ``np.random.seed`` (identical?),
  one after another seed, one with ``final_orientation="pca"`` (logits against the first),
  state-dict keys / order / shapes and the SlicingConfig JSON against the fixture's official
  ``.pt`` / ``.json``, what ``tqdm`` was given;
- ``saved``: an fp16 run (run_slicegpt's default dtype) saved in the run_slicegpt layout and
  loaded back through the stand-in's ``hf_utils.load_sliced_model``;
- ``crosscheck``: slicebridge's own maker (``slicebridge.model.slicing.slice_model``,
  ``center_embeddings=True``, pca, fp32) on the exact token ids the stand-in's pca run was
  calibrated on, loaded into the stand-in's sliced model, against it; and, to show what a real
  difference looks like, the maker calibrated on other ids (each sample's tokens reversed).
``data`` reports the calibration and perplexity loaders, the dataset names and ``config``.

``gc.freeze()`` after each model load: the official ``cleanup_memory`` runs ``gc.collect()``
several times a layer, 0.2 s each over transformers' and datasets' objects; freezing them keeps
the runs fast and changes nothing that is computed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

STANDIN = Path(__file__).resolve().parents[1] / "standin"
REPO = Path(__file__).resolve().parents[2]
for path in (STANDIN, REPO):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import slicegpt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from slicegpt import data_utils, gpu_utils, hf_utils, layernorm_fusion, rotate  # noqa: E402
from slicegpt.config import config  # noqa: E402
from slicegpt.slicing_scheduler import ConstSlicingScheduler  # noqa: E402

from slicebridge.model.compare import logit_metrics  # noqa: E402
from slicebridge.model.sample_text import embedded_text  # noqa: E402
from slicebridge.model.slicing import slice_model  # noqa: E402

CALIBRATION = {"max_seqlen": 48, "batch_size": 4, "nsamples": 8, "seed": 42}
NP_SEED = 1234
INPUTS = ("probe_ids", "text_ids")


def paragraphs() -> list[str]:
    return [p.strip() for p in embedded_text().split("\n\n") if p.strip()]


def error_of(call) -> dict[str, Any]:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - we report whatever the official sequence raises
        return {"raised": True, "type": type(exc).__name__, "message": str(exc)[:300]}
    return {"raised": False}


# --- the work directory -----------------------------------------------------------------------


def prepare(fixture: Path, work: Path) -> tuple[Path, datasets.DatasetDict]:
    """``work/base`` (the dense model, tokenizer config as real models have it) and ``work/cal``."""
    base = work / "base"
    if not base.exists():
        shutil.copytree(fixture / "base", base)
        base.chmod(0o755)
        settings_path = base / "tokenizer_config.json"
        settings_path.chmod(0o644)
        settings = json.loads(settings_path.read_text())
        settings["model_input_names"] = ["input_ids", "attention_mask"]
        pad_id = json.loads((base / "config.json").read_text()).get("pad_token_id")
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(base))
        if tokenizer.pad_token is None and pad_id is not None:
            settings["pad_token"] = tokenizer.convert_ids_to_tokens(pad_id)
        settings_path.write_text(json.dumps(settings, indent=2))
    cal = work / "cal"
    if not cal.exists():
        split = datasets.Dataset.from_dict({"text": paragraphs()})
        datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(cal))
    return base, datasets.load_from_disk(str(cal))


# --- models and logits ------------------------------------------------------------------------


def dense_model(name: str, base: Path, dtype: torch.dtype = torch.float32):
    adapter, tokenizer = hf_utils.get_model_and_tokenizer(name, str(base), token=None, dtype=dtype)
    gc.freeze()
    return adapter, tokenizer


def fused_model(name: str, base: Path, dtype: torch.dtype = torch.float32):
    adapter, tokenizer = dense_model(name, base, dtype)
    layernorm_fusion.replace_layers(adapter)
    layernorm_fusion.fuse_modules(adapter)
    return adapter, tokenizer


@torch.no_grad()
def logits(model: torch.nn.Module, reference: dict) -> dict[str, torch.Tensor]:
    return {key: model(input_ids=reference[key]).logits.float() for key in INPUTS}


def compare(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """The worst NMSE and max |diff| and the lowest top-1 agreement over the probe inputs."""
    each = [logit_metrics(got[key], want[key]) for key in INPUTS]
    return {
        "nmse": max(m["nmse"] for m in each),
        "max_abs_diff": max(m["max_abs_diff"] for m in each),
        "top1": min(m["top1"] for m in each),
    }


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


class Recording:
    """A dataloader that keeps every batch it hands out (rotate_and_slice iterates it once)."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.batches: list[dict[str, torch.Tensor]] = []

    def __iter__(self):
        for batch in self.loader:
            self.batches.append(batch)
            yield batch


def sliced_model(
    name: str,
    base: Path,
    cal: datasets.DatasetDict,
    width: int,
    *,
    orientation: str = "random",
    seed: int = NP_SEED,
    dtype: torch.dtype = torch.float32,
) -> tuple[Any, list[dict[str, torch.Tensor]]]:
    """A fused model rotated and sliced to ``width``; with the batches it was calibrated on."""
    adapter, tokenizer = fused_model(name, base, dtype)
    loader = Recording(data_utils.prepare_dataloader(cal["train"], tokenizer, **CALIBRATION))
    np.random.seed(seed)
    gc.freeze()
    rotate.rotate_and_slice(adapter, loader, ConstSlicingScheduler(width), final_orientation=orientation)
    return adapter, loader.batches


# --- the family checks ------------------------------------------------------------------------


def raw_tokenizer_error(fixture: Path, name: str, cal: datasets.DatasetDict) -> dict[str, Any]:
    """The official sequence on the fixture's own base/ (tokenizer as shipped)."""
    adapter, tokenizer = fused_model(name, fixture / "base")
    loader = data_utils.prepare_dataloader(cal["train"], tokenizer, **CALIBRATION)
    hidden = adapter.hidden_size
    return error_of(lambda: rotate.rotate_and_slice(adapter, loader, ConstSlicingScheduler(hidden)))


def fusion_checks(name: str, base: Path, reference: dict) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    adapter, _ = dense_model(name, base)
    dense = logits(adapter.model, reference)
    for norm in adapter.model.modules():  # the dense model with RMSN's eps (1e-5) in every norm
        if isinstance(norm, adapter.original_layer_norm_type):
            setattr(norm, "variance_epsilon" if hasattr(norm, "variance_epsilon") else "eps", 1e-5)
    dense_at_rmsn_eps = logits(adapter.model, reference)
    dense_embeddings = [e.weight.detach().clone() for e in adapter.get_embeddings()]
    tied = adapter.get_lm_head().weight is adapter.get_embeddings()[0].weight
    layernorm_fusion.replace_layers(adapter)
    layernorm_fusion.fuse_modules(adapter)
    fused = logits(adapter.model, reference)
    model = adapter.model
    report = {
        "vs_dense": compare(fused, dense),
        "tied_before": tied,
        "head_untied": adapter.get_lm_head().weight is not adapter.get_embeddings()[0].weight,
        "embedding_row_mean_max": max(float(e.weight.double().mean(-1).abs().max()) for e in adapter.get_embeddings()),
        "norm_classes": sorted({type(m).__name__ for n, m in model.named_modules() if n.endswith("norm")}),
        "original_norms_left": sum(isinstance(m, adapter.original_layer_norm_type) for m in model.modules()),
        "lm_head_bias": adapter.get_lm_head().bias is not None,
        "empty_shortcut_slots": [n for n, q in adapter.get_layers()[0].layer._parameters.items() if q is None],
        "rms_norm_eps": getattr(adapter.config, "rms_norm_eps", None),
    }
    with torch.no_grad():
        for embedding, weight in zip(adapter.get_embeddings(), dense_embeddings, strict=True):
            embedding.weight.copy_(weight)
    uncentred = logits(model, reference)
    report["uncentred_vs_dense"] = compare(uncentred, dense)
    report["uncentred_vs_dense_at_rmsn_eps"] = compare(uncentred, dense_at_rmsn_eps)
    return report, fused


def structure(adapter, official: dict[str, torch.Tensor], official_json: str) -> dict[str, Any]:
    state = adapter.model.state_dict()
    return {
        "keys_in_official_order": list(state) == list(official),
        "shapes_equal": all(state[k].shape == official[k].shape for k in official if k in state),
        "dtypes_equal": all(state[k].dtype == official[k].dtype for k in official if k in state),
        "json_equal": adapter.slicing_conf.to_json_string() == official_json,
        "param_count": sum(p.numel() for p in adapter.model.parameters()),
        "official_numel": sum(t.numel() for t in official.values()),
    }


def official_files(fixture: Path, facts: dict) -> tuple[dict[str, torch.Tensor], str, str]:
    stem = f"{Path(facts['model_name']).name}_{facts['sparsity']}"
    pt = torch.load(fixture / "sliced" / f"{stem}.pt", map_location="cpu", weights_only=True)
    return pt, (fixture / "sliced" / f"{stem}.json").read_text(), stem


def sliced_checks(
    fixture: Path, facts: dict, base: Path, cal: datasets.DatasetDict, reference: dict
) -> tuple[dict, Any, list]:
    name, width = facts["model_name"], facts["sliced_dim"]
    official, official_json, _ = official_files(fixture, facts)
    seen: dict[str, Any] = {}
    real_tqdm = rotate.tqdm

    def recording_tqdm(iterable, **kwargs):
        seen.update(items=[type(item).__name__ for item in iterable], kwargs=kwargs, is_list=isinstance(iterable, list))
        return real_tqdm(iterable, **kwargs)

    rotate.tqdm = recording_tqdm
    try:
        first, _ = sliced_model(name, base, cal, width)
    finally:
        rotate.tqdm = real_tqdm
    again, _ = sliced_model(name, base, cal, width)
    other, _ = sliced_model(name, base, cal, width, seed=NP_SEED + 1)
    pca, batches = sliced_model(name, base, cal, width, orientation="pca")
    first_logits = logits(first.model, reference)
    report = {
        "structure": structure(first, official, official_json),
        "same_seed_identical": same_state(first.model.state_dict(), again.model.state_dict()),
        "other_seed_identical": same_state(first.model.state_dict(), other.model.state_dict()),
        "other_seed_vs_first": compare(logits(other.model, reference), first_logits),
        "pca_vs_random": compare(logits(pca.model, reference), first_logits),
        "slicing_conf_type": type(first.slicing_conf).__name__,
        "tqdm": {"items": seen["items"], "kwargs": seen["kwargs"], "is_list": seen["is_list"]},
        "calibration": [list(b["input_ids"].shape) for b in batches],
        "calibration_keys": sorted(batches[0]),
        "all_full_length": all(bool(b["attention_mask"].all()) for b in batches),
    }
    return report, pca, batches


def saved_checks(
    fixture: Path, facts: dict, base: Path, cal: datasets.DatasetDict, reference: dict, work: Path
) -> dict[str, Any]:
    """An fp16 run saved as run_slicegpt saves it, loaded back through ``hf_utils.load_sliced_model``."""
    official, official_json, stem = official_files(fixture, facts)
    adapter, _ = sliced_model(facts["model_name"], base, cal, facts["sliced_dim"], dtype=torch.float16)
    out = work / "saved"
    out.mkdir(exist_ok=True)
    torch.save(adapter.model.state_dict(), out / f"{stem}.pt")
    (out / f"{stem}.json").write_text(adapter.slicing_conf.to_json_string())
    for file in base.glob("*.json"):
        shutil.copy(file, out)
    loaded, _ = hf_utils.load_sliced_model(
        facts["model_name"], str(out), sparsity=facts["sparsity"], round_interval=facts["round_interval"]
    )
    in_memory, from_disk = logits(adapter.model, reference), logits(loaded.model, reference)
    return {
        "structure": structure(adapter, official, official_json),
        "loaded_state_equal": same_state(adapter.model.state_dict(), loaded.model.state_dict()),
        "loaded_logits_identical": all(torch.equal(in_memory[k], from_disk[k]) for k in INPUTS),
        "loaded_vs_in_memory": compare(from_disk, in_memory),
    }


def builtin_model(facts: dict, base: Path, out: Path, pca, ids: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    """slicebridge's maker (fp32, pca, embeddings centred) calibrated on ``ids``, loaded into a copy of ``pca``."""
    slice_model(
        base,
        out,
        sparsity=facts["sparsity"],
        round_interval=facts["round_interval"],
        model_name=facts["model_name"],
        calibration_ids=ids,
        center_embeddings=True,
        final_orientation="pca",
        dtype="float32",
    )
    state = torch.load(out / f"{Path(facts['model_name']).name}_{facts['sparsity']}.pt", weights_only=True)
    model = copy.deepcopy(pca.model)
    model.load_state_dict(state, strict=True)
    return model, state


def crosscheck(facts: dict, base: Path, work: Path, pca, batches: list, reference: dict) -> dict[str, Any]:
    """slicebridge's maker on the stand-in's exact calibration ids against the stand-in (both fp32, pca); and
    on other ids (each sample's tokens reversed), to show what a real difference in calibration looks like."""
    ids = torch.cat([batch["input_ids"] for batch in batches])
    model, state = builtin_model(facts, base, work / "builtin", pca, ids)
    other, _ = builtin_model(facts, base, work / "builtin-other", pca, ids.flip(1))
    want = logits(pca.model, reference)
    standin_state = pca.model.state_dict()
    return {
        "calibration_ids_shape": list(ids.shape),
        "keys_in_same_order": list(state) == list(standin_state),
        "shapes_equal": all(state[k].shape == standin_state[k].shape for k in standin_state),
        "builtin_vs_standin": compare(logits(model, reference), want),
        "builtin_other_calibration_vs_standin": compare(logits(other, reference), want),
    }


def family_report(fixture: Path, work: Path) -> dict[str, Any]:
    facts = json.loads((fixture / "fixture.json").read_text())
    reference = torch.load(fixture / "reference.pt", weights_only=True)
    base, cal = prepare(fixture, work)
    config.device = torch.device("cpu")
    config.dtype = torch.float32
    name = facts["model_name"]
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def lap(section: str) -> None:
        nonlocal started
        seconds[section] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()

    report: dict[str, Any] = {
        "versions": {"transformers": transformers.__version__, "slicegpt": slicegpt.__version__},
        "slicegpt_file": slicegpt.__file__,
        "raw_tokenizer": raw_tokenizer_error(fixture, name, cal),
        "seconds": seconds,
    }
    lap("raw_tokenizer")
    report["fusion"], fused = fusion_checks(name, base, reference)
    lap("fusion")
    hidden_run, _ = sliced_model(name, base, cal, json.loads((base / "config.json").read_text())["hidden_size"])
    report["no_slicing"] = {
        "vs_fused": compare(logits(hidden_run.model, reference), fused),
        "slicing_conf": hidden_run.slicing_conf.to_dict(),
    }
    lap("no_slicing")
    report["sliced"], pca, batches = sliced_checks(fixture, facts, base, cal, reference)
    torch.save(pca.model.state_dict(), work / "pca_fp32.pt")
    lap("sliced")
    report["saved"] = saved_checks(fixture, facts, base, cal, reference, work)
    lap("saved")
    report["crosscheck"] = crosscheck(facts, base, work, pca, batches, reference)
    lap("crosscheck")
    return report


# --- the data checks --------------------------------------------------------------------------


def sample_count(loader) -> int:
    return sum(len(batch["input_ids"]) for batch in loader)


def dataset_names(work: Path) -> dict[str, Any]:
    """``get_dataset`` through saved snapshots (the stand-in's env var), and its refusals and offline failure."""
    snapshots = work / "snapshots"
    text = paragraphs()
    rows = {"text": text + text[:8], "instruction": ["i"] * 20, "input": ["x"] * 20, "output": ["o"] * 20}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(snapshots / "alpaca"))
    split = datasets.Dataset.from_dict({"text": text, "url": ["u"] * len(text), "timestamp": ["t"] * len(text)})
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(snapshots / "c4"))
    plain = datasets.Dataset.from_dict({"text": text})
    datasets.DatasetDict({"train": plain, "test": plain}).save_to_disk(str(snapshots / "wikitext2"))
    os.environ[data_utils.STANDIN_DATASETS_ENV_VAR] = str(snapshots)

    def shape(name: str) -> dict[str, Any]:
        ds = data_utils.get_dataset(name)
        return {split: {"rows": ds[split].num_rows, "columns": ds[split].column_names} for split in ds}

    return {
        "alpaca": shape("alpaca"),
        "c4": shape("c4"),
        "wikitext2": shape("wikitext2"),
        "unknown": error_of(lambda: data_utils.get_dataset("wikitext103")),
        "ptb_offline": error_of(lambda: data_utils.get_dataset("ptb")),
    }


def loader_checks(tokenizer) -> dict[str, Any]:
    text = paragraphs()

    def samples(texts: list[str], **overrides) -> int:
        options = {**CALIBRATION, **overrides}
        return sample_count(
            data_utils.prepare_dataloader(datasets.Dataset.from_dict({"text": texts}), tokenizer, **options)
        )

    loader = data_utils.prepare_dataloader(datasets.Dataset.from_dict({"text": text}), tokenizer, **CALIBRATION)
    orders = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        orders.append([int(i) for i in loader.sampler])
    return {
        "full": samples(text),
        "three_paragraphs": samples(text[:3]),
        "three_paragraphs_long_samples": samples(text[:3], max_seqlen=256),
        "varied_seqlen": samples(text[:3], varied_seqlen=True),
        "sampler_order_follows_global_seed": orders[0] == orders[1] and orders[0] != orders[2],
        "batch_keys": sorted(next(iter(loader))),
    }


def perplexity_checks(adapter, tokenizer, cal) -> dict[str, Any]:
    """evaluate_ppl against exp(mean over rows of transformers' own loss on each row)."""
    loader = data_utils.prepare_test_dataloader(cal["test"], tokenizer, seqlen=64, batch_size=3)
    rows = torch.cat([batch["input_ids"] for batch in loader])
    with torch.no_grad():
        losses = [adapter.model(input_ids=row[None], labels=row[None]).loss for row in rows]
    return {
        "rows": len(rows),
        "row_length": rows.shape[1],
        "evaluate_ppl": gpu_utils.evaluate_ppl(adapter.model, adapter.model.config.pad_token_id, loader),
        "exp_mean_row_loss": float(torch.exp(torch.stack(losses).mean())),
        "empty_loader": error_of(lambda: gpu_utils.evaluate_ppl(adapter.model, None, [])),
    }


def data_report(fixture: Path, work: Path) -> dict[str, Any]:
    facts = json.loads((fixture / "fixture.json").read_text())
    base, cal = prepare(fixture, work)
    report: dict[str, Any] = {
        "config": {"device": str(config.device), "dtype_set_before_use": "dtype" in config},
        "cuda": torch.cuda.is_available(),
        "no_split_module_classes": None,
    }
    config.dtype = torch.float32
    adapter, tokenizer = dense_model(facts["model_name"], base)
    report["no_split_module_classes"] = adapter.no_split_module_classes
    report["loaders"] = loader_checks(tokenizer)
    report["perplexity"] = perplexity_checks(adapter, tokenizer, cal)
    report["datasets"] = dataset_names(work)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Slice an official fixture's dense model with the stand-in.")
    parser.add_argument("mode", choices=["family", "data"])
    parser.add_argument("fixture", type=Path)
    parser.add_argument("work", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    run = family_report if args.mode == "family" else data_report
    print(json.dumps(run(args.fixture, args.work), indent=1))
