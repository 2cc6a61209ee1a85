"""Test stand-in for the official ``slicegpt.hf_utils`` (microsoft/TransformerCompression).

Reproduces ``get_model_and_tokenizer`` and ``load_sliced_model`` for every family the
adapters serve (Llama, OPT, Phi-2, Phi-3), with the official control flow and failure modes,
but strictly offline (local files only: where the official would download config/tokenizer
from the Hugging Face Hub, this raises the ``OSError`` transformers gives for a name that is
neither a local folder nor cached).

Two releases of ``load_sliced_model(model_name, sliced_model_path, *, token=None,
lora_config=None, sparsity=None, round_interval=1)``, picked per call by the env var
``SLICEGPT_STANDIN_API`` (``new``, the default, or ``old``):

- new (commit 52df480 "Support sliced local model loading from path" and later, incl. the
  6b12cde release the fixtures were made with): ``sliced_model_path`` is the --save-dir
  DIRECTORY; the files are ``{Path(model_name).name}_{sparsity}.pt`` / ``.json`` in it;
  base config + tokenizer are read from that directory when it holds ``config.json``,
  else from the Hub by model name.
- old (before 52df480): ``sliced_model_path`` is the ``.pt`` FILE; config + tokenizer come
  from its parent directory (when it holds ``config.json``, else the Hub by model name); the
  slicing config is ``sliced_model_path`` with suffix ``.json``; ``model_name`` and
  ``sparsity`` are not used for file names.

Given the other release's argument each fails the way the real one does: the "local model"
test ``(model_path / "config.json").exists()`` is false (a .pt path in new mode; the
directory ABOVE the save dir in old mode), so the config is looked up on the Hub by model
name -> ``OSError``. Had that succeeded, new mode would go on to ``torch.load`` a
``<file>.pt/{name}_{sparsity}.pt`` path (NotADirectoryError) and old mode would
``torch.load`` a directory (IsADirectoryError). A model name without a supported prefix
raises ``NotImplementedError`` before any file is read.

Also importable from here, as in the official (which imports them for the loader):
``replace_layers`` and ``fuse_modules`` (``layernorm_fusion``) and ``slice_rotated_model``
(``rotate``). As the official loader does, ``load_sliced_model`` runs the real fusion
arithmetic on the UNINITIALISED model (so the structure comes out right: OPT's and Phi-2's
``lm_head`` gain a bias, every norm is an RMSN over the original width) and the state dict then
overwrites every weight.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
from typing import Any

import torch
from transformers import AutoTokenizer

from slicegpt.layernorm_fusion import fuse_modules, replace_layers
from slicegpt.model_adapter import ModelAdapter, SlicingConfig
from slicegpt.rotate import slice_rotated_model

API_ENV_VAR = "SLICEGPT_STANDIN_API"

log = logging.getLogger(__name__)


def api_mode() -> str:
    mode = os.environ.get(API_ENV_VAR, "new").strip().lower() or "new"
    if mode not in ("old", "new"):
        raise ValueError(f"{API_ENV_VAR} must be 'old' or 'new', not {mode!r}")
    return mode


def do_not_initialize(func):
    """Skip torch.nn.init's random fills while ``func`` builds modules (weights get loaded anyway)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        names = ("kaiming_uniform_", "uniform_", "normal_")
        saved = {name: getattr(torch.nn.init, name) for name in names}
        for name in names:
            setattr(torch.nn.init, name, lambda *a, **k: None)
        try:
            return func(*args, **kwargs)
        finally:
            for name, fn in saved.items():
                setattr(torch.nn.init, name, fn)

    return wrapper


@do_not_initialize
def get_model_and_tokenizer(
    model_name: str,
    model_path: str | None = None,
    *,
    uninitialized: bool = False,
    dtype: torch.dtype = torch.float16,
    token: str | bool | None = None,
):
    local_model = model_path is not None
    if local_model and uninitialized:
        local_model = (pathlib.Path(model_path) / "config.json").exists()
    if not local_model:
        model_path = model_name  # the official goes to the Hub here; the stand-in only looks in the HF cache
    model_adapter = ModelAdapter.from_model(
        model_name,
        model_path=model_path,
        model_type="uninitialized" if uninitialized else "pretrained",
        dtype=dtype,
        local_files_only=local_model,
        token=token,
    )
    model = model_adapter.model
    model.seqlen = model.config.max_position_embeddings
    model.eval()
    model_adapter.use_cache = False
    tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=True, token=token, local_files_only=True)
    model_adapter.post_init(tokenizer)
    return model_adapter, tokenizer


@do_not_initialize
def load_sliced_model(
    model_name: str,
    sliced_model_path: str,
    *,
    token: str | None = None,
    lora_config: Any = None,
    sparsity: float | None = None,
    round_interval: int | None = 1,
):
    """Load a run_slicegpt checkpoint as the official release selected by SLICEGPT_STANDIN_API does."""
    if api_mode() == "new":
        stem = pathlib.Path(model_name).name
        base_dir = str(sliced_model_path)
        weights_path = pathlib.Path(sliced_model_path) / f"{stem}_{sparsity}.pt"
        config_path = pathlib.Path(sliced_model_path) / f"{stem}_{sparsity}.json"
    else:
        base_dir = str(pathlib.Path(sliced_model_path).parent)
        weights_path = pathlib.Path(sliced_model_path)
        config_path = weights_path.with_suffix(".json")

    model_adapter, tokenizer = get_model_and_tokenizer(model_name, model_path=base_dir, uninitialized=True, token=token)
    replace_layers(model_adapter)
    fuse_modules(model_adapter)
    hidden = model_adapter.hidden_size
    for adapter in model_adapter.get_layers():
        if not model_adapter.parallel_blocks:
            adapter.layer.mlp_shortcut_Q = torch.nn.Parameter(torch.zeros(hidden, hidden, dtype=torch.float16))
        adapter.layer.attn_shortcut_Q = torch.nn.Parameter(torch.zeros(hidden, hidden, dtype=torch.float16))

    if config_path.exists():
        model_adapter.slicing_conf = SlicingConfig.from_json_string(config_path.read_text())
    if model_adapter.slicing_conf is None:  # no .json: constant width from the arguments
        width = int((1 - sparsity) * hidden)
        width -= width % round_interval
        model_adapter.slicing_conf = SlicingConfig(const_dimension=width)
    slice_rotated_model(model_adapter)

    if lora_config:
        from peft import get_peft_model

        model_adapter.model = get_peft_model(model_adapter.model, lora_config)

    log.info("Loading sliced model weights from %s", sliced_model_path)
    model_adapter.model.load_state_dict(torch.load(str(weights_path), map_location="cpu"))
    model_adapter.model.eval()
    return model_adapter, tokenizer
