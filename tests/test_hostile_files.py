"""What a small crafted or damaged file can make slicebridge do: refused, typed, before any allocation.

Each file is crafted here, small (a few MB at most), from the shared fixture's model:

- a ``.bin`` whose tensors are stride-0 views claiming gigabytes of a 4-byte storage;
- a ``.bin`` whose config claims 3,000,000 layers and holds tensors for none;
- a ``.bin`` whose tokenizer names one stored 1 MiB blob as 500 files (to be written to $TMPDIR);
- a ``.pt`` checkpoint (and its base config) whose embedding and head claim 7.5 GB the same way;
- a ``.pt`` whose views each fit their storage but overlap, eight on one storage.

The ``.bin``s go through ``slicebridge.load`` in a fresh process whose address space is capped at
1 GiB above what it uses once its imports are done (a real ``.bin`` still loads under that cap);
the ``.pt`` goes through a real server's convert with the server's address space capped the same
way, and the server then still converts the real fixture. Last, a copy of the fixture checkpoint with
100 bytes flipped mid-file must fail its CRC-32 check, naming the damaged record, and write nothing.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURE

from slicebridge.bridge.errors import SlicebridgeError
from slicebridge.model.binfile import ImplausibleBinFile, ModelRecipe, TokenizerRecipe
from slicebridge.model.checkpoint import read_checkpoint
from slicebridge.model.errors import CorruptCheckpoint, ImplausibleCheckpoint

CHECKPOINT = FIXTURE / "sliced" / "Meta-Llama-3-tiny_0.25.pt"
HEADROOM = 1024**3  # the address space a capped process may add once its imports are done

LOAD_CAPPED = r"""
import json, resource, sys
import slicebridge
from slicebridge.model import binfile, checkpoint, configuration_sliced_llama, modeling_sliced_llama
import transformers

vm_size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
limit = vm_size + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for path in sys.argv[2:]:
    try:
        slicebridge.load(path)
        print(json.dumps({"path": path, "type": None}))
    except Exception as error:
        print(json.dumps({"path": path, "type": type(error).__name__, "message": str(error)}))
"""


# --------------------------------------------------------------------------------------------
# .bin files, through slicebridge.load
# --------------------------------------------------------------------------------------------


def _save_bin(path: Path, config: dict, state_dict: dict, tokenizer_files: dict | None = None) -> Path:
    torch.save(
        {
            "model": ModelRecipe(config, state_dict),
            "tokenizer": TokenizerRecipe(tokenizer_files or {}),
            "method": "SliceGPT",
            "format": "slicebridge.bin",
            "format_version": 1,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def capped_loads(tmp_path_factory):
    """Craft the .bins, load them all in one capped process; {name: (size in bytes, outcome)}."""
    directory = tmp_path_factory.mktemp("hostile-bins")
    model = read_checkpoint(FIXTURE / "sliced").build_model(dtype=torch.float32)
    config = model.config.to_dict()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    vocab = 2**22  # [vocab, 96] + [vocab, 128] float32: 3.8 GB claimed, 8 bytes stored
    stride0 = {
        **state,
        "model.embed_tokens.weight": torch.zeros(1).as_strided((vocab, 96), (0, 0)),
        "lm_head.weight": torch.zeros(1).as_strided((vocab, 128), (0, 0)),
    }
    no_widths = {key: value for key, value in config.items() if not key.endswith(("_dimension", "_dimensions"))}
    blob = b"x" * 2**20
    paths = {
        "real": _save_bin(directory / "real.bin", config, state),
        "stride0": _save_bin(directory / "stride0.bin", {**config, "vocab_size": vocab}, stride0),
        "layers": _save_bin(directory / "layers.bin", {**no_widths, "num_hidden_layers": 3_000_000}, {}),
        "tokenizer": _save_bin(
            directory / "tokenizer.bin", config, state, {f"tokenizer{idx}.json": blob for idx in range(500)}
        ),
        "tokenizer_aliases": _save_bin(
            directory / "aliases.bin", config, state, {"tokenizer.json": blob, "vocab.json": blob, "merges.txt": blob}
        ),
    }
    tmpdir = directory / "tmp"
    tmpdir.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_CAPPED, str(HEADROOM), *map(str, paths.values())],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "TMPDIR": str(tmpdir)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = {Path(line["path"]).name: line for line in map(json.loads, proc.stdout.splitlines())}
    assert not list(tmpdir.iterdir()), "a refused .bin left files in $TMPDIR"
    return {name: (path.stat().st_size, outcomes[path.name]) for name, path in paths.items()}


def test_a_real_bin_loads_under_the_cap(capped_loads):
    _, outcome = capped_loads["real"]
    assert outcome["type"] is None, outcome


def test_stride0_tensors_in_a_bin_are_refused_before_allocating(capped_loads):
    size, outcome = capped_loads["stride0"]
    assert size < 4 * 2**20
    assert outcome["type"] == "ImplausibleBinFile", outcome
    assert "model.embed_tokens.weight claims 1.6 GB" in outcome["message"]
    assert "the file holds 4 bytes" in outcome["message"]


def test_a_config_claiming_millions_of_layers_is_refused_before_building(capped_loads):
    size, outcome = capped_loads["layers"]
    assert size < 8 * 1024
    assert outcome["type"] == "ImplausibleBinFile", outcome
    assert "num_hidden_layers=3000000" in outcome["message"] and "0 layers" in outcome["message"]


def test_one_blob_named_as_500_tokenizer_files_is_refused_before_writing(capped_loads):
    _, outcome = capped_loads["tokenizer"]
    assert outcome["type"] == "ImplausibleBinFile", outcome
    assert "'tokenizer0.json'" in outcome["message"] and "497 more" in outcome["message"]
    _, outcome = capped_loads["tokenizer_aliases"]
    assert outcome["type"] == "ImplausibleBinFile", outcome
    assert "one stored blob as several files" in outcome["message"]


def test_the_bin_error_is_a_slicebridge_error():
    assert issubclass(ImplausibleBinFile, SlicebridgeError)
    assert issubclass(ImplausibleCheckpoint, SlicebridgeError) and issubclass(CorruptCheckpoint, SlicebridgeError)


# --------------------------------------------------------------------------------------------
# .pt checkpoints, through a real server's convert
# --------------------------------------------------------------------------------------------


def _vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))


@pytest.fixture(scope="module")
def capped_bridge(bridge, tmp_path_factory):
    """The module's server, warmed up by a real convert, then capped at 1 GiB above its address space."""
    bridge.convert(FIXTURE / "sliced", tmp_path_factory.mktemp("warmup") / "warm.bin")
    pid = bridge.server.pid
    limit = _vm_size(pid) + HEADROOM
    resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))
    return bridge


