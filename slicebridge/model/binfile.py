"""The ``.bin`` format: the seed's dict, made portable and safe to load.

A ``.bin`` is ``torch.save`` of the dict the seed's evaluation code expects::

    {"model": Sliced<Family>ForCausalLM, "tokenizer": PreTrainedTokenizerFast,
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
references anything else is refused before any of it runs. ``import slicebridge``
allows the same two functions in that unpickler process-wide (once torch is imported:
:func:`allow_rebuild_functions`), so a plain ``torch.load(p)`` (``weights_only=True``,
torch's default since 2.6) loads a ``.bin`` just as safely.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from slicebridge.errors import SlicebridgeError
from slicebridge.model.atomic import WRITEBACK_BYTES, StreamFile, atomic_file
from slicebridge.version import __version__

log = logging.getLogger(__name__)

FORMAT = "slicebridge.bin"
FORMAT_VERSION = 1
NOTE = (
    "Portable SliceGPT model: rebuilt from tensors and config by slicebridge when loaded; "
    "needs torch and transformers, not slicegpt"
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


class BinFileError(SlicebridgeError):
    """A ``.bin`` cannot be loaded; the message says why and what to do."""


class ImplausibleBinFile(BinFileError):
    """A ``.bin``'s recipes claim more than its bytes hold, or do not fit together; refused before
    anything is built, allocated or written for them."""


class UnsafeBinFile(BinFileError):
    """A ``.bin`` references code outside the allowlist; it was not unpickled."""

    def __init__(self, path: Path, global_name: str):
        self.global_name = global_name
        hint = ""
        if global_name.startswith(("slicegpt", "dill")) or "LlamaSdpaAttention" in global_name:
            hint = (
                " It looks like a .bin made the seed's way (a dill pickle of the slicegpt model object): "
                "run `slicebridge upgrade` on it in the slicegpt env to turn it into a portable one "
                "(with --trust-pickle, if you trust the file: reading it runs code from it)."
            )
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
    """Build the portable model in the loading env from a config dict and its tensors.

    The recipe is checked first (``_check_model_recipe``), so that a crafted file is refused
    before anything is allocated for it; a config the tensors do not fit is refused too.
    """
    from slicebridge.model import portable

    _check_model_recipe(config, state_dict)
    try:
        return portable.build_model(state_dict, portable.config_from_dict(config)).eval()
    except (ValueError, TypeError, KeyError, ArithmeticError) as exc:
        raise ImplausibleBinFile(f"the .bin's model does not fit its own config: {exc}") from None


def _check_model_recipe(config: Any, state_dict: Any) -> None:
    """Refuse a model recipe that claims more than the file's bytes describe.

    Views may claim no more bytes than their storages hold (a stride-0 view claims gigabytes
    from a few bytes, and building would copy it out), and the config may claim no more layers
    than the file holds tensors for (each configured layer costs time and memory to build).
    Every other size in the config is then checked against the tensors at no cost, on the meta device.
    """
    import torch

    from slicebridge.model.checkpoint import layer_indices, tensor_bytes_problem

    if (
        not isinstance(config, dict)
        or not isinstance(state_dict, dict)
        or not all(isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in state_dict.items())
    ):
        raise ImplausibleBinFile("the .bin's model recipe is not a config dict and a dict of named tensors")
    problem = tensor_bytes_problem(state_dict)
    if problem:
        raise ImplausibleBinFile(f"the .bin was refused before building its model: {problem}")
    layers = layer_indices(state_dict)
    claimed = config.get("num_hidden_layers")
    if type(claimed) is not int or claimed != len(layers) or (layers and max(layers) != claimed - 1):
        raise ImplausibleBinFile(
            f"the .bin's config says num_hidden_layers={claimed!r} but the file holds "
            f"tensors for {len(layers)} layers; it was refused before building its model"
        )


def rebuild_tokenizer(files: dict):
    """Build the tokenizer in the loading env from its saved files (None if there were none)."""
    _check_tokenizer_files(files)
    if not files:
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="slicebridge-tok-") as tmp:
        for name, data in files.items():
            if os.sep in name or name.startswith("."):
                raise BinFileError(f"refusing a tokenizer file named {name!r}")
            Path(tmp, name).write_bytes(data)
        try:  # never code shipped with the files: transformers would ask whether to run it
            return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False)
        except ValueError as exc:
            raise BinFileError(
                f"the .bin's tokenizer does not load without running code from the file, which "
                f"slicebridge never does: {str(exc).splitlines()[0]}"
            ) from None


def _check_tokenizer_files(files: Any) -> None:
    """Refuse tokenizer files that a ``.bin`` written by slicebridge never holds, before writing any:
    names outside ``TOKENIZER_FILES``, or one blob stored once and named several times (a 4 MB blob
    under 500 names would write 2 GB to $TMPDIR)."""
    if not isinstance(files, dict) or not all(isinstance(n, str) and isinstance(d, bytes) for n, d in files.items()):
        raise ImplausibleBinFile("the .bin's tokenizer recipe is not a dict of file names and bytes")
    unknown = sorted(set(files) - set(TOKENIZER_FILES))
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:3]) + (
            f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        )
        raise ImplausibleBinFile(
            f"the .bin's tokenizer holds files no tokenizer is saved as ({shown}); it was refused before writing any"
        )
    blobs = [data for data in files.values() if len(data) > 1]  # b"" and 1-byte bytes are shared singletons
    if len({id(data) for data in blobs}) < len(blobs):
        raise ImplausibleBinFile(
            "the .bin's tokenizer names one stored blob as several files; it was refused before writing any"
        )


def contained_files(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, Path]:
    """For each of these names present in a model directory, the file it resolves to; links leading
    out of the directory are refused.

    A planted link (``tokenizer.model -> ~/.ssh/id_rsa``) would copy any file the server can
    read into the output. Links into the directory itself, and the Hugging Face cache's links
    from ``snapshots/REV/`` to ``blobs/``, are followed. Read the returned paths, not the links
    (``read_file``), so that a link changed after this check is not followed.
    """
    directory = Path(directory)
    root = directory.resolve()
    allowed = [root, root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [root]
    found = {}
    for name in names:
        path = directory / name
        if not path.is_file():
            continue
        found[name] = path.resolve()
        if not any(found[name].is_relative_to(place) for place in allowed):
            raise BinFileError(
                f"{path} is a link to {found[name]}, outside the base model directory; slicebridge "
                "copies no files from outside it (copy the file into the directory if it belongs there)"
            )
    return found


def read_file(path: Path) -> bytes:
    """A file's bytes, refusing to follow a link in its last component (see ``contained_files``)."""
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as handle:
        return handle.read()


