"""Loading a SliceGPT checkpoint in the server: the official way or our own.

Both loaders start from what our reader (``model.checkpoint.read_checkpoint``) has
validated, so bad input gets the same clear errors whichever loader is used. Then:

- ``builtin``: the portable model is built straight from the checkpoint's tensors.
- ``official``: ``slicegpt.hf_utils.load_sliced_model`` loads it, and the portable model
  is built from the official model's own tensors (sharing their memory). Its ``torch.load``
  of the checkpoint is handed the state dict we loaded with ``weights_only=True``, so a file
  swapped in a shared directory after our checks is never unpickled by it (an old torch's
  default is ``weights_only=False``); any other ``torch.load`` it makes is forced to
  ``weights_only=True``. Its quirks are handled here: adapters are chosen by model name
  (``meta-llama/Llama-2…`` / ``Meta-Llama-3…``, ``facebook/opt…``, exactly ``microsoft/phi-2``,
  ``microsoft/Phi-3-mini-4k-instruct…``: ``families.Family.official_name``), which a local base
  model dir does not match, and file names derive from that name, so the files are linked into a
  staging directory under a name the official code accepts (never a file from outside the
  base model dir); older releases take the ``.pt`` path, newer ones a directory, so the
  directory form is tried first and the path form second.

``auto`` is ``official`` when ``slicegpt`` can be imported, else ``builtin``. Every
result says which loader was used. Either way the model keeps the checkpoint's dtype (the
official loader builds fp16 modules whatever the checkpoint holds: they are cast back and
given the checkpoint's tensors again, so an fp32 checkpoint stays fp32, exactly).

A device group (``cuda:0+cuda:1``) spreads one model over its devices (``model.placement``: embeddings
first, the layers in runs balanced by bytes, the head last). The official model, when loaded, is spread
by ``slicegpt.gpu_utils.distribute_model`` where that is what the group asks for (every GPU the server
sees: it balances over all of them), else by accelerate's ``dispatch_model`` on slicebridge's plan. The
results' ``placement`` says what went where, and how.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slicebridge.bridge.devices import device_parts, repeated_gpus
from slicebridge.bridge.server_loop import HandlerError
from slicebridge.model import portable
from slicebridge.model.families import official_model_name
from slicebridge.server import faults

log = logging.getLogger(__name__)

LOADERS = ("auto", "official", "builtin")


class LoaderUnavailable(HandlerError):
    """The official loader was asked for but slicegpt cannot be imported in the server's env."""


class DeviceUnavailable(HandlerError):
    """A CUDA device was asked for but the server's env has none."""


class OfficialLoaderFailed(HandlerError):
    """slicegpt's own loader could not load the checkpoint."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint loaded into the server: the portable model and what is known about it."""

    model: Any  # the family's Sliced<X>ForCausalLM, on ``device``
    checkpoint: Any  # model.checkpoint.SliceGPTCheckpoint
    loader: str
    device: str
    load_seconds: float
    official_model: Any = None  # the slicegpt model object, when loaded officially
    official_name: str | None = None  # the model name the official adapter was given
    placement: dict | None = None  # on a device group: what went where, and how (None on one device)

    @property
    def input_device(self) -> str:
        """Where the model takes its inputs: its device, or the first of its group."""
        return self.device.split("+")[0]

    @property
    def nbytes(self) -> int:
        tensors = {id(t): t for t in self.model.state_dict().values()}
        return sum(t.numel() * t.element_size() for t in tensors.values())


def official_available() -> bool:
    return importlib.util.find_spec("slicegpt") is not None


def resolve_loader(requested: str, what: str = "loader") -> str:
    """``official`` or ``builtin`` for a requested ``auto | official | builtin`` (``what``: the option's name,
    ``loader`` or ``slicer``): ``auto`` is official where slicegpt is importable."""
    if requested not in LOADERS:
        raise ValueError(f"{what} must be one of {', '.join(LOADERS)}, not {requested!r}")
    if requested == "auto":
        return "official" if official_available() else "builtin"
    if requested == "official" and not official_available():
        raise LoaderUnavailable(
            f"{what}='official' needs the slicegpt package in the server's env, and it is not importable "
            f"there; install it in that env or use {what}='builtin' (no slicegpt needed)"
        )
    return requested


