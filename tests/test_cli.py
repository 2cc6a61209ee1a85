"""The user's surface end to end: the CLI, the module API and make convert, through real servers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.paths import FIXTURE, REPO
from helpers.run import run_cli, run_python

from slicebridge.model.binfile import load


@pytest.fixture
def three_checkpoints(tmp_path):
    """Two good checkpoints (one a run_slicegpt dir, one a bare .pt beside its config) and a bad one."""
    good_dir = tmp_path / "run1"
    shutil.copytree(FIXTURE / "sliced", good_dir)
    renamed = tmp_path / "run2"
    renamed.mkdir()
    for item in (FIXTURE / "sliced").iterdir():
        shutil.copy(item, renamed / item.name.replace("Meta-Llama-3-tiny", "Other-model"))
    bad = tmp_path / "run3"
    shutil.copytree(FIXTURE / "sliced", bad)
    pt = bad / "Meta-Llama-3-tiny_0.25.pt"
    pt.write_bytes(pt.read_bytes()[:1000])  # truncated
    return [good_dir, renamed / "Other-model_0.25.pt", bad]


def test_batch_goes_on_past_a_bad_checkpoint_and_exits_non_zero(slicegpt_env, three_checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    done = run_cli(
        "convert", *map(str, three_checkpoints), "--output-dir", str(out), "--env", str(slicegpt_env), "--json"
    )
    assert done.returncode == 1, done.stderr
    rows = json.loads(done.stdout)
    assert [r["ok"] for r in rows] == [True, True, False]
    assert "TruncatedCheckpoint" in rows[2]["error"]
    assert rows[1]["cache_hit"] is False  # a different file is a different model
    # run1 and run3 hold files of the same name: their outputs carry the run dir's name
    assert sorted(p.name for p in out.iterdir()) == ["Other-model_0.25.bin", "run1-Meta-Llama-3-tiny_0.25.bin"]
    for row in rows[:2]:
        assert load(row["output"])["method"] == "SliceGPT"


def test_batch_summary_table_and_verify(slicegpt_env, three_checkpoints, tmp_path):
    done = run_cli(
        "convert", str(three_checkpoints[0]), "--output-dir", str(tmp_path), "--verify", "--env", str(slicegpt_env)
    )
    assert done.returncode == 0, done.stderr
    header, rule, row, total = done.stdout.strip().splitlines()
    assert header.split()[:3] == ["checkpoint", "output", "seconds"] and "verify" in header
    assert "Meta-Llama-3-tiny_0.25.pt" in row and "pass" in row and row.endswith("ok")
    assert total == "1 of 1 succeeded"
    assert "load: 3/3 steps" in done.stderr  # plain progress lines, not a TTY


def test_seed_flags_and_a_sweep_dir(slicegpt_env, tmp_path):
    sweep = tmp_path / "sweep"
    for name in ("a", "b"):
        shutil.copytree(FIXTURE / "sliced", sweep / name)
    (tmp_path / "o").mkdir()
    done = run_cli(
        "convert",
        "--slicegpt_model",
        str(sweep),
        "--base_model",
        str(FIXTURE / "base"),
        "--output-dir",
        str(tmp_path / "o"),
        "--env",
        str(slicegpt_env),
        "--json",
    )
    rows = json.loads(done.stdout)
    assert done.returncode == 0 and len(rows) == 2
    # same file names in two runs: each output is named after its run dir
    assert sorted(Path(r["output"]).name for r in rows) == [
        "a-Meta-Llama-3-tiny_0.25.bin",
        "b-Meta-Llama-3-tiny_0.25.bin",
    ]
    assert rows[1]["cache_hit"] is False


def test_single_output_with_the_seed_script_flags(slicegpt_env, tmp_path):
    out = tmp_path / "pruned_model.bin"
    done = run_cli(
        "convert",
        "--slicegpt_model",
        str(FIXTURE / "sliced" / "Meta-Llama-3-tiny_0.25.pt"),
        "--base_model",
        str(FIXTURE / "base"),
        "--output",
        str(out),
        "--env",
        str(slicegpt_env),
    )
    assert done.returncode == 0, done.stderr
    assert load(out)["pruning_ratio"] == 0.25  # sparsity read from the file name


def test_usage_errors_are_one_sentence(slicegpt_env, three_checkpoints, tmp_path):
    done = run_cli(
        "convert",
        str(three_checkpoints[0]),
        str(three_checkpoints[1]),
        "--output",
        str(tmp_path / "x.bin"),
        "--env",
        str(slicegpt_env),
    )
    assert done.returncode == 2 and "use --output-dir" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.bin").exists()
    done = run_cli("convert", "--env", str(slicegpt_env))
    assert done.returncode == 2 and "name at least one checkpoint" in done.stderr


def test_verify_and_info_and_upgrade_commands(slicegpt_env, official_env, tmp_path):
    out = tmp_path / "m.bin"
    assert run_cli("convert", str(FIXTURE / "sliced"), "--output", str(out), "--env", str(slicegpt_env)).returncode == 0
    verified = run_cli("verify", str(out), "--checkpoint", str(FIXTURE / "sliced"), "--env", str(slicegpt_env))
    assert verified.returncode == 0 and "PASS" in verified.stdout
    seed = run_cli(
        "verify",
        str(FIXTURE / "seed_pruned_model.bin"),
        "--checkpoint",
        str(FIXTURE / "sliced"),
        "--env",
        str(slicegpt_env),
        "--json",
    )
    assert seed.returncode == 1 and json.loads(seed.stdout)["kind"] == "seed-bin"
    described = run_cli("info", str(FIXTURE / "sliced"), str(out), "--json")
    facts = json.loads(described.stdout)
    assert [f["sliced_width"] for f in facts] == [96, 96] and [f["num_layers"] for f in facts] == [4, 4]
    upgraded = run_cli(
        "upgrade",
        str(FIXTURE / "seed_pruned_model.bin"),
        str(tmp_path / "up.bin"),
        "--env",
        str(official_env),
        "--trust-pickle",
    )
    assert upgraded.returncode == 0, upgraded.stderr
    assert load(tmp_path / "up.bin")["method"] == "SliceGPT"


MODULE_API = r"""
import json, sys
from slicebridge import client
env, ckpt, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
first = client.convert(slicegpt_model=ckpt, output=out_dir + "/a.bin", env=env)
second = client.convert(ckpt, output=out_dir + "/b.bin", env=env)
report = client.verify(out_dir + "/a.bin", checkpoint=ckpt, env=env)
facts = client.info(out_dir + "/a.bin")
bridge = client.bridge_for(env)
print(json.dumps({"first_hit": first.cache_hit, "second_hit": second.cache_hit, "passed": report.passed,
                  "width": facts.sliced_width, "sparsity": first.sparsity,
                  "one_server": bridge is client.bridge_for(env), "owned": bridge.owns_server}))
