"""``info``: what a checkpoint, a ``.bin`` or an export directory holds (the seed's test_model_info.py).

Architecture, per-layer widths, parameter counts (dense base, sliced, of which shortcut
Qs), actual ratio, dtype, file size and producer versions. Everything is read in the
caller's env without a server, except a ``.bin`` made the seed's way: only the slicegpt
env can unpickle it, so its facts come from the server when a bridge is given (and the
report says why they cannot be read here otherwise).
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
            return ArtifactInfo(str(path), "seed-bin", file_bytes=path.stat().st_size,
                                notes=diagnosis.failures + [diagnosis.fix,
                                                            "pass env=... to read it in the slicegpt env"])
        from slicebridge.bridge import protocol

        facts = bridge.request("info", protocol.InfoArgs(path=str(path))).facts
        return ArtifactInfo(**{**facts, "notes": facts.get("notes", []) + diagnosis.failures + [diagnosis.fix]})
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