def tokenizer_paths(directory: str | os.PathLike) -> dict[str, Path]:
    """The tokenizer (and generation config) files in a model directory (see ``contained_files``)."""
    return contained_files(directory, TOKENIZER_FILES)


def tokenizer_files(directory: str | os.PathLike) -> dict[str, bytes]:
    """The tokenizer (and generation config) files found in a model directory (see ``tokenizer_paths``)."""
    return {name: read_file(path) for name, path in tokenizer_paths(directory).items()}


def widest_mode(sources: Iterable[Path]) -> int:
    """The permission bits an output holding these files' bytes may have: what every one of them allows.

    The owner's read and write always stay; a 0600 source makes a 0600 output, never a 0644 one.
    """
    mode = 0o666
    for source in sources:
        mode &= os.stat(source).st_mode
    return mode | 0o600


def narrow_permissions(path: Path, max_mode: int) -> None:
    """Take away the permission bits ``max_mode`` lacks, from a file or a directory and all it holds
    (a directory keeps search (x) where it keeps read)."""
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        mask = max_mode | ((max_mode & 0o444) >> 2) if item.is_dir() else max_mode
        os.chmod(item, item.stat().st_mode & mask)


# ---------------------------------------------------------------------------------- writing


def producer_versions() -> dict[str, str | None]:
    import torch
    import transformers

    try:
        import dill

        dill_version = dill.__version__
    except ImportError:
        dill_version = None
    return {
        "slicebridge": __version__,
        "torch": str(torch.__version__),
        "transformers": str(transformers.__version__),
        "dill": dill_version,
        "python": platform.python_version(),
    }


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


