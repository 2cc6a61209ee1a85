"""Checks made before slicebridge opens a file it was given, or writes where it was told.

- ``require_regular_file``: a path named for reading must be a regular file (after links are
  followed) before it is opened: a FIFO or a device would block the reader (and a server)
  forever, so it is refused with the caller's error type, by ``os.stat``, without opening it.
- ``refuse_output_over_inputs``: an output may not be one of the job's inputs (the checkpoint,
  its ``.json``, the base-model directory) nor a directory that holds one: writing it with
  ``overwrite`` would replace the inputs the job reads. Refused with ``OutputCollision``
  before any work, on the client (``client.batch``) and again in the server, for API callers.

Stdlib only: staged into the server.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from slicebridge.errors import SlicebridgeError


class OutputCollision(SlicebridgeError):
    """Two checkpoints of one batch would write one output, or an output would replace an input."""


def require_regular_file(path: str | os.PathLike, error: type[Exception], what: str = "file") -> Path:
    """``path`` if it is a regular file (links followed); else ``error`` in one sentence, without opening it."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(mode)
            else "a FIFO (named pipe)"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file"
        )
        raise error(f"{path} is {kind}, not a regular {what}; refusing to read it")
    return path


def _forms(path: str | os.PathLike) -> set[Path]:
    """The absolute path as given (a final link kept) and what it resolves to."""
    absolute = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    forms = {absolute, Path(os.path.realpath(absolute))}
    parent = Path(os.path.realpath(absolute.parent)) / absolute.name
    forms.add(parent)
    return forms


def job_inputs(checkpoint: str | os.PathLike, base_model: str | os.PathLike | None = None) -> list[Path]:
    """What a convert or export reads: the checkpoint (file or dir), its ``.json``, the base-model dir (by
    default the checkpoint's) and the files read from it (``config.json``, the tokenizer's)."""
    from slicebridge.model.binfile import TOKENIZER_FILES

    checkpoint = Path(os.path.expanduser(os.fspath(checkpoint)))
    inputs = [checkpoint]
    if checkpoint.suffix == ".pt":
        inputs.append(checkpoint.with_suffix(".json"))
    base = (
        Path(os.path.expanduser(os.fspath(base_model)))
        if base_model is not None
        else (checkpoint.parent if checkpoint.suffix == ".pt" else checkpoint)
    )
    inputs.append(base)
    inputs += [base / name for name in ("config.json", *TOKENIZER_FILES)]
    return inputs


def output_over_input(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> Path | None:
    """The first input that ``output`` is, or is a directory above; None when writing it spares them all."""
    outputs = _forms(output)
    for item in inputs:
        for form in _forms(item):
            if any(form == out or out in form.parents for out in outputs):
                return Path(item)
    return None


def refuse_output_over_inputs(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """``OutputCollision`` if writing ``output`` would replace one of ``inputs`` (see the module docstring)."""
    hit = output_over_input(output, inputs)
    if hit is not None:
        relation = "is" if any(f in _forms(output) for f in _forms(hit)) else "holds"
        raise OutputCollision(
            f"refusing to start: the output {output} {relation} the input {hit}, which writing "
            "it would destroy; choose another output"
        )