"""


def test_module_api_shares_one_warm_server(slicegpt_env, tmp_path):
    done = run_python(MODULE_API, str(slicegpt_env), str(FIXTURE / "sliced"), str(tmp_path))
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {
        "first_hit": False,
        "second_hit": True,
        "passed": True,
        "width": 96,
        "sparsity": 0.25,
        "one_server": True,
        "owned": True,
    }


def test_make_convert_twice_reuses_one_detached_server(slicegpt_env, tmp_path):
    env = {**os.environ, "SLICEBRIDGE_TEST_SLICEGPT_ENV": str(slicegpt_env)}

    def make_convert(name):
        return subprocess.run(
            [
                "make",
                "--no-print-directory",
                "convert",
                f"SLICEGPT_MODEL={FIXTURE / 'sliced'}",
                f"OUTPUT={tmp_path / name}",
                f"ENV={slicegpt_env}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    try:
        first, second = make_convert("one.bin"), make_convert("two.bin")
        assert first.returncode == 0, first.stdout + first.stderr
        assert second.returncode == 0, second.stdout + second.stderr
        assert "builtin  " in first.stdout and "builtin (cached)" in second.stdout
        status = json.loads(run_cli("server", "status", "--json").stdout)
        assert len(status) == 1 and status[0]["state"] == "running"
    finally:
        run_cli("server", "stop", "--env", str(slicegpt_env))
    assert load(tmp_path / "two.bin")["method"] == "SliceGPT"


def test_demo_smoke(slicegpt_env, tmp_path):
    """make demo's main job, on the tiny preset: every family sliced, converted, exported, verified and
    described through one server."""
    done = run_cli("demo", "--env", str(slicegpt_env), "--preset", "tiny", "--workdir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "demo passed" in done.stdout
    names = ["llama-0.25", "llama-0.5", "opt-0.25", "phi2-0.25", "phi3-0.25"]
    table = [line.split() for line in done.stdout.splitlines()]
    rows = {cells[0]: cells for cells in table if cells and cells[0] in names}
    assert sorted(rows) == names
    assert all(row[1] == name.split("-")[0] and row.count("PASS") == 2 for name, row in rows.items()), rows
    assert "family                  OPT (opt)" in done.stdout  # the info table of the OPT .bin
    for name in names:
        assert (tmp_path / f"{name}.bin").is_file() and (tmp_path / f"{name}-hf" / "config.json").is_file()


def test_output_cut_short_by_the_reader_is_no_traceback():
    """`slicebridge info ... | head`: the reader leaves early (here before anything is written)."""
    shell = f"{sys.executable} -m slicebridge.client.cli info {FIXTURE / 'sliced'} {FIXTURE / 'seed_pruned_model.bin'}"
    done = subprocess.run(["bash", "-c", f"{shell} | true"], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