def save_bin(
    path: str | os.PathLike,
    *,
    model,
    tokenizer_files: Mapping[str, bytes],
    pruning_ratio: float,
    actual_ratio: float,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    pickle_module: str = "auto",
    max_mode: int | None = None,
) -> dict:
    """Write a ``.bin`` atomically; returns what was written besides the model (for reports).

    ``max_mode`` (``widest_mode`` of the files whose bytes it holds) narrows the file's permissions.
    """
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
    # Created narrow (max_mode), so that nobody else can open it while it is written.
    mode = 0o666 if max_mode is None else max_mode & 0o666
    with atomic_file(path, overwrite) as tmp, StreamFile(tmp, mode) as stream:
        save_archive(contents, stream, module)
    summary = {k: v for k, v in contents.items() if k not in ("model", "tokenizer")}
    summary["pickle_module"] = module.__name__
    return summary


# Writes at least this large (the tensors' records) are summed on a helper thread while they are written.
_SUMMED_ASIDE_BYTES = 1024**2


def save_archive(contents: Any, stream: StreamFile, pickle_module) -> None:
    """``torch.save(contents)`` into ``stream``, with zlib summing the records' CRC-32s instead of torch.

    torch sums every record on the writing thread at ~0.35 GB/s, most of the time a large ``.bin``
    takes. Where torch's zip writer can be told not to, for this save alone (``_save_unsummed``), each
    large write is summed with zlib (several GB/s, without the GIL) on a helper thread while the
    kernel takes it, and the sums are then filled in where torch left zeros (``_fill_crcs``): the
    archive holds the CRC-32s torch would have written, and :func:`load` checks them. Elsewhere
    ``torch.save`` sums them itself. torch's process-wide CRC setting is never touched.
    """
    import torch

    with ThreadPoolExecutor(1, thread_name_prefix="slicebridge-crc") as helper:
        writer = _SummingWriter(stream, helper)
        try:
            summed_aside = _save_unsummed(contents, writer, pickle_module)
            if not summed_aside:
                writer.helper = None
                torch.save(contents, writer, pickle_module=pickle_module)
        except RuntimeError:
            if stream.failure is not None:  # torch reports a failed write as a RuntimeError about positions
                raise stream.failure from None
            raise
    if summed_aside:
        _fill_crcs(stream.fd, writer.sums)


def _save_unsummed(contents: Any, writer: _SummingWriter, pickle_module) -> bool:
    """What ``torch.save(contents, writer)`` does, with a zip writer that leaves the CRC-32s to us; False
    (nothing written) where this torch's zip writer does not take that argument."""
    import torch

    serialization = torch.serialization
    try:
        archive = torch._C.PyTorchFileWriter(writer, False, serialization._get_storage_alignment())
    except (AttributeError, TypeError):  # a torch from before compute_crc32 (2.5)
        return False
    serialization._save(contents, archive, pickle_module, serialization.DEFAULT_PROTOCOL, False)
    archive.write_end_of_file()
    return True


