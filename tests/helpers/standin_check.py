"""Check the stand-in ``slicegpt`` package against the official SliceGPT fixture.

Run by the stand-in slicegpt env's interpreter (transformers 4.41):

    .envs/slicegpt/bin/python tests/helpers/standin_check.py <fixture_dir>

It puts ``tests/standin`` on sys.path itself, then prints one JSON object with:
- ``load_new``: the fixture loaded through ``slicegpt.hf_utils.load_sliced_model`` (new API:
  the save directory); structure facts and, per precision (fp16 as loaded, fp32 after
  ``.float()``) and input, NMSE / max |diff| / top-1 agreement against the official logits.
- ``load_old``: the same through the old API (``SLICEGPT_STANDIN_API=old``: the ``.pt`` path).
- ``load_without_slicing_json``: the same without the ``.json`` (constant width from sparsity).
- ``wrong_args``: the error type and message of each call the official would reject.
- ``seed``: ``seed_pruned_model.bin`` (an official model object pickled with dill) unpickled
  with the stand-in importable, run, and compared with the official logits and, bit for bit,
  with the stand-in's own fp16 model.
- ``pickle_globals``: the non-dill globals a dill pickle of the stand-in's model references,
  against those in the seed ``.bin``.
"""

from __future__ import annotations

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

from slicebridge.model.compare import logit_metrics  # noqa: E402

INPUTS = {"probe": ("probe_ids", "logits_{}"), "text": ("text_ids", "text_logits_{}")}
# Globals that only say how dill/torch rebuild things, not which classes they need.
PLUMBING = ("dill.", "_codecs ", "__builtin__ ", "builtins ", "copyreg ", "torch._utils ", "collections ")


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


def structure(model_adapter, tokenizer, checkpoint: dict) -> dict[str, Any]:
    model = model_adapter.model
    layer = model.model.layers[0]
    state = model.state_dict()
    return {
        "model_class": type(model).__qualname__,
        "model_module": type(model).__module__,
        "model_base": f"{type(model).__mro__[1].__module__}.{type(model).__mro__[1].__qualname__}",
        "layer_class": f"{type(layer).__module__}.{type(layer).__qualname__}",
        "layer_is_llama_decoder_layer": isinstance(layer, transformers.models.llama.modeling_llama.LlamaDecoderLayer),
        "attention_class": type(layer.self_attn).__name__,
        "norm_classes": sorted(
            {f"{type(m).__module__}.{type(m).__qualname__}" for n, m in model.named_modules() if n.endswith("norm")}
        ),
        "rmsn_mean_dim": layer.input_layernorm.mean_dim,
        "rmsn_eps": layer.input_layernorm.eps,
        "dtype": str(model.dtype),
        "shortcut_shapes": [list(layer.attn_shortcut_Q.shape), list(layer.mlp_shortcut_Q.shape)],
        "last_mlp_shortcut_shape": list(model.model.layers[-1].mlp_shortcut_Q.shape),
        "state_dict_keys_match_pt": list(state) == list(checkpoint),
        "state_dict_equal_pt": all(torch.equal(state[k], checkpoint[k]) for k in checkpoint),
        "slicing_conf_hidden_size": model_adapter.slicing_conf.hidden_size,
        "use_cache": model.config.use_cache,
        "seqlen": getattr(model, "seqlen", None),
        "pad_token_id": model.config.pad_token_id,
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_pad_token": tokenizer.pad_token,
    }


