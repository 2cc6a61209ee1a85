"""Reader for SliceGPT checkpoints: find, load and validate what ``run_slicegpt --save-dir`` wrote.

A SliceGPT run for a local model writes, into its save directory:

- ``{model_stem}_{sparsity}.pt``: the state dict after layer-norm fusion, rotation and slicing
  (``torch.save(model.state_dict())``), where ``sparsity`` is the ``--sparsity`` value as Python
  prints it (``0.25``, ``0.2``);
- ``{model_stem}_{sparsity}.json``: the SlicingConfig (per-layer widths);
- the base model's ``config.json`` (and tokenizer files).

``read_checkpoint`` accepts that directory, or a bare ``.pt`` plus the base model directory,
and returns a ``SliceGPTCheckpoint`` describing it. Widths come from the SlicingConfig when
present, else from the tensor shapes; they are checked against the tensors, the base config,
and the sparsity / round_interval (SliceGPT slices to ``int((1 - sparsity) * hidden)`` rounded
down to a multiple of ``round_interval``). Problems raise the ``errors`` module's exceptions,
worded for the user. Needs torch (imported lazily), not slicegpt nor transformers.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import pickle
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slicebridge.dtypes import dtype_name

from .errors import (
    AmbiguousCheckpoint,
    BaseConfigMismatch,
    BaseConfigMissing,
    CheckpointNotFound,
    CorruptCheckpoint,
    ImplausibleCheckpoint,
    NotASliceGPTCheckpoint,
    SlicingConfigMismatch,
    SparsityMismatch,
    TruncatedCheckpoint,
    UnsupportedArchitecture,
)
from .families import FAMILIES, Family, family_of_config, family_of_tensors

if TYPE_CHECKING:
    import torch

    from .configuration_sliced import SlicedConfig
    from .sliced_decoder import SlicedForCausalLM

logger = logging.getLogger(__name__)

# run_slicegpt.py's --round-interval default.
DEFAULT_ROUND_INTERVAL = 8
# Intervals tried, in this order, when explaining a width nobody gave an interval for.
_CANDIDATE_ROUND_INTERVALS = (8, 1, 16, 32, 64, 128, 2, 4)

_CHECKPOINT_NAME = re.compile(r"^(?P<stem>.+)_(?P<sparsity>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\.pt$")
_LAYER_INDEX = re.compile("^(?:" + "|".join(sorted({re.escape(family.layers) for family in FAMILIES})) + r")\.(\d+)\.")
# A zip local file header: signature, then fixed fields up to the name and extra-field lengths.
_LOCAL_HEADER = struct.Struct("<4s22xHH")
_CRC_CHUNK = 64 * 1024 * 1024
# Tensors that may be the very same view as another (a head tied to the token embedding), counted once.
_TIED = {"lm_head.weight": sorted({family.token_embedding for family in FAMILIES})}
# Archives whose records passed the CRC check in this process, by (path, dev, inode, size, mtime).
_VERIFIED_ARCHIVES: set[tuple[str, int, int, int, int]] = set()


# --------------------------------------------------------------------------------------------
# What a checkpoint is
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlicedWidths:
    """Per-layer widths of a sliced model, named as in SliceGPT's SlicingConfig.

    With parallel blocks (Phi-2) ``mlp_input`` equals ``attention_input`` and ``attention_output``
    equals ``mlp_output``, layer by layer (the SlicingConfig leaves those two out).
    """

    embedding: int
    attention_input: tuple[int, ...]
    attention_output: tuple[int, ...]
    mlp_input: tuple[int, ...]
    mlp_output: tuple[int, ...]
    lm_head: int
    parallel_blocks: bool = False
    embedding_count: int = 1  # embedding tables sliced to ``embedding`` (OPT: tokens and positions)

    @classmethod
    def constant(
        cls, num_layers: int, width: int, head: int, parallel_blocks: bool = False, embedding_count: int = 1
    ) -> SlicedWidths:
        """A constant-sparsity run's widths: every stream ``width`` wide, except the head's input
        (and so the last layer's MLP output), which is ``head`` wide."""
        per_layer = (width,) * num_layers
        return cls(
            embedding=width,
            attention_input=per_layer,
            attention_output=per_layer[:-1] + (head,) if parallel_blocks else per_layer,
            mlp_input=per_layer,
            mlp_output=per_layer[:-1] + (head,),
            lm_head=head,
            parallel_blocks=parallel_blocks,
            embedding_count=embedding_count,
        )

    @classmethod
    def of_config(cls, config: Any) -> SlicedWidths:
        """The widths a sliced config (``configuration_sliced.SlicedConfig``) records."""
        return cls(
            embedding=config.embedding_dimension,
            attention_input=tuple(config.attention_input_dimensions),
            attention_output=tuple(config.attention_output_dimensions),
            mlp_input=tuple(config.mlp_input_dimensions),
            mlp_output=tuple(config.mlp_output_dimensions),
            lm_head=config.lm_head_dimension,
            parallel_blocks=bool(config.parallel_blocks),
        )

    @property
    def num_layers(self) -> int:
        return len(self.attention_input)

    def constant_width(self) -> int | None:
        """The single sliced width of a constant-sparsity run (what run_slicegpt does), else None.

        The last layer's output feeds the head and is exempt: it is the head width (with parallel
        blocks the last attention output is that output too).
        """
        attention_output = self.attention_output[:-1] if self.parallel_blocks else self.attention_output
        widths = {self.embedding, *self.attention_input, *attention_output, *self.mlp_input, *self.mlp_output[:-1]}
        if len(widths) == 1 and self.mlp_output[-1] == self.lm_head:
            return widths.pop()
        return None

    def as_slicing_config(self, hidden_size: int, do_slice_head: bool | None = None) -> dict[str, Any]:
        """The SlicingConfig dict (as its ``.json`` holds it, keys in the official order) that these
        widths correspond to; ``do_slice_head`` defaults to whether the head is narrower than hidden."""

        def by_layer(values: tuple[int, ...]) -> dict[str, int]:
            return {str(idx): width for idx, width in enumerate(values)}

        return {
            "hidden_size": hidden_size,
            "layers_num": self.num_layers,
            "do_slice_head": self.lm_head != hidden_size if do_slice_head is None else do_slice_head,
            "parallel_blocks": self.parallel_blocks,
            "embedding_dimensions": {str(idx): self.embedding for idx in range(self.embedding_count)},
            "attention_input_dimensions": by_layer(self.attention_input),
            "attention_output_dimensions": {} if self.parallel_blocks else by_layer(self.attention_output),
            "mlp_input_dimensions": {} if self.parallel_blocks else by_layer(self.mlp_input),
            "mlp_output_dimensions": by_layer(self.mlp_output),
            "head_dimension": self.lm_head,
            "const_dimension": None,
        }


@dataclass(frozen=True)
class SliceGPTCheckpoint:
    """A located and validated SliceGPT checkpoint (paths and facts, no tensors).

    ``round_interval`` is the one the caller gave, else run_slicegpt's default (8) when that
    reproduces the widths, else None. ``sparsity`` is the caller's, else the file name's.
    """

    family: Family = field(compare=False)
    checkpoint_path: Path
    base_dir: Path
    slicing_config_path: Path | None
    model_stem: str
    sparsity: float | None
    round_interval: int | None
    widths: SlicedWidths
    base_config: dict[str, Any] = field(repr=False, compare=False)
    slicing_config: dict[str, Any] | None = field(repr=False, compare=False)
    dtype: str
    parameter_count: int
    shortcut_parameter_count: int

    @property
    def hidden_size(self) -> int:
        return int(self.base_config["hidden_size"])

    @property
    def num_layers(self) -> int:
        return self.widths.num_layers

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (paths as strings, widths as lists)."""
        described = asdict(self)
        described["family"] = self.family.key
        for key in ("checkpoint_path", "base_dir", "slicing_config_path"):
            described[key] = str(described[key]) if described[key] is not None else None
        described["widths"] = {
            name: list(value) if isinstance(value, tuple) else value for name, value in described["widths"].items()
        }
        return described

    def dense_parameter_count(self) -> int:
        """Parameters of the dense base model (from its config)."""
        return self.family.dense_parameters(self.base_config)

    def params(self) -> dict[str, int]:
        """The parameter counts: ``dense`` (the base model's), ``sliced`` and ``shortcut_q``."""
        return {
            "dense": self.dense_parameter_count(),
            "sliced": self.parameter_count,
            "shortcut_q": self.shortcut_parameter_count,
        }

    def actual_ratio(self) -> float:
        """Fraction of the dense parameters removed (see ``facts.actual_ratio``)."""
        from .facts import actual_ratio

        return actual_ratio(self.params())

    def load_tensors(self) -> dict[str, torch.Tensor]:
        """The state dict, memory-mapped (cheap: tensors are read when touched)."""
        return _unwrap_state_dict(load_checkpoint_file(self.checkpoint_path), self.checkpoint_path)

    def sliced_config(self) -> SlicedConfig:
        """The family's sliced config for this checkpoint (imports transformers). A base config whose
        layout the family's model cannot rebuild (as OPT-350m's) raises ``BaseConfigMismatch``."""
        from . import portable

        try:
            return portable.sliced_config(
                self.family,
                self.base_config,
                self.widths.as_slicing_config(self.hidden_size),
                sparsity=self.sparsity,
                round_interval=self.round_interval,
            )
        except ValueError as exc:
            raise BaseConfigMismatch(f"{self.base_dir / 'config.json'}: {exc}") from None

    def build_model(self, dtype: torch.dtype | None = None) -> SlicedForCausalLM:
        """The portable model with this checkpoint's weights (imports transformers)."""
        from . import portable

        return portable.build_model(self.load_tensors(), self.sliced_config(), dtype=dtype)


# --------------------------------------------------------------------------------------------
# SliceGPT's width arithmetic
# --------------------------------------------------------------------------------------------


def sliced_width(hidden_size: int, sparsity: float, round_interval: int) -> int:
    """The width run_slicegpt slices to: ``int((1 - sparsity) * hidden)`` rounded down to ``round_interval``."""
    width = int((1 - sparsity) * hidden_size)
    return width - width % round_interval


def sparsity_range(width: int, hidden_size: int, round_interval: int) -> tuple[float, float]:
    """The half-open range (low, high] of sparsities that slice ``hidden_size`` to ``width``."""
    return 1 - (width + round_interval) / hidden_size, 1 - width / hidden_size


def _roundest_sparsity(width: int, hidden_size: int, round_interval: int) -> float | None:
    """The sparsity with the fewest decimals (up to 3) that gives ``width``, nearest the exact ratio."""
    if width % round_interval:
        return None
    exact = 1 - width / hidden_size
    for decimals in (1, 2, 3):
        scale = 10**decimals
        matches = [k / scale for k in range(scale) if sliced_width(hidden_size, k / scale, round_interval) == width]
        if matches:
            return round(min(matches, key=lambda value: abs(value - exact)), decimals)
    return None


def explain_width(width: int, hidden_size: int, round_interval: int | None = None) -> str:
    """Say in words which sparsity / round_interval give ``width`` from ``hidden_size``."""
    intervals = (round_interval,) if round_interval else _CANDIDATE_ROUND_INTERVALS
    for interval in intervals:
        sparsity = _roundest_sparsity(width, hidden_size, interval)
        if sparsity is not None:
            low, high = sparsity_range(width, hidden_size, interval)
            return (
                f"that is sparsity {sparsity:g} with round_interval {interval} (hidden {hidden_size}; "
                f"any sparsity in ({max(low, 0):.4g}, {high:.4g}] gives {width} with that interval)"
            )
    if round_interval and width % round_interval:
        divisors = [r for r in _CANDIDATE_ROUND_INTERVALS if width % r == 0]
        return f"{width} is not a multiple of round_interval {round_interval} (it is of {max(divisors)})"
    return f"that is {1 - width / hidden_size:.4g} of hidden {hidden_size} sliced away"


# --------------------------------------------------------------------------------------------
# Locating the files
# --------------------------------------------------------------------------------------------


def parse_checkpoint_name(path: Path) -> tuple[str, float | None]:
    """``Meta-Llama-3-8B_0.25.pt`` -> ("Meta-Llama-3-8B", 0.25); a name without ``_{sparsity}`` gives (stem, None)."""
    match = _CHECKPOINT_NAME.match(path.name)
    if not match:
        return path.stem, None
    return match["stem"], float(match["sparsity"])


def _same_sparsity(first: float, second: float) -> bool:
    return math.isclose(first, second, rel_tol=0, abs_tol=1e-9)


def named_for(path: Path, sparsity: float) -> bool:
    """Whether ``path`` is named ``{model}_{sparsity}.pt`` for this sparsity."""
    named = parse_checkpoint_name(path)[1]
    return named is not None and _same_sparsity(named, sparsity)


def choose_checkpoint_in_dir(directory: Path, sparsity: float | None) -> Path:
    """The checkpoint of a run_slicegpt save dir: its only ``.pt``, or the one named for ``sparsity``
    (as the official ``--sliced-model-path DIR --sparsity S`` picks it)."""
    candidates = sorted(p for p in directory.glob("*.pt") if p.is_file())
    if not candidates:
        raise CheckpointNotFound(
            f"{directory} holds no .pt file; pass the directory given to run_slicegpt --save-dir "
            "(it holds {model}_{sparsity}.pt) or the .pt file itself"
        )
    if sparsity is not None:
        matching = [p for p in candidates if named_for(p, sparsity)]
        if len(matching) == 1:
            return matching[0]
        found = ", ".join(p.name for p in candidates)
        if not matching:
            raise SparsityMismatch(
                f"{directory} has no checkpoint for sparsity {sparsity:g}; it holds: {found}. "
                "Pass the sparsity that run_slicegpt was given (it is in the file name)."
            )
        candidates = matching
    if len(candidates) > 1:
        raise AmbiguousCheckpoint(
            f"{directory} holds several checkpoints ({', '.join(p.name for p in candidates)}); "
            "pass the .pt file itself, or the sparsity to pick one"
        )
    return candidates[0]


def _read_base_config(base_dir: Path, checkpoint_path: Path) -> tuple[dict[str, Any], Family]:
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise BaseConfigMissing(
            f"no config.json in {base_dir}; pass the base model directory (the --model-path given to "
            f"run_slicegpt, holding the dense model's config.json) for {checkpoint_path.name}"
        )
    try:
        base_config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BaseConfigMissing(
            f"{config_path} cannot be read as JSON ({error}); point base_dir at the dense model"
        ) from None
    if not isinstance(base_config, dict):
        raise BaseConfigMissing(f"{config_path} is not a model config (a JSON object was expected)")
    family = family_of_base_config(base_config, config_path)
    missing = [key for key in family.required_config if key not in base_config]
    if missing:
        raise BaseConfigMismatch(
            f"{config_path} lacks {', '.join(missing)}; it is not a complete {family.title} config"
        )
    return base_config, family


def family_of_base_config(base_config: Mapping[str, Any], config_path: Path | str) -> Family:
    """The family a dense ``config.json`` describes; ``UnsupportedArchitecture`` for any other model."""
    model_type = base_config.get("model_type")
    architectures = base_config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise BaseConfigMismatch(f"{config_path}: 'architectures' must be a list of class names, not {architectures!r}")
    described = " / ".join(architectures) or "model"
    described += f" (model_type {model_type!r})" if model_type is not None else ""
    if model_type is None and not architectures:
        raise UnsupportedArchitecture("model of unstated type (no model_type nor architectures)", str(config_path))
    family = family_of_config(base_config)
    if family is None or (architectures and not set(architectures) & set(family.architectures)):
        raise UnsupportedArchitecture(described, str(config_path))
    return family


def _read_slicing_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():  # is_file follows links and is False for a FIFO: never opened
        return None
    try:
        slicing_config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SlicingConfigMismatch(
            f"{path} is not a readable SlicingConfig ({error}); remove it to infer widths from the tensors"
        ) from None
    if not isinstance(slicing_config, dict) or "attention_input_dimensions" not in slicing_config:
        logger.info("%s is not a SlicingConfig; widths will be read from the tensors", path)
        return None
    return slicing_config


# --------------------------------------------------------------------------------------------
# Loading the tensors
# --------------------------------------------------------------------------------------------


def load_checkpoint_file(path: Path) -> Any:
    """``torch.load`` the file safely (weights_only, memory-mapped when possible), mapping failures to errors."""
    import torch

    try:
        size = path.stat().st_size
        if path.exists() and not path.is_dir() and not path.is_file():  # a FIFO or device: opening it blocks
            raise NotASliceGPTCheckpoint(
                f"{path} is not a regular file (a FIFO, socket or device); refusing to read it"
            )
        with path.open("rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError:
        raise CheckpointNotFound(f"{path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointNotFound(f"{path} is a directory, not a .pt file") from None
    except OSError as error:
        raise CheckpointNotFound(f"{path} cannot be read ({error.strerror or error})") from None
    if size == 0:
        raise TruncatedCheckpoint(f"{path} is empty (0 bytes); copy or download it again")

    is_zip_archive = magic == b"PK\x03\x04"  # torch.save's format since torch 1.6
    is_legacy_pickle = magic[:1] == b"\x80"  # older torch.save: a bare pickle stream
    if not (is_zip_archive or is_legacy_pickle):
        raise NotASliceGPTCheckpoint(
            f"{path} is not a file written by torch.save (it starts with {magic!r}); pass the .pt that "
            "run_slicegpt --save-dir writes"
        )
    if is_zip_archive and not zipfile.is_zipfile(path):
        raise TruncatedCheckpoint(
            f"{path} is cut short ({size:,} bytes): it is a torch.save archive whose index (at the end of "
            "the file) is missing, as after an interrupted copy or download. Copy it again from the machine "
            "that ran SliceGPT."
        )
    if is_zip_archive:
        verify_archive_crcs(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip_archive)
    except pickle.UnpicklingError:
        raise NotASliceGPTCheckpoint(
            f"{path} holds pickled Python objects (for example a whole model saved with torch.save(model) or "
            "dill), not a plain state dict, and is not unpickled here since that would run code from the file. "
            "Use the {model}_{sparsity}.pt that run_slicegpt --save-dir writes."
        ) from None
    except (RuntimeError, EOFError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise TruncatedCheckpoint(f"{path} is a damaged torch.save file ({reason}); copy it again") from None
    return loaded


def verify_archive_crcs(path: Path) -> None:
    """Check every record of a torch.save zip archive against the CRC-32 its index records.

    torch's reader does not, so without this a few flipped bytes load as silently wrong weights.
    One pass over the file's pages (memory-mapped, no copy; records summed on several threads, as
    zlib releases the GIL); skipped for an archive that already passed in this process and has not
    changed since. Raises ``CorruptCheckpoint`` naming the (first) damaged record.
    """
    stat = path.stat()
    identity = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if identity in _VERIFIED_ARCHIVES:
        return
    try:
        with zipfile.ZipFile(path) as archive, path.open("rb") as handle:
            records = archive.infolist()
            with (
                mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view,
                ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="slicebridge-crc") as pool,
            ):
                intact = list(pool.map(lambda record: _record_intact(archive, view, record), records))
        damaged = next((record for record, ok in zip(records, intact, strict=True) if not ok), None)
        if damaged is not None:
            raise CorruptCheckpoint(str(path), damaged.filename)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError) as error:
        raise TruncatedCheckpoint(f"{path} is a damaged torch.save archive ({error}); copy it again") from None
    _VERIFIED_ARCHIVES.add(identity)


def _record_intact(archive: zipfile.ZipFile, view: mmap.mmap, record: zipfile.ZipInfo) -> bool:
    """Whether a record's bytes match its CRC-32: summed in place when stored (as torch.save stores)."""
    if record.compress_type != zipfile.ZIP_STORED:
        try:
            with archive.open(record) as stream:  # zipfile checks the CRC at the end
                while stream.read(_CRC_CHUNK):
                    pass
        except (zipfile.BadZipFile, EOFError, zlib.error):
            return False
        return True
    header = view[record.header_offset : record.header_offset + _LOCAL_HEADER.size]
    if len(header) != _LOCAL_HEADER.size or _LOCAL_HEADER.unpack(header)[0] != b"PK\x03\x04":
        return False  # the index points at no record
    _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    start = record.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    end = start + record.file_size
    if end > len(view):
        return False
    crc = 0
    with memoryview(view) as data:
        for offset in range(start, end, _CRC_CHUNK):
            crc = zlib.crc32(data[offset : min(offset + _CRC_CHUNK, end)], crc)
    return crc == record.CRC


def tensor_bytes_problem(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """A sentence saying how ``tensors`` claim more bytes than their storages hold, or None.

    Storages are what a file really holds (torch checks each against its record). A view may
    claim no more than the storage under it, and all views together no more than all storages
    (only a tied head may be the very same view as the embedding), so that compacting, casting
    or moving them never costs more than the file's own size, as with safetensors.
    """
    held: dict[int, int] = {}
    claimed = 0
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage()
        size = tensor.numel() * tensor.element_size()
        room = storage.nbytes() - tensor.storage_offset() * tensor.element_size()
        if size > room:
            described = f"{list(tensor.shape)} {dtype_name(tensor.dtype)}"
            return f"tensor {name} claims {_bytes(size)} ({described}) but the file holds {_bytes(max(room, 0))} for it"
        held[storage.data_ptr()] = storage.nbytes()
        if not any(_same_view(tensor, tensors.get(source)) for source in _TIED.get(name, ())):
            claimed += size
    if claimed > sum(held.values()):
        return (
            f"its tensors claim {_bytes(claimed)} in all but the file holds {_bytes(sum(held.values()))} "
            "of tensor data (the tensors are overlapping views of the same bytes)"
        )
    return None


def _same_view(tensor: torch.Tensor, other: torch.Tensor | None) -> bool:
    return other is not None and (
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tensor.shape,
        tensor.stride(),
        tensor.dtype,
    ) == (other.untyped_storage().data_ptr(), other.storage_offset(), other.shape, other.stride(), other.dtype)


def _bytes(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _unwrap_state_dict(loaded: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    if isinstance(loaded, Mapping):
        for wrapper_key in ("state_dict", "model"):
            inner = loaded.get(wrapper_key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                loaded = inner
                break
    if not isinstance(loaded, Mapping) or not loaded or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise NotASliceGPTCheckpoint(
            f"{path} does not hold a state dict (a mapping of names to tensors) but {type(loaded).__name__}; "
            "pass the .pt that run_slicegpt --save-dir writes"
        )
    problem = tensor_bytes_problem(loaded)
    if problem:
        raise ImplausibleCheckpoint(f"{path} was refused before loading: {problem}.")
    return dict(loaded)


def layer_indices(names: Iterable[str]) -> set[int]:
    """The N of every ``model.layers.N.*`` (or ``model.decoder.layers.N.*``) name."""
    return {int(match[1]) for name in names if (match := _LAYER_INDEX.match(name))}


def _layer_count(tensors: Mapping[str, Any]) -> int:
    indices = layer_indices(tensors)
    return max(indices) + 1 if indices else 0


def check_is_sliced(tensors: Mapping[str, torch.Tensor], family: Family, path: Path) -> int:
    """Check the keys look like SliceGPT's output for ``family``; return the layer count."""
    num_layers = _layer_count(tensors)
    has_shortcuts = any(key.endswith("_shortcut_Q") for key in tensors)
    first_layer = family.layer(0)
    if family.token_embedding not in tensors or num_layers == 0 or not any(k.startswith(first_layer) for k in tensors):
        sample = ", ".join(list(tensors)[:3])
        seen = family_of_tensors(tensors)
        looks_like = f"; its tensors are laid out as a sliced {seen.title}'s" if seen is not None else ""
        raise NotASliceGPTCheckpoint(
            f"{path} is a state dict but not of a sliced {family.title} as the base config.json says (no "
            f"{family.token_embedding} / {family.layers}.N.*{looks_like}; its first keys are {sample}); pass the .pt "
            f"that run_slicegpt --save-dir writes for that model, with its own base model directory"
        )
    if not has_shortcuts:
        dense_hint = (
            f" It still has norm weights: it is a plain, unsliced {family.title}."
            if any(key.endswith(("layernorm.weight", "layer_norm.weight")) for key in tensors)
            else ""
        )
        raise NotASliceGPTCheckpoint(
            f"{path} is a {family.title} state dict without SliceGPT's shortcut matrices "
            f"({family.layers}.N.{' / '.join(family.shortcuts)}).{dense_hint} Pass the sliced model's .pt."
        )
    missing = [
        family.layer(idx) + name
        for idx in range(num_layers)
        for name in family.layer_weights()
        if family.layer(idx) + name not in tensors
    ]
    if "lm_head.weight" not in tensors:
        missing.append("lm_head.weight")
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise NotASliceGPTCheckpoint(f"{path} is missing tensors of a sliced {family.title}: {shown}")
    return num_layers


def widths_from_tensors(tensors: Mapping[str, torch.Tensor], num_layers: int, family: Family) -> SlicedWidths:
    """Read the per-layer widths off the weight shapes (Linear weights are [out, in])."""

    def columns(name: str) -> tuple[int, ...]:
        return tuple(tensors[family.layer(i) + f"{name}.weight"].shape[1] for i in range(num_layers))

    def rows(name: str) -> tuple[int, ...]:
        return tuple(tensors[family.layer(i) + f"{name}.weight"].shape[0] for i in range(num_layers))

    return SlicedWidths(
        embedding=tensors[family.token_embedding].shape[1],
        attention_input=columns(family.attention_inputs[0]),
        attention_output=rows(family.attention_output),
        mlp_input=columns(family.mlp_inputs[0]),
        mlp_output=rows(family.mlp_output),
        lm_head=tensors["lm_head.weight"].shape[1],
        parallel_blocks=family.parallel_blocks,
        embedding_count=len(family.embeddings),
    )


def widths_from_slicing_config(
    slicing_config: Mapping[str, Any], num_layers: int, hidden_size: int, parallel_blocks: bool = False
) -> SlicedWidths:
    """Read the widths a SlicingConfig dict records (string or int layer keys); with parallel blocks
    the attention output and MLP input widths it leaves out are the layer's output and input."""

    def per_layer(key: str) -> tuple[int, ...]:
        if parallel_blocks and not slicing_config.get(key):
            key = {"attention_output_dimensions": "mlp_output_dimensions"}.get(key, key)
            key = {"mlp_input_dimensions": "attention_input_dimensions"}.get(key, key)
        values = slicing_config.get(key) or {}
        by_index = {int(k): int(v) for k, v in values.items()}
        const = slicing_config.get("const_dimension")
        return tuple(by_index.get(idx, const if const is not None else -1) for idx in range(num_layers))

    embedding_dims = slicing_config.get("embedding_dimensions") or {}
    embedding = next(iter(embedding_dims.values()), slicing_config.get("const_dimension"))
    head = slicing_config.get("head_dimension")
    return SlicedWidths(
        embedding=int(embedding) if embedding is not None else -1,
        attention_input=per_layer("attention_input_dimensions"),
        attention_output=per_layer("attention_output_dimensions"),
        mlp_input=per_layer("mlp_input_dimensions"),
        mlp_output=per_layer("mlp_output_dimensions"),
        lm_head=int(head) if head is not None else hidden_size,
        parallel_blocks=parallel_blocks,
        embedding_count=max(len(embedding_dims), 1),
    )


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_against_base(
    tensors: Mapping[str, torch.Tensor],
    num_layers: int,
    widths: SlicedWidths,
    base: Mapping[str, Any],
    family: Family,
    path: Path,
) -> None:
    hidden = int(base["hidden_size"])
    problems: list[str] = []
    if num_layers != int(base["num_hidden_layers"]):
        problems.append(f"the checkpoint has {num_layers} layers, the base config {base['num_hidden_layers']}")
    vocab_rows = tensors[family.token_embedding].shape[0]
    if vocab_rows != int(base["vocab_size"]):
        problems.append(f"the embedding has {vocab_rows} rows, the base config's vocab_size is {base['vocab_size']}")
    layer0 = family.layer(0)
    row_tensors = family.row_tensors()
    for what, (rows, meaning) in family.base_rows(base).items():
        name = layer0 + row_tensors[what]
        if num_layers and tensors[name].shape[0] != rows:
            problems.append(f"{name} has {tensors[name].shape[0]} rows, the base config says {rows} ({meaning})")
    too_wide = [
        w for w in (widths.embedding, *widths.attention_input, *widths.mlp_output, widths.lm_head) if w > hidden
    ]
    if too_wide:
        problems.append(f"widths up to {max(too_wide)} exceed the base hidden_size {hidden}")
    if problems:
        described_by = base.get("_name_or_path") or "the given config.json"
        raise BaseConfigMismatch(
            f"{path.name} was not sliced from the model that {described_by} describes: "
            + "; ".join(problems)
            + ". Pass the base model directory that run_slicegpt was given."
        )


def _check_sizes(base: Mapping[str, Any], family: Family, path: Path) -> None:
    """The sizes the family needs from the base config are positive whole numbers (and a head_dim, if
    given, too), so that no count derived from them divides by zero or goes negative."""
    optional = [key for key in ("head_dim", "num_key_value_heads") if base.get(key) is not None]
    sizes = [*family.required_config, *optional]
    bad = [f"{key} {base[key]!r}" for key in sizes if type(base[key]) is not int or base[key] < 1]
    if bad:
        raise BaseConfigMismatch(
            f"the base config for {path.name} has {', '.join(bad)}; each must be a positive whole number"
        )


def _check_shortcuts(tensors: Mapping[str, torch.Tensor], widths: SlicedWidths, family: Family, path: Path) -> None:
    problems = []
    for idx in range(widths.num_layers):
        if family.parallel_blocks:  # one shortcut around attention and MLP together
            expected_shapes = {"attn_shortcut_Q": (widths.attention_input[idx], widths.mlp_output[idx])}
        else:
            expected_shapes = {
                "attn_shortcut_Q": (widths.attention_input[idx], widths.attention_output[idx]),
                "mlp_shortcut_Q": (widths.mlp_input[idx], widths.mlp_output[idx]),
            }
        for name, expected in expected_shapes.items():
            actual = tuple(tensors[family.layer(idx) + name].shape)
            if actual != expected:
                problems.append(
                    f"{family.layer(idx)}{name} is {list(actual)}, the layer's projections need {list(expected)}"
                )
    if problems:
        raise NotASliceGPTCheckpoint(f"{path} has inconsistent shapes: " + "; ".join(problems))


def _compare_widths(recorded: SlicedWidths, actual: SlicedWidths, json_path: Path) -> None:
    differences = []
    for name in ("embedding", "lm_head"):
        if getattr(recorded, name) != getattr(actual, name):
            differences.append(f"{name} {getattr(recorded, name)} vs {getattr(actual, name)}")
    for name in ("attention_input", "attention_output", "mlp_input", "mlp_output"):
        for idx, (said, seen) in enumerate(zip(getattr(recorded, name), getattr(actual, name), strict=True)):
            if said != seen:
                differences.append(f"{name}_dimensions[{idx}] {said} vs {seen}")
    if differences:
        shown = "; ".join(differences[:5]) + (f" and {len(differences) - 5} more" if len(differences) > 5 else "")
        raise SlicingConfigMismatch(
            f"{json_path.name} does not describe the tensors next to it (json vs tensors: {shown}); it belongs to "
            "another run. Remove or replace it; the widths can be read from the tensors alone."
        )


def _check_sparsity(
    widths: SlicedWidths,
    vocab_rows: int,
    hidden: int,
    sparsity: float | None,
    round_interval: int | None,
    name_sparsity: float | None,
    path: Path,
) -> int | None:
    """Check the sparsity / round_interval against the widths; return the round_interval to record."""
    width = widths.constant_width()
    embedding_shape = f"the checkpoint's embedding is [{vocab_rows}, {widths.embedding}]"
    if sparsity is not None and name_sparsity is not None and not _same_sparsity(sparsity, name_sparsity):
        intervals = (round_interval,) if round_interval else _CANDIDATE_ROUND_INTERVALS
        name_fits = next((r for r in intervals if width and sliced_width(hidden, name_sparsity, r) == width), None)
        evidence = (
            f"; {embedding_shape}, which is what sparsity {name_sparsity:g} gives "
            f"(round_interval {name_fits}, hidden {hidden})"
            if name_fits
            else ""
        )
        raise SparsityMismatch(
            f"{path.name} is named for sparsity {name_sparsity:g}, not the {sparsity:g} you passed{evidence}. "
            f"Pass {name_sparsity:g}, or the checkpoint made with {sparsity:g}."
        )
    effective = sparsity if sparsity is not None else name_sparsity
    if width is None:
        logger.info("%s has per-layer widths (not a constant-sparsity run); sparsity not checked", path.name)
        return round_interval
    if effective is None:
        return round_interval
    source = "you passed" if sparsity is not None else "its file name says"
    if round_interval is not None:
        if sliced_width(hidden, effective, round_interval) == width:
            return round_interval
        fitting = [r for r in _CANDIDATE_ROUND_INTERVALS if sliced_width(hidden, effective, r) == width]
        if fitting:
            raise SparsityMismatch(
                f"{embedding_shape}: sparsity {effective:g} gives that with round_interval {fitting[0]}, not the "
                f"{round_interval} you passed (hidden {hidden}: int((1 - {effective:g}) * {hidden}) = "
                f"{int((1 - effective) * hidden)}, rounded down to a multiple of {round_interval} is "
                f"{sliced_width(hidden, effective, round_interval)})"
            )
        explained = explain_width(width, hidden, round_interval if width % round_interval == 0 else None)
        raise SparsityMismatch(
            f"{embedding_shape}: {explained}, not the {effective:g} {source} "
            f"(which gives {sliced_width(hidden, effective, round_interval)})"
        )
    fitting = [r for r in _CANDIDATE_ROUND_INTERVALS if sliced_width(hidden, effective, r) == width]
    if not fitting:
        raise SparsityMismatch(
            f"{embedding_shape}: {explain_width(width, hidden)}, not the {effective:g} {source} "
            f"(which gives {sliced_width(hidden, effective, DEFAULT_ROUND_INTERVAL)} "
            f"with round_interval {DEFAULT_ROUND_INTERVAL})"
        )
    usual = [r for r in (DEFAULT_ROUND_INTERVAL, 1) if r in fitting]
    if usual:
        return usual[0]
    _refuse_unusual_interval(width, hidden, effective, fitting, path, f"{path.name}: {embedding_shape}", source)
    return fitting[0] if len(fitting) == 1 else None


def _refuse_unusual_interval(
    width: int, hidden: int, sparsity: float, fitting: list[int], path: Path, described: str, source: str
) -> None:
    """A sparsity that gives ``width`` only with an unusual round_interval, while another sparsity gives it
    with run_slicegpt's default or with none: the file was likely renamed, so say so rather than guess."""
    for interval in (DEFAULT_ROUND_INTERVAL, 1):
        other = _roundest_sparsity(width, hidden, interval)
        if other is not None and not _same_sparsity(other, sparsity):
            stem = parse_checkpoint_name(path)[0]
            raise SparsityMismatch(
                f"{described}, which is what sparsity {other:g} gives with round_interval {interval} "
                f"(hidden {hidden}); the {sparsity:g} {source} gives it only with round_interval "
                f"{' or '.join(map(str, fitting))}. If the file was renamed, name it (and its .json) "
                f"{stem}_{other:g}.pt again; if the run used --round-interval {fitting[0]}, pass "
                f"round_interval={fitting[0]}."
            )


def read_state_dict_widths(
    tensors: Mapping[str, torch.Tensor], base_config: Mapping[str, Any], family: Family, source: Path
) -> SlicedWidths:
    """The widths of a sliced ``family`` state dict, checked like ``read_checkpoint`` checks a file's."""
    _check_sizes(base_config, family, source)
    num_layers = check_is_sliced(tensors, family, source)
    widths = widths_from_tensors(tensors, num_layers, family)
    _check_shortcuts(tensors, widths, family, source)
    _check_against_base(tensors, num_layers, widths, base_config, family, source)
    return widths


def sliced_config_from_tensors(
    tensors: Mapping[str, torch.Tensor],
    base_config: Mapping[str, Any],
    family: Family,
    *,
    source: Path,
    sparsity: float | None = None,
    round_interval: int | None = None,
) -> SlicedConfig:
    """The sliced config of a state dict that did not come from a run_slicegpt directory (e.g. the
    model object inside a seed ``.bin``): widths are read off the tensors and checked against
    ``base_config`` like ``read_checkpoint`` does for files."""
    from . import portable

    widths = read_state_dict_widths(tensors, base_config, family, source)
    return portable.sliced_config(
        family,
        dict(base_config),
        widths.as_slicing_config(int(base_config["hidden_size"])),
        sparsity=sparsity,
        round_interval=round_interval,
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    sparsity: float | None = None,
    round_interval: int | None = None,
) -> SliceGPTCheckpoint:
    """Locate, load (memory-mapped) and validate a SliceGPT checkpoint.

    ``path`` is a run_slicegpt save directory or a ``.pt`` file. ``base_dir`` holds the base
    model's ``config.json`` (default: the checkpoint's directory, where run_slicegpt copies it
    for local models). ``sparsity`` picks the checkpoint in a directory and, like
    ``round_interval``, is checked against the widths. Raises a ``CheckpointError`` subclass.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFound(f"{path} does not exist; pass the run_slicegpt --save-dir directory or the .pt file")
    checkpoint_path = choose_checkpoint_in_dir(path, sparsity) if path.is_dir() else path
    model_stem, name_sparsity = parse_checkpoint_name(checkpoint_path)
    resolved_base_dir = Path(base_dir).expanduser() if base_dir is not None else checkpoint_path.parent
    if base_dir is not None and not resolved_base_dir.is_dir():
        raise BaseConfigMissing(f"the base model directory {resolved_base_dir} does not exist")
    base_config, family = _read_base_config(resolved_base_dir, checkpoint_path)
    hidden = int(base_config["hidden_size"])

    tensors = _unwrap_state_dict(load_checkpoint_file(checkpoint_path), checkpoint_path)
    widths = read_state_dict_widths(tensors, base_config, family, checkpoint_path)
    num_layers = widths.num_layers

    slicing_config_path = checkpoint_path.with_suffix(".json")
    slicing_config = _read_slicing_config(slicing_config_path)
    if slicing_config is not None:
        recorded_hidden = slicing_config.get("hidden_size")
        if recorded_hidden not in (None, 0, hidden):
            raise SlicingConfigMismatch(
                f"{slicing_config_path.name} was made for hidden_size {recorded_hidden}, the base config has {hidden}"
            )
        recorded = widths_from_slicing_config(slicing_config, num_layers, hidden, family.parallel_blocks)
        _compare_widths(recorded, widths, slicing_config_path)

    embedding = tensors[family.token_embedding]
    recorded_interval = _check_sparsity(
        widths, embedding.shape[0], hidden, sparsity, round_interval, name_sparsity, checkpoint_path
    )
    shortcut_count = sum(t.numel() for k, t in tensors.items() if k.endswith("_shortcut_Q"))
    return SliceGPTCheckpoint(
        family=family,
        checkpoint_path=checkpoint_path,
        base_dir=resolved_base_dir,
        slicing_config_path=slicing_config_path if slicing_config is not None else None,
        model_stem=model_stem,
        sparsity=sparsity if sparsity is not None else name_sparsity,
        round_interval=recorded_interval,
        widths=widths,
        base_config=base_config,
        slicing_config=slicing_config,
        dtype=dtype_name(embedding.dtype),
        parameter_count=sum(t.numel() for t in tensors.values()),
        shortcut_parameter_count=shortcut_count,
    )
