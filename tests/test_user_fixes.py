"""Issue 11, "what users hit" (items 10-19): each rough edge a new user met, held against real
servers in the second env, real checkpoints made by our SliceGPT maker, and the official fixture."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import dill
import pytest
import torch
from helpers.paths import FIXTURE, REPO, STANDIN
from helpers.run import run_cli

from slicebridge import Bridge
from slicebridge.model.binfile import load
from slicebridge.model.checkpoint import read_checkpoint
from slicebridge.model.dense import PRESETS, make_dense_llama
from slicebridge.model.errors import SparsityMismatch
from slicebridge.model.slicing import slice_llama

STEM = "Meta-Llama-3-tiny"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One run_slicegpt save dir holding three fp32 checkpoints: 0.25 and 0.4 (round_interval 8) and
    0.3 made with round_interval 1 (width 89, which no other interval gives)."""
    root = tmp_path_factory.mktemp("runs")
    dense = make_dense_llama(root / "tiny", dtype="float32", **PRESETS["tiny"])
    run = root / "SliceGPT_2000"
    for sparsity, interval in ((0.25, 8), (0.4, 8), (0.3, 1)):
        slice_llama(dense, run, sparsity=sparsity, round_interval=interval)
    return run


@pytest.fixture(scope="module")
def detached(slicegpt_env):
    """A detached warm server that every CLI call (and make convert) of this module attaches to."""
    started = run_cli("server", "start", "--env", str(slicegpt_env))
    assert started.returncode == 0, started.stderr
    yield str(slicegpt_env)
    run_cli("server", "stop", "--env", str(slicegpt_env))


# ------------------------------------------------------------------------------ 10: output dir


def test_output_dir_is_made_like_mkdir_p(detached, tmp_path):
    out = tmp_path / "converted" / "deeper"
    done = run_cli("convert", str(FIXTURE / "sliced" / "*.pt"), "--output-dir", f"{out}/", "--env", detached)
    assert done.returncode == 0, done.stdout + done.stderr
    assert load(out / f"{STEM}_0.25.bin")["pruning_ratio"] == 0.25


# ------------------------------------------------------------------------------ 11: DIR + sparsity