def main(fixture: Path) -> dict[str, Any]:
    started = time.perf_counter()
    facts = json.loads((fixture / "fixture.json").read_text())
    name, sparsity, interval = facts["model_name"], facts["sparsity"], facts["round_interval"]
    sliced = fixture / "sliced"
    pt_path = sliced / f"{Path(name).name}_{sparsity}.pt"
    reference = torch.load(fixture / "reference.pt", weights_only=True)
    checkpoint = torch.load(pt_path, map_location="cpu", weights_only=True)
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
    }

    def load(mode: str, path: Path, model_name: str = name, **kw):
        kw.setdefault("sparsity", sparsity)
        kw.setdefault("round_interval", interval)
        return with_api(mode, lambda: hf_utils.load_sliced_model(model_name, str(path), **kw))

    adapter, tokenizer = load("new", sliced)
    model = adapter.model
    standin_fp16 = logits_of(model, reference["probe_ids"])
    report["load_new"] = structure(adapter, tokenizer, checkpoint)
    report["load_new"]["fp16"] = against_reference(model, reference, "fp16")
    model_globals = torch_save_globals({"model": model})
    model.float()
    report["load_new"]["fp32"] = against_reference(model, reference, "fp32")
    del adapter, model

    old_adapter, _ = load("old", pt_path)
    report["load_old"] = {
        "model_class": type(old_adapter.model).__qualname__,
        "fp16_identical_to_new": torch.equal(logits_of(old_adapter.model, reference["probe_ids"]), standin_fp16),
    }
    del old_adapter

    # Without the .json the widths come from sparsity and round_interval (ConstSlicingScheduler).
    with tempfile.TemporaryDirectory() as tmp:
        for item in sliced.iterdir():
            if item.suffix != ".json" or not item.name.startswith(Path(name).name):
                (Path(tmp) / item.name).symlink_to(item)
        const_adapter, _ = load("new", Path(tmp))
        report["load_without_slicing_json"] = {
            "const_dimension": const_adapter.slicing_conf.const_dimension,
            "fp16_identical_to_new": torch.equal(logits_of(const_adapter.model, reference["probe_ids"]), standin_fp16),
        }
        del const_adapter

    report["wrong_args"] = {
        "old_api_with_directory": error_of(lambda: load("old", sliced)),
        "new_api_with_pt_path": error_of(lambda: load("new", pt_path)),
        "new_api_local_path_as_model_name": error_of(lambda: load("new", sliced, model_name=str(sliced))),
        "old_api_local_path_as_model_name": error_of(lambda: load("old", pt_path, model_name=str(sliced))),
        "new_api_without_sparsity": error_of(lambda: load("new", sliced, sparsity=None)),
        "bad_api_mode": error_of(lambda: load("middle", sliced)),
    }

    seed_path = fixture / "seed_pruned_model.bin"
    seed = torch.load(seed_path, pickle_module=dill, weights_only=False, map_location="cpu")
    seed_model = seed["model"]
    seed_layer = seed_model.model.layers[0]
    seed_fp16 = logits_of(seed_model, reference["probe_ids"])
    report["seed"] = {
        "keys": sorted(seed),
        "model_class": type(seed_model).__qualname__,
        "model_module": type(seed_model).__module__,
        "layer_class": f"{type(seed_layer).__module__}.{type(seed_layer).__qualname__}",
        "layer_attrs": sorted(k for k in vars(seed_layer) if not k.startswith("_")),
        "layer_params": list(seed_layer._parameters),
        "norm_attrs": sorted(k for k in vars(seed_layer.input_layernorm) if not k.startswith("_")),
        "dtype": str(seed_model.dtype),
        "fp16": {"probe": logit_metrics(seed_fp16, reference["logits_fp16"])},
        "identical_to_standin_fp16": torch.equal(seed_fp16, standin_fp16),
        "max_abs_diff_to_standin_fp16": float((seed_fp16 - standin_fp16).abs().max()),
    }
    seed_globals = zip_globals(seed_path.read_bytes())
    seed_model_globals = {g for g in seed_globals if not g.startswith(("tokenizers", "transformers.tokenization"))}
    report["pickle_globals"] = {
        "seed_model": sorted(seed_model_globals),
        "standin_model": sorted(model_globals),
        "missing_in_standin": sorted(seed_model_globals - model_globals),
        "extra_in_standin": sorted(model_globals - seed_model_globals),
    }
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: standin_check.py <fixture_dir>")
    print(json.dumps(main(Path(sys.argv[1])), indent=1))
