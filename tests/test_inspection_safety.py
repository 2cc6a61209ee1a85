"""Inspecting and loading never runs code from the files inspected or loaded (issue 10, items 1, 8, 9, 10, 15, 16).

Each test plants what an attacker would (a pickle payload in a seed-looking ``.bin``, a module
next to it, a tokenizer asking to run its code, a checkpoint swapped after it was checked, links
and ``..`` paths leading out of a directory) and checks, through real servers and the real CLI,
that nothing of it runs or is read, and that the user still gets a description or a one-sentence
typed error. The payloads are harmless: ``open(MARKER, "w")``, which leaves a file behind.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import dill
import pytest
import torch
from helpers.paths import FIXTURE
from helpers.run import run_cli
from safetensors import safe_open

from slicebridge import Bridge
from slicebridge.bridge import protocol
from slicebridge.model.binfile import BinFileError, save_bin, tokenizer_files, tokenizer_paths
from slicebridge.model.checkpoint import read_checkpoint
from slicebridge.model.export import ExportError, checkpoint_provenance, export_model

CHECKPOINT = FIXTURE / "sliced"
SEED_BIN = FIXTURE / "seed_pruned_model.bin"


class _CreatesFile:
    """Unpickled, this calls ``open(marker, "w")``: harmless, but it leaves a trace."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def planted(tmp_path):
    """A seed-looking .bin (its pickle names dill) whose 'model' entry is a payload, and its marker."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "planted.bin"
    torch.save(
        {
            "model": _CreatesFile(marker),
            "tokenizer": None,
            "method": "SliceGPT",
            "pruning_ratio": 0.25,
            "helper": dill._dill._load_type,
        },
        path,
    )
    return path, marker


@pytest.fixture(scope="module")
def official_bridge(official_env):
    with Bridge(env=str(official_env), attach=False) as b:
        yield b


@pytest.fixture(scope="module")
def portable_model():
    return read_checkpoint(CHECKPOINT).build_model()


@pytest.fixture(scope="module")
def export_dir(portable_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "export"
    export_model(
        portable_model,
        out,
        tokenizer_files=tokenizer_files(CHECKPOINT),
        provenance=checkpoint_provenance(read_checkpoint(CHECKPOINT)),
    )
    return out


# --------------------------------------------------------------------------- item 1: info and verify


def test_info_and_verify_through_a_server_never_unpickle_a_planted_bin(bridge, planted):
    path, marker = planted
    facts = bridge.info(path)
    assert facts.kind == "seed-bin" and not marker.exists()
    notes = " ".join(facts.notes)
    assert "not a pickled model object" in notes and "open" in notes  # described from its opcodes
    raw = bridge.request("info", protocol.InfoArgs(path=str(path)))  # the operation itself, as sent by hand
    assert raw.facts["kind"] == "seed-bin" and not marker.exists()
    report = bridge.verify(path, CHECKPOINT)
    assert report.kind == "seed-bin" and not report.passed and not marker.exists()


def test_info_and_verify_on_the_command_line_never_unpickle_a_planted_bin(slicegpt_env, planted):
    path, marker = planted
    described = run_cli("info", str(path), "--env", str(slicegpt_env), "--json")
    assert described.returncode == 0, described.stderr
    assert json.loads(described.stdout)[0]["kind"] == "seed-bin"
    verified = run_cli("verify", str(path), "--checkpoint", str(CHECKPOINT), "--env", str(slicegpt_env), "--json")
    assert verified.returncode == 1 and json.loads(verified.stdout)["kind"] == "seed-bin"
    assert not marker.exists()


def test_upgrade_refuses_to_unpickle_without_trust_pickle(official_bridge, slicegpt_env, planted, tmp_path):
    path, marker = planted
    with pytest.raises(Exception, match="trust_pickle=True") as refused:
        official_bridge.upgrade(path, tmp_path / "out.bin")
    assert refused.value.error_type == "PickleNotTrusted" and "--trust-pickle" in str(refused.value)
    done = run_cli("upgrade", str(SEED_BIN), str(tmp_path / "cli.bin"), "--env", str(slicegpt_env))
    assert done.returncode != 0 and "--trust-pickle" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists() and not (tmp_path / "out.bin").exists() and not (tmp_path / "cli.bin").exists()


def test_upgrade_with_trust_pickle_still_unpickles_only_what_looks_like_the_seeds_files(official_bridge, tmp_path):
    marker = tmp_path / "MARKER"
    torch.save({"model": _CreatesFile(marker), "method": "SliceGPT"}, tmp_path / "plain.bin")  # names no dill
    with pytest.raises(Exception, match="not a .bin made the seed's way") as refused:
        official_bridge.upgrade(tmp_path / "plain.bin", tmp_path / "out.bin", trust_pickle=True)
    assert refused.value.error_type == "NotASeedBin" and not marker.exists()


def test_the_real_seed_bin_is_described_from_its_opcodes(bridge, official_bridge):
    want = read_checkpoint(CHECKPOINT)
    for facts in (bridge.info(SEED_BIN), official_bridge.info(SEED_BIN)):  # no slicegpt in the first env
        assert facts.kind == "seed-bin" and facts.architecture.startswith("UninitializedLlamaForCausalLM")
        assert (facts.num_layers, facts.hidden_size, facts.sliced_width) == (4, 128, 96)
        assert facts.params == {"dense": 982144, "sliced": want.parameter_count, "shortcut_q": 76800}
        assert (facts.sparsity, facts.round_interval, facts.dtype) == (0.25, 8, "float16")
        assert facts.widths == want.widths.as_slicing_config(128)
    assert any("cannot read it either" in note for note in bridge.info(SEED_BIN).notes)
    assert any("upgrade --trust-pickle can read it there" in note for note in official_bridge.info(SEED_BIN).notes)


# --------------------------------------------------------------------------- item 9: no imports


def test_info_imports_no_module_a_bin_names(tmp_path):
    marker = tmp_path / "MARKER"
    (tmp_path / "plantmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nthing = 1\n")
    data = (
        b"\x80\x02}(X\x05\x00\x00\x00model"
        b"cplantmod\nthing\n"
        b"X\x04\x00\x00\x00venv"
        b"cvenv.__main__\nmain\n"
        b"X\x06\x00\x00\x00helper"
        b"cdill._dill\n_load_type\n"
        b"u."
    )
    (tmp_path / "planted.bin").write_bytes(data)
    before = sorted(os.listdir(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "slicebridge.client.cli", "info", "planted.bin", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)[0]
    assert facts["kind"] == "seed-bin" and "plantmod.thing" in " ".join(facts["notes"])
    assert sorted(os.listdir(tmp_path)) == before  # no marker, no venv made in the cwd


# --------------------------------------------------------------------------- item 8: no remote code


def _ask_to_run_code(config_json: bytes, marker: Path) -> tuple[bytes, str]:
    """A tokenizer_config.json whose tokenizer class only its shipped code defines, and that code."""
    config = json.loads(config_json)
    config["tokenizer_class"] = "EvilTokenizer"
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    code = (
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    return json.dumps(config).encode(), code


def _load_answering_yes(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """slicebridge.load(path) in a fresh process whose stdin answers y to any prompt."""
    return subprocess.run(
        [sys.executable, "-c", "import slicebridge, sys; slicebridge.load(sys.argv[1])", str(path)],
        input="y\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")},
    )


def test_loading_an_export_never_runs_its_tokenizer_code(export_dir, tmp_path):
    marker = tmp_path / "MARKER"
    planted = tmp_path / "export"
    shutil.copytree(export_dir, planted)
    config, code = _ask_to_run_code((planted / "tokenizer_config.json").read_bytes(), marker)
    (planted / "tokenizer_config.json").write_bytes(config)
    (planted / "tokenization_evil.py").write_text(code)
    done = _load_answering_yes(planted, tmp_path)
    assert done.returncode != 0 and "ExportError" in done.stderr and "never does" in done.stderr
    assert "Do you wish to run" not in done.stdout + done.stderr and not marker.exists()


def test_loading_a_bin_never_asks_to_run_tokenizer_code(portable_model, tmp_path):
    files = tokenizer_files(CHECKPOINT)
    files["tokenizer_config.json"], _ = _ask_to_run_code(files["tokenizer_config.json"], tmp_path / "MARKER")
    path = tmp_path / "asks.bin"
    save_bin(path, model=portable_model, tokenizer_files=files, pruning_ratio=0.25, actual_ratio=0.13, config={})
    done = _load_answering_yes(path, tmp_path)
    assert done.returncode != 0 and "BinFileError" in done.stderr and "never does" in done.stderr
    assert "Do you wish to run" not in done.stdout + done.stderr


# --------------------------------------------------------------------------- item 10: no second read


def test_the_official_loader_never_unpickles_a_checkpoint_swapped_after_the_checks(official_env, tmp_path, monkeypatch):
    checkpoint_dir = tmp_path / "shared"
    shutil.copytree(CHECKPOINT, checkpoint_dir)
    pt = checkpoint_dir / "Meta-Llama-3-tiny_0.25.pt"
    marker = tmp_path / "MARKER"
    swapped = tmp_path / "swapped.pt"
    torch.save({"model.embed_tokens.weight": _CreatesFile(marker)}, swapped)
    monkeypatch.setenv("SLICEBRIDGE_DEBUG_FAULTS", "load:pause=1.5")  # between our checks and the official load
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # an old torch: weights_only=False by default
    checked = threading.Event()

    def on_event(kind, body):
        if kind == "progress" and body.get("stage") == "load":
            checked.set()

    def swap():
        if checked.wait(60):
            os.replace(swapped, pt)

    swapper = threading.Thread(target=swap)
    swapper.start()
    with Bridge(env=str(official_env), attach=False, debug_ops=True) as b:
        try:
            b.convert(checkpoint_dir, tmp_path / "out.bin", loader="official", on_event=on_event)
        except Exception as exc:  # a typed, one-sentence refusal is fine; running the payload is not
            assert exc.error_type == "NotASliceGPTCheckpoint", exc
    swapper.join()
    assert checked.is_set() and not marker.exists()


def test_pt_payloads_are_refused_by_both_loaders(official_bridge, tmp_path):
    checkpoint_dir = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINT, checkpoint_dir)
    marker = tmp_path / "MARKER"
    torch.save({"model.embed_tokens.weight": _CreatesFile(marker)}, checkpoint_dir / "Meta-Llama-3-tiny_0.25.pt")
    for loader in ("builtin", "official"):
        with pytest.raises(Exception, match="pickled Python objects") as refused:
            official_bridge.convert(checkpoint_dir, tmp_path / f"{loader}.bin", loader=loader)
        assert refused.value.error_type == "NotASliceGPTCheckpoint"
    assert not marker.exists() and not list(tmp_path.glob("*.bin"))


# --------------------------------------------------------------------------- item 15: links, permissions


def test_a_base_model_link_leading_out_of_the_directory_is_refused(bridge, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"the owner's private key")
    secret.chmod(0o600)
    base = tmp_path / "base"
    shutil.copytree(CHECKPOINT, base)
    base.chmod(0o755)
    (base / "tokenizer.model").symlink_to(secret)
    for request in (bridge.convert, bridge.export):
        with pytest.raises(BinFileError, match="outside the base model directory"):
            request(base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_links_inside_the_directory_and_the_hf_cache_layout_are_followed(tmp_path):
    snapshot = tmp_path / "models--x" / "snapshots" / "abc"
    blobs = tmp_path / "models--x" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    (blobs / "1234").write_text("{}")
    (snapshot / "tokenizer.json").symlink_to("../../blobs/1234")
    (snapshot / "vocab.json").write_text("{}")
    (snapshot / "merges.txt").symlink_to("vocab.json")
    vocab = (snapshot / "vocab.json").resolve()
    assert tokenizer_paths(snapshot) == {
        "tokenizer.json": (blobs / "1234").resolve(),
        "vocab.json": vocab,
        "merges.txt": vocab,
    }


def test_outputs_are_never_more_readable_than_the_files_they_copy(bridge, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(CHECKPOINT, base)
    (base / "tokenizer.json").chmod(0o600)
    bridge.convert(base, tmp_path / "out.bin")
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o600
    bridge.export(base, tmp_path / "out-hf")
    assert stat.S_IMODE((tmp_path / "out-hf").stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out-hf").iterdir()} == {0o600}


# --------------------------------------------------------------------------- item 16: weight_map paths


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABSOLUTE"])
def test_an_export_index_naming_files_outside_it_is_refused(export_dir, tmp_path, shard):
    import slicebridge

    planted = tmp_path / "export"
    shutil.copytree(export_dir, planted)
    outside = tmp_path / "outside.safetensors"
    (planted / "model.safetensors").rename(outside)
    shard = str(outside) if shard == "ABSOLUTE" else shard
    with safe_open(str(outside), "pt") as weights:
        names = list(weights.keys())
    (planted / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, shard)}))
    with pytest.raises(ExportError, match="outside the export"):
        slicebridge.load(planted)
