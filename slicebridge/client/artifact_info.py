"""``info``: what a checkpoint, a ``.bin`` or an export directory holds (the seed's test_model_info.py).

Architecture, per-layer widths, parameter counts (dense base, sliced, of which shortcut
Qs), actual ratio, dtype, file size and producer versions. Everything is read in the
caller's env without a server. A ``.bin`` made the seed's way is never unpickled (that
would run code from it): its facts are read from its pickle's opcodes (``model.seed_bin``),
by the server when a bridge is given, which then also says whether its env could read the
file for ``upgrade``; the report says which failures the file meets in this env.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from slicebridge.errors import InputNotFound
from slicebridge.model.facts import ArtifactInfo, model_info
from slicebridge.model.families import FAMILIES


def info(path: str | os.PathLike, *, base_model: str | os.PathLike | None = None, bridge=None) -> ArtifactInfo:
    """Describe a SliceGPT checkpoint (dir or ``.pt``), a ``.bin`` or an export directory."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise InputNotFound(f"{path} does not exist")
    if _is_export_dir(path):
        return _export_info(path)
    if path.is_dir() or path.suffix == ".pt":
        return _checkpoint_info(path, base_model)
    from slicebridge.model.binfile import BinFileError
    from slicebridge.model.guards import require_regular_file

    require_regular_file(path, BinFileError, ".bin file")  # before opening: a FIFO would block forever
    if _is_safetensors(path):
        raise BinFileError(
            f"{path} is a safetensors file (bare tensors), not a SliceGPT checkpoint, a .bin nor "
            "an export; for an export, pass the directory that holds it"
        )
    return _bin_info(path, bridge)


def info_targets(path: str | os.PathLike) -> list[Path]:
    """What ``slicebridge info PATH`` describes: each checkpoint of a run_slicegpt dir that holds
    several (one per sparsity), else ``PATH`` itself."""
    path = Path(path).expanduser()
    if path.is_dir() and not _is_export_dir(path):
        checkpoints = sorted(p for p in path.glob("*.pt") if p.is_file())
        if len(checkpoints) > 1:
            return checkpoints
    return [path]


def _is_export_dir(path: Path) -> bool:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("model_type") in {f.sliced_model_type for f in FAMILIES}
    except (OSError, ValueError, AttributeError):  # not an export's config: the dir is read as what else it is
        return False


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def _checkpoint_info(path: Path, base_model) -> ArtifactInfo:
    from slicebridge.model.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path, base_dir=base_model)
    facts = ArtifactInfo(
        path=str(checkpoint.checkpoint_path),
        kind="checkpoint",
        family=checkpoint.family.key,
        architecture=f"{(checkpoint.base_config.get('architectures') or checkpoint.family.architectures)[0]}, "
        "sliced by SliceGPT",
        sparsity=checkpoint.sparsity,
        round_interval=checkpoint.round_interval,
        dtype=checkpoint.dtype,
        file_bytes=checkpoint.checkpoint_path.stat().st_size,
        producer={"slicegpt": "run_slicegpt"},
    )
    facts.set_widths(checkpoint.widths, checkpoint.hidden_size)
    facts.set_params(checkpoint.params())
    return facts


def _bin_info(path: Path, bridge) -> ArtifactInfo:
    from slicebridge.model.binfile import load
    from slicebridge.model.pickle_scan import diagnose_seed_bin

    diagnosis = diagnose_seed_bin(path)
    if diagnosis.is_seed_format:
        if bridge is None:
            from slicebridge.model.seed_bin import describe_seed_bin

            facts = describe_seed_bin(path)
        else:
            from slicebridge.bridge import protocol

            facts = ArtifactInfo(**bridge.request("info", protocol.InfoArgs(path=str(path))).facts)
        facts.notes += diagnosis.failures + [diagnosis.fix]
        return facts
    contents = load(path)
    config = contents.get("config") or {}
    meta = {
        "sparsity": config.get("sparsity"),
        "round_interval": config.get("round_interval"),
        "producer": contents.get("producer"),
        "loader": contents.get("loader"),
    }
    return model_info(path, "bin", contents["model"], meta)


def _export_info(path: Path) -> ArtifactInfo:
    from slicebridge.model.export import load_export

    contents = load_export(path)
    provenance = contents.get("provenance") or {}
    meta = {
        "sparsity": provenance.get("sparsity"),
        "round_interval": provenance.get("round_interval"),
        "producer": provenance.get("producer"),
        "loader": provenance.get("loader"),
    }
    return model_info(path, "export", contents["model"], meta)
