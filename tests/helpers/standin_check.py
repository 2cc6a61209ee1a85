"""Check the stand-in ``slicegpt`` package against one official SliceGPT fixture (Llama, OPT, Phi-2 or Phi-3).

Run by the stand-in slicegpt env's interpreter (transformers 4.41):

    .envs/slicegpt/bin/python tests/helpers/standin_check.py <fixture_dir> [--made-bin FILE] [--probe-name NAME ...]

It puts ``tests/standin`` on sys.path itself, then prints one JSON object with:
- ``fixture``: the fixture's model name, sparsity, round interval and sliced width.
- ``load_new``: the fixture loaded through ``slicegpt.hf_utils.load_sliced_model`` (new API:
  the save directory); structure facts (read through the stand-in's own model adapter) and,
  per precision (fp16 as loaded, fp32 after ``.float()``) and input, NMSE / max |diff| /
  top-1 agreement against the official logits.
- ``load_old``: the same through the old API (``SLICEGPT_STANDIN_API=old``: the ``.pt`` path).
- ``load_without_slicing_json``: the same without the ``.json`` (constant width from sparsity).
- ``wrong_args``: the error type and message of each call the official would reject.
- ``name_matching``: for each ``--probe-name``, the adapter ``ModelAdapter.from_model`` picks
  for it (with the fixture's config), or the error it raises.
- ``quirks``: family-specific behaviour (OPT: a post-norm layer refuses to run).
- ``seed`` (fixtures with ``seed_pruned_model.bin``, an official model object pickled with
  dill): that file unpickled with the stand-in importable, run, and compared with the official
  logits and, bit for bit, with the stand-in's own fp16 model.
- ``pickle_globals``: the non-dill globals a dill pickle of the stand-in's model references,
  against those in the seed ``.bin`` where there is one.
- ``made_bin`` (with ``--made-bin``): a file written by ``make_seed_bin.py``, unpickled here:
  its keys and values, its model's logits against the official ones (fp32 after ``.float()``)
  and the stand-in's (fp16, bit for bit), and its pickle globals against the seed ``.bin``'s.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import pickletools
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

STANDIN = Path(__file__).resolve().parents[1] / "standin"
REPO = Path(__file__).resolve().parents[2]  # for slicebridge.model.compare's metrics (torch only)
for path in (STANDIN, REPO):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import dill  # noqa: E402
import slicegpt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from slicegpt import hf_utils  # noqa: E402
from slicegpt.model_adapter import ModelAdapter  # noqa: E402

from slicebridge.model.compare import logit_metrics  # noqa: E402

INPUTS = {"probe": ("probe_ids", "logits_{}"), "text": ("text_ids", "text_logits_{}")}
# Globals that only say how dill/torch rebuild things, not which classes they need.
PLUMBING = ("dill.", "_codecs ", "__builtin__ ", "builtins ", "copyreg ", "torch._utils ", "collections ")
TOKENIZER_GLOBALS = ("tokenizers", "transformers.tokenization")


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def against_reference(model, reference: dict, precision: str) -> dict[str, Any]:
    return {
        name: logit_metrics(logits_of(model, reference[ids]), reference[key.format(precision)])
        for name, (ids, key) in INPUTS.items()
    }


def error_of(call) -> dict[str, Any]:
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 - we report whatever the loader raises
        return {
            "raised": True,
            "type": type(exc).__name__,
            "mro": [c.__name__ for c in type(exc).__mro__],
            "message": str(exc)[:400],
        }
    return {"raised": False}


def with_api(mode: str, call):
    saved = os.environ.get(hf_utils.API_ENV_VAR)
    os.environ[hf_utils.API_ENV_VAR] = mode
    try:
        return call()
    finally:
        if saved is None:
            os.environ.pop(hf_utils.API_ENV_VAR, None)
        else:
            os.environ[hf_utils.API_ENV_VAR] = saved


def pickle_globals(data: bytes) -> set[str]:
    found = set()
    strings: list[str] = []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "GLOBAL":
            found.add(arg)
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.add(f"{strings[-2]} {strings[-1]}")
    return {g for g in found if not g.startswith(PLUMBING)}


def torch_save_globals(obj) -> set[str]:
    buffer = io.BytesIO()
    torch.save(obj, buffer, pickle_module=dill)
    return zip_globals(buffer.getvalue())


def zip_globals(blob: bytes) -> set[str]:
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        return pickle_globals(archive.read(name))


def globals_against(ours: set[str], theirs: set[str]) -> dict[str, list[str]]:
    return {"missing_in_standin": sorted(theirs - ours), "extra_in_standin": sorted(ours - theirs)}


def qualified(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def shape(tensor: torch.Tensor | None) -> list[int] | None:
    return None if tensor is None else list(tensor.shape)


def structure(model_adapter, tokenizer, checkpoint: dict) -> dict[str, Any]:
    model = model_adapter.model
    layers = model_adapter.get_layers()
    first, last = layers[0].layer, layers[-1].layer
    norm = layers[0].get_first_layernorm()
    state = model.state_dict()
    return {
        "model_class": type(model).__qualname__,
        "model_module": type(model).__module__,
        "model_base": f"{type(model).__mro__[1].__module__}.{type(model).__mro__[1].__qualname__}",
        "layer_class": qualified(first),
        "layer_is_original_layer": isinstance(first, model_adapter.original_layer_type),
        "layer_is_llama_decoder_layer": isinstance(first, transformers.models.llama.modeling_llama.LlamaDecoderLayer),
        "attention_class": type(first.self_attn).__name__,
        "norm_classes": sorted({qualified(m) for n, m in model.named_modules() if n.endswith("norm")}),
        "original_norms_left": sum(isinstance(m, model_adapter.original_layer_norm_type) for m in model.modules()),
        "rmsn_mean_dim": norm.mean_dim,
        "rmsn_eps": norm.eps,
        "dtype": str(model.dtype),
        "layer_params": list(first._parameters),
        "shortcut_shapes": [shape(first.attn_shortcut_Q), shape(getattr(first, "mlp_shortcut_Q", None))],
        "last_attn_shortcut_shape": shape(last.attn_shortcut_Q),
        "last_mlp_shortcut_shape": shape(getattr(last, "mlp_shortcut_Q", None)),
        "lm_head_bias": shape(model_adapter.get_lm_head().bias),
        "parameter_count": sum(p.numel() for p in model.parameters()),
        "state_dict_keys_match_pt": list(state) == list(checkpoint),
        "state_dict_equal_pt": all(torch.equal(state[k], checkpoint[k]) for k in checkpoint),
        "slicing_conf_hidden_size": model_adapter.slicing_conf.hidden_size,
        "use_cache": model.config.use_cache,
        "seqlen": getattr(model, "seqlen", None),
        "pad_token_id": model.config.pad_token_id,
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_pad_token": tokenizer.pad_token,
    }


def adapter_for(name: str, save_dir: Path) -> str:
    """The adapter class ``from_model`` picks for ``name`` (config from ``save_dir``), or the error's type."""
    try:
        adapter = ModelAdapter.from_model(name, str(save_dir), model_type="uninitialized", local_files_only=True)
    except NotImplementedError as exc:
        return type(exc).__name__
    return type(adapter).__name__


