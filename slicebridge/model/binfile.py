"""The ``.bin`` format: the seed's dict, made portable and safe to load.

A ``.bin`` is ``torch.save`` of the dict the seed's evaluation code expects::

    {"model": SlicedLlamaForCausalLM, "tokenizer": PreTrainedTokenizerFast,
     "method": "SliceGPT", "pruning_ratio": 0.25, "actual_ratio": 0.13,
     "config": {"base_model", "slicegpt_model", "sparsity", "round_interval", "note"},
     "format": "slicebridge.bin", "format_version": 1, "producer": {...}, "loader": "builtin",
     "params": {"dense", "sliced", "shortcut_q"}, "widths": {...}}

Unlike the seed's file, ``model`` and ``tokenizer`` are not pickled objects. They are
stored as recipes: a call to :func:`rebuild_model` with a config dict and tensors, and
to :func:`rebuild_tokenizer` with the tokenizer's files. Unpickling runs those two
functions in the loading env, which rebuilds the objects with whatever transformers
is installed there. So the file loads without slicegpt and across transformers
versions, with ``torch.load(p, weights_only=False)``, with
``torch.load(p, pickle_module=dill)``, and with :func:`load`, which uses torch's
``weights_only`` unpickler with only those two functions allowed: a file that
references anything else is refused before any of it runs.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping

from slicebridge.model.atomic import atomic_file

log = logging.getLogger("slicebridge.binfile")

FORMAT = "slicebridge.bin"
FORMAT_VERSION = 1
NOTE = ("Portable SliceGPT model: rebuilt from tensors and config by slicebridge when loaded; "
        "needs torch and transformers, not slicegpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json")


class BinFileError(Exception):
    """A ``.bin`` cannot be loaded; the message says why and what to do."""


class UnsafeBinFile(BinFileError):
    """A ``.bin`` references code outside the allowlist; it was not unpickled."""

    def __init__(self, path: Path, global_name: str):
        self.global_name = global_name
        hint = ""
        if global_name.startswith(("slicegpt", "dill")) or "LlamaSdpaAttention" in global_name:
            hint = (" It looks like a .bin made the seed's way (a dill pickle of the slicegpt model object): "
                    "run `slicebridge upgrade` on it in the slicegpt env to turn it into a portable one.")
        super().__init__(
            f"{path} references {global_name}, which is outside slicebridge's allowlist, so it was not loaded "
            f"(loading it would run code from the file).{hint} If you trust the file, pass trust_pickle=True."
        )


# ---------------------------------------------------------------------------------- recipes


class ModelRecipe:
    """Pickles as ``rebuild_model(config, state_dict)``: tensors and a config, no classes."""

    def __init__(self, config: Mapping[str, Any], state_dict: Mapping[str, Any]):
        self.config = dict(config)
        self.state_dict = dict(state_dict)

    def __reduce__(self):
        return rebuild_model, (self.config, self.state_dict)


class TokenizerRecipe:
    """Pickles as ``rebuild_tokenizer(files)``: the tokenizer's files, byte for byte."""

    def __init__(self, files: Mapping[str, bytes]):
        self.files = dict(files)

    def __reduce__(self):
        return rebuild_tokenizer, (self.files,)


def rebuild_model(config: dict, state_dict: dict):
    """Build the portable model in the loading env from a config dict and its tensors."""
    from slicebridge.model.configuration_sliced_llama import SlicedLlamaConfig
    from slicebridge.model.modeling_sliced_llama import build_sliced_llama

    config = dict(config)
    config.pop("model_type", None)
    return build_sliced_llama(state_dict, SlicedLlamaConfig(**config)).eval()


def rebuild_tokenizer(files: dict):
    """Build the tokenizer in the loading env from its saved files (None if there were none)."""
    if not files:
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="slicebridge-tok-") as tmp:
        for name, data in files.items():
            if os.sep in name or name.startswith("."):
                raise BinFileError(f"refusing a tokenizer file named {name!r}")
            Path(tmp, name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp)