class _SummingWriter:
    """What torch.save writes to: each write goes on to the stream, a large one summed on ``helper`` meanwhile.

    ``sums`` maps ``(offset, length)`` of each summed write to its CRC-32.
    """

    def __init__(self, stream: StreamFile, helper: ThreadPoolExecutor | None):
        self.stream, self.helper = stream, helper
        self.sums: dict[tuple[int, int], int] = {}

    def write(self, data) -> int:
        with memoryview(data) as view:
            if self.helper is None or view.nbytes < _SUMMED_ASIDE_BYTES:
                return self.stream.write(view)
            offset = self.stream.position
            summed = self.helper.submit(zlib.crc32, view)
            try:
                size = self.stream.write(view)
            finally:
                crc = summed.result()  # the view stays valid until the helper is done with it, write or not
            self.sums[(offset, size)] = crc
            return size

    def flush(self) -> None:
        self.stream.flush()


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then fixed fields up to the name and extra lengths
_CENTRAL_HEADER = struct.Struct("<4s24xHHH12x")  # signature, ..., name, extra and comment lengths, ...
_DESCRIPTOR_SIGNATURE = b"PK\x07\x08"


def _fill_crcs(fd: int, sums: Mapping[tuple[int, int], int]) -> None:
    """Write each record's CRC-32 into a torch.save archive written without them: into its data descriptor
    (after its bytes; torch writes one) or else its local header, and into its central directory entry.
    A record is summed from ``sums`` where one write held all its bytes, else read back (small records)."""
    with os.fdopen(os.dup(fd), "rb") as handle, zipfile.ZipFile(handle) as archive:  # moves fd's offset: all written
        records, entry = archive.infolist(), archive.start_dir
    for record in records:
        local = _LOCAL_HEADER.unpack(os.pread(fd, _LOCAL_HEADER.size, record.header_offset))
        central = _CENTRAL_HEADER.unpack(os.pread(fd, _CENTRAL_HEADER.size, entry))
        if local[0] != b"PK\x03\x04" or central[0] != b"PK\x01\x02" or record.compress_type != zipfile.ZIP_STORED:
            raise BinFileError(f"torch.save wrote an archive of unexpected layout (record {record.filename})")
        start = record.header_offset + _LOCAL_HEADER.size + local[1] + local[2]
        crc = sums.get((start, record.file_size))
        packed = struct.pack("<I", _crc_of_range(fd, start, record.file_size) if crc is None else crc)
        if record.flag_bits & 0x08:  # a data descriptor follows the bytes, with or without its signature
            after = start + record.file_size
            os.pwrite(fd, packed, after + 4 if os.pread(fd, 4, after) == _DESCRIPTOR_SIGNATURE else after)
        else:
            os.pwrite(fd, packed, record.header_offset + 14)
        os.pwrite(fd, packed, entry + 16)
        entry += _CENTRAL_HEADER.size + sum(central[1:])


def _crc_of_range(fd: int, start: int, length: int) -> int:
    crc = 0
    for offset in range(start, start + length, WRITEBACK_BYTES):
        crc = zlib.crc32(os.pread(fd, min(WRITEBACK_BYTES, start + length - offset), offset), crc)
    return crc


# ---------------------------------------------------------------------------------- reading


ALLOWED_CALLS = (rebuild_model, rebuild_tokenizer)
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")  # how torch names the global it refused


def allow_rebuild_functions() -> None:
    """Let torch's ``weights_only`` unpickler, ``torch.load``'s default, run the two rebuild functions (and
    no other global of slicebridge's) in this whole process. Idempotent; ``import slicebridge`` calls it once
    torch is imported, and :func:`load` before every load."""
    import torch

    torch.serialization.add_safe_globals(list(ALLOWED_CALLS))


def _check_crcs(path: Path) -> None:
    """``CorruptCheckpoint`` naming the first record of a torch zip whose bytes fail their CRC-32 (torch does
    not check, and a damaged .bin would load as silently wrong weights)."""
    import zipfile

    from slicebridge.model.checkpoint import verify_archive_crcs

    if zipfile.is_zipfile(path):
        verify_archive_crcs(path)


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
    _check_crcs(path)
    if trust_pickle:
        return torch.load(path, map_location=map_location, weights_only=False, pickle_module=pickle_module_for("auto"))
    allow_rebuild_functions()  # again: the process's code may have cleared torch's safe globals since
    try:
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