def quirks(model_adapter) -> dict[str, Any]:
    """Family-specific behaviour: an OPT post-norm layer (OPT-350m's kind) must refuse to run."""
    if not type(model_adapter).__name__.startswith("OPT"):
        return {}
    config = copy.deepcopy(model_adapter.config)
    config.do_layer_norm_before = False
    layer = model_adapter.compressed_layer_type(config).to(torch.float32)
    hidden = torch.zeros(1, 2, config.hidden_size)
    return {"opt_post_norm_forward": error_of(lambda: layer(hidden))}


def load_checks(fixture: Path, facts: dict, reference: dict, probes: list[str]) -> tuple[dict, torch.Tensor]:
    """The fixture loaded every way the official loader allows (and refuses); also the stand-in's fp16 logits."""
    name, sparsity, interval = facts["model_name"], facts["sparsity"], facts["round_interval"]
    sliced = fixture / "sliced"
    pt_path = sliced / f"{Path(name).name}_{sparsity}.pt"
    checkpoint = torch.load(pt_path, map_location="cpu", weights_only=True)

    def load(mode: str, path: Path, model_name: str = name, **kw):
        kw.setdefault("sparsity", sparsity)
        kw.setdefault("round_interval", interval)
        return with_api(mode, lambda: hf_utils.load_sliced_model(model_name, str(path), **kw))

    def fp16_of(adapter) -> torch.Tensor:
        return logits_of(adapter.model, reference["probe_ids"])

    adapter, tokenizer = load("new", sliced)
    standin_fp16 = fp16_of(adapter)
    report: dict[str, Any] = {"load_new": structure(adapter, tokenizer, checkpoint)}
    report["load_new"]["fp16"] = against_reference(adapter.model, reference, "fp16")
    report["model_globals"] = torch_save_globals({"model": adapter.model})
    report["quirks"] = quirks(adapter)
    adapter.model.float()
    report["load_new"]["fp32"] = against_reference(adapter.model, reference, "fp32")

    old_adapter, _ = load("old", pt_path)
    report["load_old"] = {
        "model_class": type(old_adapter.model).__qualname__,
        "fp16_identical_to_new": torch.equal(fp16_of(old_adapter), standin_fp16),
    }
    # Without the .json the widths come from sparsity and round_interval (ConstSlicingScheduler).
    with tempfile.TemporaryDirectory() as tmp:
        for item in sliced.iterdir():
            if item.suffix != ".json" or not item.name.startswith(Path(name).name):
                (Path(tmp) / item.name).symlink_to(item)
        const_adapter, _ = load("new", Path(tmp))
        report["load_without_slicing_json"] = {
            "const_dimension": const_adapter.slicing_conf.const_dimension,
            "fp16_identical_to_new": torch.equal(fp16_of(const_adapter), standin_fp16),
        }
    report["wrong_args"] = {
        "old_api_with_directory": error_of(lambda: load("old", sliced)),
        "new_api_with_pt_path": error_of(lambda: load("new", pt_path)),
        "new_api_local_path_as_model_name": error_of(lambda: load("new", sliced, model_name=str(sliced))),
        "old_api_local_path_as_model_name": error_of(lambda: load("old", pt_path, model_name=str(sliced))),
        "new_api_without_sparsity": error_of(lambda: load("new", sliced, sparsity=None)),
        "bad_api_mode": error_of(lambda: load("middle", sliced)),
    }
    report["name_matching"] = {probe: adapter_for(probe, sliced) for probe in probes}
    return report, standin_fp16


