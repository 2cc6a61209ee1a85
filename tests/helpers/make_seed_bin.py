"""Write a SliceGPT fixture as the seed's ``pruned_model.bin``: the official model object, pickled with dill.

Run by the stand-in slicegpt env's interpreter (transformers 4.41, dill):

    .envs/slicegpt/bin/python tests/helpers/make_seed_bin.py <fixture_dir> <model_name> <sparsity> <out.bin>

It puts ``tests/standin`` on sys.path itself, loads ``<fixture_dir>/sliced`` with
``slicegpt.hf_utils.load_sliced_model(model_name, save_dir, sparsity=..., round_interval=...)``
(the round interval from the fixture's ``fixture.json``, else the official default 1) and
writes what the seed's convert script wrote (see the Llama fixture's README)::

    torch.save({"model": model_adapter.model, "tokenizer": tokenizer, "method": "SliceGPT",
                "pruning_ratio": sparsity, "actual_ratio": 1 - sliced / dense,
                "config": {"base_model": "base", "slicegpt_model": "sliced/<name>_<sparsity>.pt",
                           "sparsity": sparsity, "round_interval": round_interval, "note": NOTE}},
               out, pickle_module=dill)

The model is fp16, as loaded. ``sliced`` counts the loaded model's parameters (shortcut Qs
included, a tied tensor once); ``dense`` the base model's, built from the save directory's
``config.json`` on the meta device (no weights read). Paths in ``config`` are relative to the
fixture directory, so the file does not depend on where the fixture lies.

The same inputs give the same bytes (other tests use these files as fixed inputs), given the same
output file name (torch.save names the archive's top folder after it). Three things
would otherwise vary from run to run:
- the unused tail of each sliced tensor's storage: the official loader slices views of tensors
  it never filled, and torch.save writes whole storages. Some of them were drawn from torch's
  RNG (transformers' inner ``*Model`` initialises its own weights; only the outer class's
  ``_init_weights`` is disabled), the rest is uninitialised memory: here the RNG is seeded and
  torch's deterministic mode fills new memory with NaN;
- the order in which sets of names are pickled (string hashing): the script runs itself again
  with PYTHONHASHSEED=0;
- the random half of the ``.data/serialization_id`` record torch.save adds: zeroed afterwards
  (the other half is the records' CRC).
Prints one JSON line describing what was written.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

if __name__ == "__main__" and os.environ.get("PYTHONHASHSEED") != "0":  # before anything builds a set
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"})

STANDIN = Path(__file__).resolve().parents[1] / "standin"
if str(STANDIN) not in sys.path:
    sys.path.insert(0, str(STANDIN))

import dill  # noqa: E402
import torch  # noqa: E402
from slicegpt import hf_utils  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

NOTE = "Model contains SliceGPT-specific components"


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def dense_parameter_count(save_dir: Path) -> int:
    """The dense model's parameter count, from its config alone (built on the meta device)."""
    config = AutoConfig.from_pretrained(save_dir, local_files_only=True)
    with torch.device("meta"):
        return parameter_count(AutoModelForCausalLM.from_config(config))


def round_interval_of(fixture: Path) -> int:
    facts = fixture / "fixture.json"
    return int(json.loads(facts.read_text()).get("round_interval", 1)) if facts.exists() else 1


def seed_dict(fixture: Path, model_name: str, sparsity: float) -> dict[str, Any]:
    save_dir = fixture / "sliced"
    round_interval = round_interval_of(fixture)
    model_adapter, tokenizer = hf_utils.load_sliced_model(
        model_name, str(save_dir), sparsity=sparsity, round_interval=round_interval
    )
    model = model_adapter.model
    return {
        "model": model,
        "tokenizer": tokenizer,
        "method": "SliceGPT",
        "pruning_ratio": sparsity,
        "actual_ratio": 1 - parameter_count(model) / dense_parameter_count(save_dir),
        "config": {
            "base_model": "base",
            "slicegpt_model": f"sliced/{Path(model_name).name}_{sparsity}.pt",
            "sparsity": sparsity,
            "round_interval": round_interval,
            "note": NOTE,
        },
    }


def pin_serialization_id(path: Path) -> None:
    """Zero the random half of torch.save's ``.data/serialization_id`` record, fixing its CRCs in place."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/.data/serialization_id"))
        old = archive.read(info)
    new = old[: len(old) // 2] + b"0" * (len(old) - len(old) // 2)
    blob = bytearray(path.read_bytes())
    name = info.filename.encode()
    name_length, extra_length = struct.unpack_from("<HH", blob, info.header_offset + 26)
    start = info.header_offset + 30 + name_length + extra_length  # a stored (uncompressed) record
    central = blob.rindex(name) - 46  # its central directory entry: the last place the name appears
    if blob[start : start + len(old)] != old or blob[central : central + 4] != b"PK\x01\x02":
        raise ValueError(f"unexpected zip layout around {info.filename} in {path}")
    blob[start : start + len(new)] = new
    struct.pack_into("<I", blob, info.header_offset + 14, zlib.crc32(new))
    struct.pack_into("<I", blob, central + 16, zlib.crc32(new))
    path.write_bytes(bytes(blob))


def main(fixture: Path, model_name: str, sparsity: float, out: Path) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)  # uninitialised memory is NaN-filled, not left as it was
    contents = seed_dict(fixture, model_name, sparsity)
    torch.save(contents, out, pickle_module=dill)
    pin_serialization_id(out)
    return {
        "out": str(out),
        "bytes": out.stat().st_size,
        "model_class": type(contents["model"]).__qualname__,
        "actual_ratio": contents["actual_ratio"],
        "seconds": round(time.perf_counter() - started, 2),
    }


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit("usage: make_seed_bin.py <fixture_dir> <model_name> <sparsity> <out.bin>")
    fixture_dir, name, ratio, out_path = sys.argv[1:]
    print(json.dumps(main(Path(fixture_dir), name, float(ratio), Path(out_path))))