def resolve_device(requested: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` for ``auto | cpu | cuda | cuda:N``, checked against the server's GPUs."""
    import torch

    if "+" in requested:
        raise ValueError(
            f"device={requested!r} is a device group, which convert, export and verify take (one model spread over "
            "several devices); this request runs on one device: auto, cpu, cuda or cuda:N"
        )
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"device={requested!r} was asked for, but the server's env sees no CUDA device")
        index = int(requested.split(":")[1]) if ":" in requested else 0
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(f"device={requested!r}: only {torch.cuda.device_count()} CUDA device(s) exist")
        return requested
    if requested != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {requested!r}")
    return requested


def resolve_devices(requested: str) -> str:
    """One device as ``resolve_device`` has it, or a device group ``cuda:0+cuda:1`` (two or more devices, each
    ``cpu`` or ``cuda:N`` and checked the same way; ``cpu`` may repeat, a GPU may not): one model over them all."""
    if "+" not in requested:
        return resolve_device(requested)
    parts = device_parts(requested)
    if parts is None:
        raise ValueError(
            f"device={requested!r}: a device group joins two or more devices, each cpu or cuda:N, with + "
            "(as cuda:0+cuda:1)"
        )
    twice = repeated_gpus(parts)
    if twice:
        raise ValueError(f"device={requested!r} names {twice[0]} twice: each GPU of a group holds its own share")
    for part in parts:
        try:
            resolve_device(part)
        except DeviceUnavailable as exc:
            raise DeviceUnavailable(f"in the device group {requested!r}: {exc}") from None
    return requested


DTYPES = ("float32", "float16", "bfloat16")


def resolve_dtype(requested: str) -> str:
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {requested!r}")
    return requested


Progress = Callable[[str, float, float], None]


def load_checkpoint(
    checkpoint, loader: str, device: str, dtype: str, progress: Progress = lambda *a: None
) -> LoadedCheckpoint:
    """Load a checkpoint the reader has validated, with a resolved loader, onto ``device`` in ``dtype``."""
    import torch

    started = time.perf_counter()
    progress("load", 1, 3)
    faults.at("load")
    config = checkpoint.sliced_config()  # a layout the family's model cannot rebuild is refused whichever loader
    adapter = official_model = official_name = placement = None
    if loader == "official":
        official_name = official_model_name(checkpoint.family, checkpoint.base_config, checkpoint.model_stem)
        adapter = _load_official(checkpoint, official_name)
        official_model = adapter.model
        model = _portable_from_official(official_model, config)
    else:
        model = portable.build_model(checkpoint.load_tensors(), config)
    progress("load", 2, 3)
    if "+" in device:
        placement = _place_on_group(model, adapter, device.split("+"), getattr(torch, dtype))
    else:
        model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
        if official_model is not None:
            official_model.to(device=device, dtype=getattr(torch, dtype)).eval()
    progress("load", 3, 3)
    seconds = time.perf_counter() - started
    log.info("loaded %s with the %s loader on %s in %.2fs", checkpoint.checkpoint_path.name, loader, device, seconds)
    return LoadedCheckpoint(model, checkpoint, loader, device, seconds, official_model, official_name, placement)


def _place_on_group(model, adapter, devices: list[str], dtype) -> dict:
    """Spread the portable model (and the official one, when loaded) over a device group; what went where."""
    from slicebridge.model import placement

    model.to(dtype=dtype).eval()
    ours = placement.place(model, devices)
    placed = {"by": "slicebridge", "devices": ours.describe()}
    if adapter is not None:
        adapter.model.to(dtype=dtype).eval()
        placed["official"] = _place_official(adapter, ours)
    return placed


def _place_official(adapter, ours) -> dict:
    """The official model over the group: ``distribute_model`` when the group is every GPU the server sees (what it
    balances over), else accelerate's ``dispatch_model`` on our plan (in a group led by a GPU, a ``cpu`` is then
    accelerate's host offload: weights kept on the host, computed on that GPU)."""
    import torch

    from slicebridge.model import placement

    if ours.devices == [f"cuda:{index}" for index in range(torch.cuda.device_count())]:
        from slicegpt import gpu_utils

        gpu_utils.distribute_model(adapter)
        by = "slicegpt.gpu_utils.distribute_model"
    else:
        from accelerate import dispatch_model

        dispatch_model(adapter.model, placement.hf_device_map(adapter.model, ours), main_device=ours.devices[0])
        by = "accelerate.dispatch_model on slicebridge's plan"
    return {"by": by, "devices": placement.describe_device_map(adapter.model.hf_device_map)}


# ---------------------------------------------------------------------------------- official


def _stage_for_official(checkpoint, model_name: str, staging: Path) -> Path:
    """Link the checkpoint, its SlicingConfig and the base model's files under official names."""
    from slicebridge.model.binfile import contained_files

    stem = f"{Path(model_name).name}_{checkpoint.sparsity}"
    os.symlink(checkpoint.checkpoint_path.resolve(), staging / f"{stem}.pt")
    if checkpoint.slicing_config_path is not None:
        os.symlink(checkpoint.slicing_config_path.resolve(), staging / f"{stem}.json")
    base = Path(checkpoint.base_dir)
    names = sorted(item.name for item in base.iterdir() if item.suffix in (".json", ".model", ".txt"))
    for name, path in contained_files(base, names).items():  # config.json, tokenizer files; none from outside
        if not (staging / name).exists():
            os.symlink(path, staging / name)
    return staging / f"{stem}.pt"


@contextlib.contextmanager
def _checked_torch_load(staged_checkpoint: Path, state_dict: dict):
    """While slicegpt's loader runs: its load of the staged checkpoint returns ``state_dict`` (what
    our reader loaded with weights_only and validated), and every other load is weights_only."""
    import torch

    original = torch.load

    def load(f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.path.abspath(os.fspath(f)) == str(staged_checkpoint):
            return dict(state_dict)
        kwargs["weights_only"] = True
        return original(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def _load_official(checkpoint, model_name: str):
    """slicegpt's model adapter, its model in the checkpoint's dtype holding the checkpoint's exact values."""
    from slicegpt import hf_utils

    if checkpoint.sparsity is None:
        raise OfficialLoaderFailed(
            f"slicegpt's loader needs the sparsity, and {checkpoint.checkpoint_path.name} does not say it; "
            "pass sparsity=..."
        )
    kwargs = {"sparsity": checkpoint.sparsity}
    if checkpoint.round_interval is not None:
        kwargs["round_interval"] = checkpoint.round_interval
    with tempfile.TemporaryDirectory(prefix="slicebridge-official-") as staging:
        try:
            pt_path = _stage_for_official(checkpoint, model_name, Path(staging))
        except OSError as exc:
            raise OfficialLoaderFailed(
                f"could not link {checkpoint.checkpoint_path.name} under the name slicegpt's adapter accepts "
                f"({model_name!r}): {exc.strerror or exc}"
            ) from None
        state_dict = checkpoint.load_tensors()
        attempts = []
        for style, location in (("directory (newer releases)", staging), (".pt path (older releases)", str(pt_path))):
            try:
                with _checked_torch_load(pt_path, state_dict):
                    model_adapter, _tokenizer = hf_utils.load_sliced_model(model_name, location, **kwargs)
                log.info("slicegpt.load_sliced_model took the %s form", style)
                _in_checkpoint_dtype(model_adapter.model, state_dict, checkpoint.dtype)
                return model_adapter
            except (OSError, ValueError, TypeError, NotImplementedError, RuntimeError) as exc:
                attempts.append(f"{style}: {type(exc).__name__}: {exc}")
        raise OfficialLoaderFailed(
            f"slicegpt.hf_utils.load_sliced_model could not load {checkpoint.checkpoint_path} as {model_name!r} "
            f"(its {checkpoint.family.title} adapter accepts {checkpoint.family.official_names}):\n  "
            + "\n  ".join(attempts)
            + "\nloader='builtin' loads it without slicegpt."
        )


def _in_checkpoint_dtype(official_model, state_dict: dict, dtype: str) -> None:
    """Put the official model in the checkpoint's dtype, holding the checkpoint's exact values."""
    import torch

    wanted = getattr(torch, dtype)
    if next(official_model.parameters()).dtype != wanted:
        log.info(
            "slicegpt's loader built %s modules; casting them to the checkpoint's %s",
            next(official_model.parameters()).dtype,
            wanted,
        )
        official_model.to(wanted).load_state_dict(state_dict)


def _portable_from_official(official_model, config):
    """The portable model over the official model's tensors (no copy where they are compact)."""
    state = {k: v for k, v in official_model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    return portable.build_model(state, config)
