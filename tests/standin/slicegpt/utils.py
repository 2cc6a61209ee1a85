"""Test stand-in for the official ``slicegpt.utils`` (microsoft/TransformerCompression).

Reproduces ``cleanup_memory`` (garbage collection, then emptying the CUDA cache when there is
one, with a DEBUG line of the reserved memory before and after; one deviation: without CUDA only
the youngest generation is collected -- a full collection frees nothing slicing relies on, tensors
go by reference counting, and in a process holding transformers and datasets it costs ~0.2 s a
call, ~20 calls a slice, most of a test's time), ``map_tensors`` (tensors in
nested lists, tuples and dicts moved to a device and/or cast; a tuple stays a tuple, a dict
comes back a plain dict) and ``configure_logging`` (what experiments/run_slicegpt.py calls: a
console handler printing bare messages at ``level``, optionally a DEBUG log file
``<log_dir>/log_<timestamp>.log``, the root logger at NOTSET).
"""

from __future__ import annotations

import datetime
import gc
import inspect
import logging
import pathlib
from typing import Any

import torch

log = logging.getLogger(__name__)


def _reserved_gib() -> float:
    return sum(torch.cuda.memory_reserved(device=i) for i in range(torch.cuda.device_count())) / 1024**3


def cleanup_memory() -> None:
    """Run the garbage collector and give cached CUDA memory back."""
    before = _reserved_gib()
    gc.collect(generation=2 if torch.cuda.is_available() else 0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        after = _reserved_gib()
        caller = inspect.stack()[1].function
        log.debug("GPU memory (from %s): %.2f -> %.2f GB (%.2f GB)", caller, before, after, after - before)


def map_tensors(obj: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """``obj`` with every tensor in it (recursively) moved to ``device`` and cast to ``dtype``."""
    if isinstance(obj, torch.Tensor):
        obj = obj if device is None else obj.to(device=device)
        return obj if dtype is None else obj.to(dtype=dtype)
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(item, device, dtype) for item in obj)
    if isinstance(obj, dict):
        return {key: map_tensors(value, device, dtype) for key, value in obj.items()}
    return obj


def configure_logging(
    log_to_console: bool = True, log_to_file: bool = True, log_dir: str = "log", level: int = logging.INFO
) -> None:
    """Root logging as the official experiments set it up."""
    handlers: list[logging.Handler] = []
    if log_to_console:
        console = logging.StreamHandler()
        console.setLevel(level)
        console.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(console)
    if log_to_file:
        path = pathlib.Path.cwd() / log_dir / f"{datetime.datetime.now():log_%Y-%m-%d-%H-%M-%S}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(path, encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(
            logging.Formatter("%(asctime)s.%(msecs)04d\t%(levelname)s\t%(name)s\t%(message)s", "%Y-%m-%dT%H:%M:%S")
        )
        handlers.append(file_handler)
    logging.basicConfig(handlers=handlers, level=logging.NOTSET)