def tokenizer_files(directory: str | os.PathLike) -> dict[str, bytes]:
    """The tokenizer (and generation config) files found in a model directory."""
    directory = Path(directory)
    return {name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).is_file()}


# ---------------------------------------------------------------------------------- writing


def producer_versions() -> dict[str, str | None]:
    import torch
    import transformers

    import slicebridge

    try:
        import dill
        dill_version = dill.__version__
    except ImportError:
        dill_version = None
    return {"slicebridge": slicebridge.__version__, "torch": str(torch.__version__),
            "transformers": str(transformers.__version__), "dill": dill_version,
            "python": platform.python_version()}


def pickle_module_for(choice: str):
    """``auto``: dill when installed (as the seed does), else pickle."""
    import pickle

    if choice not in ("auto", "dill", "pickle"):
        raise ValueError(f"pickle_module must be auto, dill or pickle, not {choice!r}")
    if choice == "pickle":
        return pickle
    try:
        import dill

        return dill
    except ImportError:
        if choice == "dill":
            raise BinFileError("pickle_module='dill' was asked for, but dill is not installed") from None
        return pickle


def cpu_state_dict(model) -> dict:
    """The model's tensors on the CPU, compact, whatever device it computes on."""
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}


def save_bin(path: str | os.PathLike, *, model, tokenizer_files: Mapping[str, bytes], pruning_ratio: float,
             actual_ratio: float, config: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
             overwrite: bool = False, pickle_module: str = "auto") -> dict:
    """Write a ``.bin`` atomically; returns what was written besides the model (for reports)."""
    import torch

    module = pickle_module_for(pickle_module)
    contents = {
        "model": ModelRecipe(model.config.to_dict(), cpu_state_dict(model)),
        "tokenizer": TokenizerRecipe(tokenizer_files),
        "method": "SliceGPT",
        "pruning_ratio": float(pruning_ratio),
        "actual_ratio": float(actual_ratio),
        "config": {**dict(config), "note": NOTE},
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "producer": producer_versions(),
        **dict(extra or {}),
    }
    with atomic_file(path, overwrite) as tmp:
        try:
            torch.save(contents, tmp, pickle_module=module)
        except RuntimeError:
            # torch's zip writer reports a failed write as a RuntimeError about positions;
            # the real cause (full disk, file size limit) shows when we try to write more.
            cause = _write_failure(tmp)
            if cause is not None:
                raise cause from None
            raise
    summary = {k: v for k, v in contents.items() if k not in ("model", "tokenizer")}
    summary["pickle_module"] = module.__name__
    return summary


def _write_failure(path: Path) -> OSError | None:
    """The OSError that writing one more byte to ``path`` raises, if any."""
    try:
        with open(path, "ab", buffering=0) as fh:
            fh.write(b"\0")
    except OSError as exc:
        return exc
    return None


# ---------------------------------------------------------------------------------- reading


ALLOWED_CALLS = (rebuild_model, rebuild_tokenizer)
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")  # how torch names the global it refused


def load(path: str | os.PathLike, *, map_location: Any = "cpu", trust_pickle: bool = False) -> dict:
    """Load a ``.bin``. By default only slicebridge's two rebuild functions may run.

    ``trust_pickle=True`` loads any pickle (the seed's files included) with dill when
    installed: only for files you trust, since that runs code from the file.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise BinFileError(f"{path} does not exist or is not a file")
    if trust_pickle:
        return torch.load(path, map_location=map_location, weights_only=False,
                          pickle_module=pickle_module_for("auto"))
    try:
        with torch.serialization.safe_globals(list(ALLOWED_CALLS)):
            contents = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        match = _UNSUPPORTED_GLOBAL.search(str(exc))
        if match:
            raise UnsafeBinFile(path, match.group(1)) from None
        raise BinFileError(f"{path} is not a loadable .bin: {str(exc).splitlines()[0]}") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise BinFileError(f"{path} is not a readable torch file (truncated or not a .bin?): {exc}") from None
    if not isinstance(contents, dict) or "model" not in contents:
        raise BinFileError(f"{path} is a torch file but not a model .bin (no 'model' entry)")
    return contents