def test_stride0_checkpoint_is_refused_by_the_server_before_allocating(capped_bridge, tmp_path):
    run_dir, base = tmp_path / "run", tmp_path / "base"
    run_dir.mkdir()
    base.mkdir()
    vocab = 2**23  # [vocab, 96] + [vocab, 128] float32: 7.5 GB claimed, 8 bytes stored
    state = torch.load(CHECKPOINT, weights_only=True)
    state["model.embed_tokens.weight"] = torch.zeros(1).as_strided((vocab, 96), (0, 0))
    state["lm_head.weight"] = torch.zeros(1).as_strided((vocab, 128), (0, 0))
    pt = run_dir / CHECKPOINT.name
    torch.save(state, pt)
    config = json.loads((FIXTURE / "base" / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "vocab_size": vocab}))
    assert pt.stat().st_size < 4 * 2**20

    output = tmp_path / "out.bin"
    with pytest.raises(ImplausibleCheckpoint) as refused:
        capped_bridge.convert(pt, output, base_model=base)
    assert "model.embed_tokens.weight claims 3.2 GB" in str(refused.value)
    assert "the file holds 4 bytes" in str(refused.value)
    assert not output.exists()
    capped_bridge.convert(FIXTURE / "sliced", tmp_path / "after.bin")  # still serving, under the same cap
    assert (tmp_path / "after.bin").is_file()


def test_overlapping_views_of_one_storage_are_refused(tmp_path):
    """Each view fits its storage, but eight of them share one: together they claim more than the file holds."""
    state = torch.load(CHECKPOINT, weights_only=True)
    shape = state["model.layers.0.mlp.gate_proj.weight"].shape  # [344, 96], as every gate and up
    shared = torch.zeros(shape.numel() + 8)
    for layer in range(4):
        for offset, name in enumerate(("gate_proj", "up_proj")):
            key = f"model.layers.{layer}.mlp.{name}.weight"
            state[key] = shared[2 * layer + offset :][: shape.numel()].view(shape)
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "sliced", run_dir, ignore=shutil.ignore_patterns("*.pt"))
    torch.save(state, run_dir / CHECKPOINT.name)
    with pytest.raises(ImplausibleCheckpoint, match="overlapping views of the same bytes"):
        read_checkpoint(run_dir)


# --------------------------------------------------------------------------------------------
# a damaged checkpoint
# --------------------------------------------------------------------------------------------


def _damaged_copy(directory: Path) -> tuple[Path, str]:
    """The fixture's run dir with 100 bytes flipped mid-checkpoint; and the record they fall in."""
    run_dir = directory / "sliced"
    shutil.copytree(FIXTURE / "sliced", run_dir)
    pt = run_dir / CHECKPOINT.name
    pt.chmod(0o644)
    data = bytearray(pt.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 100] = bytes(b ^ 0xFF for b in data[middle : middle + 100])
    pt.write_bytes(data)
    with zipfile.ZipFile(pt) as archive:
        record = max((r for r in archive.infolist() if r.header_offset <= middle), key=lambda r: r.header_offset)
    return run_dir, record.filename


def test_a_damaged_checkpoint_is_refused_naming_the_record(tmp_path):
    run_dir, record = _damaged_copy(tmp_path)
    assert "/data/" in record
    with pytest.raises(CorruptCheckpoint) as refused:
        read_checkpoint(run_dir)
    assert refused.value.record == record


def test_a_damaged_checkpoint_does_not_convert_through_the_server(capped_bridge, tmp_path):
    run_dir, record = _damaged_copy(tmp_path)
    output = tmp_path / "out.bin"
    with pytest.raises(CorruptCheckpoint) as refused:
        capped_bridge.convert(run_dir, output)
    assert f"record {record} does not match the CRC-32" in str(refused.value)
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
