"""Errors raised when reading a SliceGPT checkpoint.

Every error's message is meant for the person who passed the paths: it says what was found,
what was expected, and what to pass instead. Callers show ``str(error)``; no traceback is
needed to act on it. All derive from ``CheckpointError``, a ``SlicebridgeError``. This module
imports nothing heavy.
"""

from __future__ import annotations

from slicebridge.errors import SlicebridgeError

from .families import SUPPORTED


class CheckpointError(SlicebridgeError):
    """A SliceGPT checkpoint (or its base model config) could not be used as given."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """The checkpoint path does not exist, cannot be read, or the directory holds no checkpoint."""


class AmbiguousCheckpoint(CheckpointError):
    """A directory holds several checkpoints and nothing says which one to use."""


class NotASliceGPTCheckpoint(CheckpointError):
    """The file is readable but is not a state dict written by SliceGPT (run_slicegpt --save-dir)."""


class TruncatedCheckpoint(CheckpointError):
    """The file is a torch.save archive that ends early (an interrupted copy or download)."""


class CorruptCheckpoint(CheckpointError):
    """A record of the torch.save archive fails its CRC-32 check: the file was damaged after it was written."""

    def __init__(self, path: str, record: str) -> None:
        super().__init__(
            f"{path} is damaged: its record {record} does not match the CRC-32 that torch.save recorded for it "
            "(bytes changed on disk or in a copy). Copy the checkpoint again from the machine that ran SliceGPT."
        )
        self.record = record


class ImplausibleCheckpoint(CheckpointError):
    """The checkpoint's tensors claim more bytes than the file holds for them (views that repeat or
    overlap its storages, as only a crafted file has); refused before anything is allocated for them."""


class BaseConfigMissing(CheckpointError):
    """No base model ``config.json`` was found for the checkpoint."""


class BaseConfigMismatch(CheckpointError):
    """The base model config does not describe the model the checkpoint was sliced from."""


class SlicingConfigMismatch(CheckpointError):
    """The SlicingConfig ``.json`` next to the checkpoint disagrees with the tensors."""


class SparsityMismatch(CheckpointError):
    """The sparsity / round_interval given (or in the file name) do not produce the checkpoint's widths."""


class UnsupportedArchitecture(CheckpointError):
    """The base model is not an architecture this package can rebuild."""

    def __init__(self, found: str, config_path: str) -> None:
        super().__init__(
            f"{config_path} describes a {found} model, and SliceGPT slices only the families slicebridge "
            f"rebuilds: {SUPPORTED}; point base_dir at the dense model you sliced."
        )
        self.found = found