def test_dir_and_sparsity_pick_one_checkpoint_for_convert_and_verify(detached, run_dir, tmp_path):
    out = tmp_path / "x.bin"
    done = run_cli(
        "convert",
        "--slicegpt_model",
        str(run_dir),
        "--sparsity",
        "0.4",
        "--output",
        str(out),
        "--env",
        detached,
        "--json",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    [row] = json.loads(done.stdout)
    assert row["checkpoint"].endswith(f"{STEM}_0.4.pt")
    assert load(out)["config"]["sparsity"] == 0.4
    # The .bin records its sparsity: the run dir's checkpoint for it is the one verified against.
    verified = run_cli("verify", str(out), "--checkpoint", str(run_dir), "--env", detached, "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert report["passed"] and report["checkpoint"] == str(run_dir)


def test_the_api_names_the_output_after_the_picked_checkpoint(detached, run_dir, tmp_path):
    from slicebridge import client

    try:
        result = client.convert(run_dir, output=f"{tmp_path}/out/", env=detached, sparsity=0.4)
    finally:
        client.close()
    assert result.output == str(tmp_path / "out" / f"{STEM}_0.4.bin") and result.sparsity == 0.4


def test_dir_and_a_sparsity_it_lacks_fail_before_any_work(detached, run_dir, tmp_path):
    done = run_cli(
        "convert",
        "--slicegpt_model",
        str(run_dir),
        "--sparsity",
        "0.5",
        "--output",
        str(tmp_path / "x.bin"),
        "--env",
        detached,
    )
    assert done.returncode == 1 and "no checkpoint for sparsity 0.5" in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------ 12: info RUNDIR


def test_info_describes_each_checkpoint_of_a_run_dir(run_dir):
    done = run_cli("info", str(run_dir), str(FIXTURE / "seed_pruned_model.bin"), "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    reports = json.loads(done.stdout)
    assert [(r["kind"], r["sparsity"]) for r in reports] == [
        ("checkpoint", 0.25),
        ("checkpoint", 0.3),
        ("checkpoint", 0.4),
        ("seed-bin", 0.25),
    ]


# ------------------------------------------------------------------------------ 13: renamed checkpoint


@pytest.fixture(scope="module")
def renamed_run(tmp_path_factory) -> Path:
    """A 0.3 checkpoint (and its .json) renamed _0.25: with hidden 184, 0.3 gives width 128 with
    round_interval 8, and 0.25 gives 128 too, but only with round_interval 16 or more."""
    root = tmp_path_factory.mktemp("renamed")
    dense = make_dense_llama(
        root / "wide",
        hidden_size=184,
        intermediate_size=344,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=1000,
    )
    run = slice_llama(dense, root / "run", sparsity=0.3)
    for suffix in (".pt", ".json"):
        (run / f"Meta-Llama-3-wide_0.3{suffix}").rename(run / f"Meta-Llama-3-wide_0.25{suffix}")
    return run


def test_a_renamed_checkpoint_is_refused_saying_what_its_widths_mean(detached, renamed_run, tmp_path):
    with pytest.raises(SparsityMismatch, match=r"what sparsity 0\.3 gives with round_interval 8"):
        read_checkpoint(renamed_run)
    out = tmp_path / "x.bin"
    done = run_cli("convert", str(renamed_run), "--output", str(out), "--env", detached)
    assert done.returncode == 1 and "SparsityMismatch" in done.stdout
    assert "Meta-Llama-3-wide_0.3.pt again" in done.stdout and not out.exists()
    # A run that did use --round-interval 16 says so, and is accepted as named.
    assert read_checkpoint(renamed_run, round_interval=16).sparsity == 0.25


# ------------------------------------------------------------------------------ 14: dtype


def test_both_loaders_keep_the_checkpoints_dtype(bridge, official_env, run_dir, tmp_path):
    builtin = bridge.convert(run_dir, tmp_path / "builtin.bin", sparsity=0.25, loader="builtin")
    with Bridge(env=str(official_env), attach=False) as official_bridge:
        official = official_bridge.convert(run_dir, tmp_path / "official.bin", sparsity=0.25, loader="official")
        fixture = official_bridge.convert(FIXTURE / "sliced", tmp_path / "fp16.bin", loader="official")
    assert (builtin.loader, official.loader) == ("builtin", "official")
    assert builtin.dtype == official.dtype == "float32" and fixture.dtype == "float16"
    ours, theirs = (load(tmp_path / name)["model"].state_dict() for name in ("builtin.bin", "official.bin"))
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)  # the checkpoint's values, exactly
    assert load(tmp_path / "official.bin")["model"].lm_head.weight.dtype == torch.float32


def test_dtype_casts_the_checkpoint_the_same_with_either_loader(bridge, slicegpt_env, official_env, tmp_path):
    fp16 = load(bridge.convert(FIXTURE / "sliced", tmp_path / "fp16.bin").output)["model"].state_dict()
    builtin = bridge.convert(FIXTURE / "sliced", tmp_path / "builtin.bin", dtype="float32", loader="builtin")
    with Bridge(env=str(official_env), attach=False) as official_bridge:
        official = official_bridge.convert(FIXTURE / "sliced", tmp_path / "official.bin", dtype="float32")
    assert (builtin.loader, official.loader) == ("builtin", "official")
    assert builtin.dtype == official.dtype == "float32"
    for name in ("builtin.bin", "official.bin"):
        state = load(tmp_path / name)["model"].state_dict()
        assert all(state[k].dtype == torch.float32 and torch.equal(state[k], fp16[k].float()) for k in fp16)
    done = run_cli(
        "convert", "--slicegpt_model", str(FIXTURE / "sliced"), "--output", str(tmp_path / "bf16.bin"),
        "--dtype", "bfloat16", "--env", str(slicegpt_env), "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert load(tmp_path / "bf16.bin")["model"].lm_head.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------ 15: doctor


def _env_with_official_copy(tmp_path: Path, slicegpt_env: Path, with_version: bool) -> tuple[Path, str]:
    """A venv over the stand-in env whose slicegpt is a git checkout of the stand-in package."""
    checkout = tmp_path / "TransformerCompression"
    shutil.copytree(STANDIN / "slicegpt", checkout / "src" / "slicegpt", ignore=shutil.ignore_patterns("__pycache__"))
    init = checkout / "src" / "slicegpt" / "__init__.py"
    if not with_version:
        init.write_text(init.read_text().replace('__version__ = "0.1.0+standin"\n', ""))
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "official"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    env = tmp_path / "env"
    python = slicegpt_env / "bin" / "python"
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(env)], check=True)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    theirs = subprocess.run([str(python), "-c", purelib], capture_output=True, text=True, check=True).stdout.strip()
    own = subprocess.run(
        [str(env / "bin" / "python"), "-c", purelib], capture_output=True, text=True, check=True
    ).stdout.strip()
    Path(own, "official.pth").write_text(f"{theirs}\n{checkout / 'src'}\n")
    return env, commit


def test_doctor_says_which_loader_from_where_at_which_commit(slicegpt_env, tmp_path):
    env, commit = _env_with_official_copy(tmp_path, slicegpt_env, with_version=False)
    done = run_cli("doctor", "--env", str(env))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "importable (no version metadata)" in done.stdout and " unknown" not in done.stdout
    source = tmp_path / "TransformerCompression" / "src" / "slicegpt"
    assert (
        f"loader: official slicegpt.hf_utils.load_sliced_model, from {source}, at commit {commit[:12]}" in done.stdout
    )
    report = json.loads(run_cli("doctor", "--env", str(env), "--json").stdout)["official_loader"]
    assert report == {"path": str(source), "commit": commit, "loader_module": True, "used": True}
    plain = run_cli("doctor", "--env", str(slicegpt_env))
    assert "loader: builtin" in plain.stdout and "official loader will not be used" in plain.stdout


# ------------------------------------------------------------------------------ 16: info without --env


def test_info_reads_a_seed_bin_without_env_and_names_a_safetensors_file(tmp_path):
    done = run_cli("info", str(FIXTURE / "seed_pruned_model.bin"), "--json")
    assert done.returncode == 0, done.stderr
    [facts] = json.loads(done.stdout)
    assert (facts["num_layers"], facts["hidden_size"], facts["sliced_width"]) == (4, 128, 96)
    assert facts["architecture"] and facts["dtype"] == "float16"
    # A seed-looking file whose opcodes hold no model: the table says so, not "layers 0".
    odd = tmp_path / "odd.bin"
    torch.save({"model": {"weights": torch.zeros(2)}, "helper": dill._dill._load_type}, odd)
    table = run_cli("info", str(odd)).stdout
    assert re.search(r"^layers +unknown \(see the notes\)$", table, re.M) and "note: no model facts" in table
    assert not re.search(r"^(layers|hidden size) +0$", table, re.M)
    weights = run_cli("info", str(FIXTURE / "base" / "model.safetensors"))
    assert weights.returncode == 1 and "is a safetensors file" in weights.stderr
    assert "torch file" not in weights.stderr and "Traceback" not in weights.stderr


# ------------------------------------------------------------------------------ 17: no local paths


def test_export_card_and_provenance_hold_no_local_paths(bridge, tmp_path):
    out = tmp_path / "pruned-hf"
    bridge.export(FIXTURE / "sliced", out)
    card, record = (out / "README.md").read_text(), (out / "slicebridge.json").read_text()
    for text in (card, record):
        assert str(FIXTURE) not in text and str(tmp_path) not in text
    provenance = json.loads(record)
    assert (provenance["base_model"], provenance["checkpoint"]) == ("sliced", f"{STEM}_0.25.pt")
    assert f"`{STEM}_0.25.pt`" in card


# ------------------------------------------------------------------------------ 18: round_interval 1


def test_a_round_interval_1_run_records_1(bridge, run_dir, tmp_path):
    assert read_checkpoint(run_dir, sparsity=0.3).round_interval == 1
    result = bridge.convert(run_dir, tmp_path / "ri1.bin", sparsity=0.3)
    assert result.round_interval == 1 and load(tmp_path / "ri1.bin")["config"]["round_interval"] == 1


# ------------------------------------------------------------------------------ 19: make's wording


def test_make_convert_over_an_existing_output_says_overwrite_1(detached, tmp_path):
    out = tmp_path / "pruned_model.bin"
    out.write_bytes(b"earlier work")
    env = {**os.environ, "SLICEBRIDGE_TEST_SLICEGPT_ENV": detached}
    made = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "convert",
            f"SLICEGPT_MODEL={FIXTURE / 'sliced'}",
            f"OUTPUT={out}",
            f"ENV={detached}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert made.returncode != 0
    assert f"{out} already exists; pass OVERWRITE=1 to replace it" in made.stdout
    assert "--overwrite" not in made.stdout.replace("--overwrite-flag", "")
    plain = run_cli("convert", str(FIXTURE / "sliced"), "--output", str(out), "--env", detached)
    assert plain.returncode == 1 and "pass --overwrite to replace it" in plain.stdout
    assert out.read_bytes() == b"earlier work"