def unpickled(path: Path) -> dict:
    return torch.load(path, pickle_module=dill, weights_only=False, map_location="cpu")


def seed_checks(seed_path: Path, reference: dict, standin_fp16: torch.Tensor) -> dict[str, Any]:
    """The official seed ``.bin`` (an official model object pickled with dill) run with the stand-in importable."""
    seed_model = unpickled(seed_path)["model"]
    seed_layer = seed_model.model.layers[0]
    seed_fp16 = logits_of(seed_model, reference["probe_ids"])
    return {
        "model_class": type(seed_model).__qualname__,
        "model_module": type(seed_model).__module__,
        "layer_class": qualified(seed_layer),
        "layer_attrs": sorted(k for k in vars(seed_layer) if not k.startswith("_")),
        "layer_params": list(seed_layer._parameters),
        "norm_attrs": sorted(k for k in vars(seed_layer.input_layernorm) if not k.startswith("_")),
        "dtype": str(seed_model.dtype),
        "fp16": {"probe": logit_metrics(seed_fp16, reference["logits_fp16"])},
        "identical_to_standin_fp16": torch.equal(seed_fp16, standin_fp16),
        "max_abs_diff_to_standin_fp16": float((seed_fp16 - standin_fp16).abs().max()),
    }


def made_bin_checks(path: Path, reference: dict, standin_fp16: torch.Tensor, seed: set[str] | None) -> dict:
    """A ``make_seed_bin.py`` output, unpickled here: contents, logits, pickle globals."""
    blob = path.read_bytes()
    contents = unpickled(path)
    model = contents["model"]
    report = {
        "keys": sorted(contents),
        "values": {k: v for k, v in contents.items() if k not in ("model", "tokenizer")},
        "model_class": type(model).__qualname__,
        "model_module": type(model).__module__,
        "tokenizer_class": type(contents["tokenizer"]).__name__,
        "dtype": str(model.dtype),
        "parameter_count": sum(p.numel() for p in model.parameters()),
        "fp16_identical_to_standin": torch.equal(logits_of(model, reference["probe_ids"]), standin_fp16),
        "globals": sorted(zip_globals(blob)),
    }
    if seed is not None:
        report["globals_against_seed"] = globals_against(zip_globals(blob), seed)
    model.float()
    report["fp32"] = against_reference(model, reference, "fp32")
    return report


def main(fixture: Path, made_bin: Path | None, probes: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    facts = json.loads((fixture / "fixture.json").read_text())
    reference = torch.load(fixture / "reference.pt", weights_only=True)
    report: dict[str, Any] = {
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dill": dill.__version__,
            "slicegpt": slicegpt.__version__,
        },
        "slicegpt_file": slicegpt.__file__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fixture": {key: facts.get(key) for key in ("model_name", "sparsity", "round_interval", "sliced_dim")},
    }
    loaded, standin_fp16 = load_checks(fixture, facts, reference, probes)
    model_globals = loaded.pop("model_globals")
    report.update(loaded)

    seed_path = fixture / "seed_pruned_model.bin"
    seed_globals = None
    report["pickle_globals"] = {"standin_model": sorted(model_globals)}
    if seed_path.exists():
        report["seed"] = seed_checks(seed_path, reference, standin_fp16)
        seed_globals = zip_globals(seed_path.read_bytes())
        seed_model_globals = {g for g in seed_globals if not g.startswith(TOKENIZER_GLOBALS)}
        report["pickle_globals"]["seed_model"] = sorted(seed_model_globals)
        report["pickle_globals"].update(globals_against(model_globals, seed_model_globals))
    if made_bin is not None:
        report["made_bin"] = made_bin_checks(made_bin, reference, standin_fp16, seed_globals)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Check the stand-in slicegpt package against an official fixture.")
    parser.add_argument("fixture", type=Path)
    parser.add_argument("--made-bin", type=Path, help="a make_seed_bin.py output to unpickle and check")
    parser.add_argument("--probe-name", action="append", default=[], help="a model name to ask from_model about")
    args = parser.parse_args()
    print(json.dumps(main(args.fixture, args.made_bin, args.probe_name), indent=1))
