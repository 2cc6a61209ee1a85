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
from pathlib import Path

from slicebridge.model.facts import ArtifactInfo, constant_width, model_info


def info(path: str | os.PathLike, *, base_model: str | os.PathLike | None = None, bridge=None) -> ArtifactInfo:
    """Describe a SliceGPT checkpoint (dir or ``.pt``), a ``.bin`` or an export directory."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir() and (path / "config.json").is_file() and \
            json.loads((path / "config.json").read_text()).get("model_type") == "sliced_llama":
        return _export_info(path)
    if path.is_dir() or path.suffix == ".pt":
        return _checkpoint_info(path, base_model)
    return _bin_info(path, bridge)


def _checkpoint_info(path: Path, base_model) -> ArtifactInfo:
    from slicebridge.model.checkpoint import read_checkpoint

    checkpoint = read_checkpoint(path, base_dir=base_model)
    widths = checkpoint.widths.as_slicing_config(checkpoint.hidden_size)
    dense = checkpoint.dense_parameter_count()
    return ArtifactInfo(
        path=str(checkpoint.checkpoint_path), kind="checkpoint",
        architecture=f"{(checkpoint.base_config.get('architectures') or ['LlamaForCausalLM'])[0]}, sliced by SliceGPT",
        num_layers=checkpoint.num_layers, hidden_size=checkpoint.hidden_size,
        sliced_width=constant_width(widths), widths=widths,
        params={"dense": dense, "sliced": checkpoint.parameter_count,
                "shortcut_q": checkpoint.shortcut_parameter_count},
        actual_ratio=checkpoint.actual_ratio(), sparsity=checkpoint.sparsity,
        round_interval=checkpoint.round_interval, dtype=checkpoint.dtype,
        file_bytes=checkpoint.checkpoint_path.stat().st_size, producer={"slicegpt": "run_slicegpt"},
    )


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
    meta = {"sparsity": config.get("sparsity"), "round_interval": config.get("round_interval"),
            "producer": contents.get("producer"), "loader": contents.get("loader"), "widths": contents.get("widths")}
    return model_info(path, "bin", contents["model"], meta)


def _export_info(path: Path) -> ArtifactInfo:
    from slicebridge.model.export import load_export

    contents = load_export(path)
    provenance = contents.get("provenance") or {}
    meta = {"sparsity": provenance.get("sparsity"), "round_interval": provenance.get("round_interval"),
            "producer": provenance.get("producer"), "loader": provenance.get("loader")}
    return model_info(path, "export", contents["model"], meta)
