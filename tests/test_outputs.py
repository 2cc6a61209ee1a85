"""Outputs, paths and the errors users see, against real servers: every output lands where the
user meant it, whole or not at all, and failures read as one typed sentence.

Batch outputs whose names coincide, two writers of one export directory, ``--overwrite`` through
a symlink, ``link/../x`` and ``dir/`` paths, a full disk (a 1 MiB tmpfs in a private mount
namespace) and the rendering of errors raised in the server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import traceback
from pathlib import Path

import pytest
from helpers.paths import FIXTURE
from helpers.run import WRITE_ONE, run_cli
from helpers.waiting import interrupt_main_when, partials, wait_for

from slicebridge import Bridge
from slicebridge.bridge.errors import RemoteError
from slicebridge.model import atomic, request_scope
from slicebridge.model.atomic import OutputExists
from slicebridge.model.binfile import load
from slicebridge.model.errors import SparsityMismatch

CHECKPOINT = FIXTURE / "sliced"
PT_NAME = "Meta-Llama-3-tiny_0.25.pt"


# --------------------------------------------------------------------------- batch outputs (item 14)


def test_batch_inputs_with_equal_derived_names_get_distinct_outputs(slicegpt_env, tmp_path):
    for sweep in ("a", "b"):  # a/run/NAME.pt and b/run/NAME.pt: equal names, equal run dir names
        shutil.copytree(CHECKPOINT, tmp_path / sweep / "run")
    out = tmp_path / "out"
    done = run_cli(
        "convert",
        str(tmp_path / "a" / "run"),
        str(tmp_path / "b" / "run"),
        "--output-dir",
        str(out),
        "--overwrite",
        "--env",
        str(slicegpt_env),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [Path(r["output"]).name for r in rows] == [
        "a-run-Meta-Llama-3-tiny_0.25.bin",
        "b-run-Meta-Llama-3-tiny_0.25.bin",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(Path(r["output"]).name for r in rows)  # two files
    assert all(load(r["output"])["method"] == "SliceGPT" for r in rows)


def test_a_batch_whose_output_would_replace_an_input_is_refused_before_starting(slicegpt_env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(CHECKPOINT, run)
    before = (run / PT_NAME).read_bytes()
    done = run_cli(
        "convert", str(run / PT_NAME), "--output", str(run / PT_NAME), "--overwrite", "--env", str(slicegpt_env)
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "refusing to start" in done.stderr and str(run / PT_NAME) in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert (run / PT_NAME).read_bytes() == before


def test_one_checkpoint_named_two_ways_is_converted_once(slicegpt_env, tmp_path):
    (tmp_path / "alias").symlink_to(CHECKPOINT)
    out = tmp_path / "out"
    done = run_cli(
        "convert",
        str(CHECKPOINT / PT_NAME),
        str(tmp_path / "alias" / PT_NAME),
        "--output-dir",
        str(out),
        "--env",
        str(slicegpt_env),
        "--json",
    )
    rows = json.loads(done.stdout)
    assert done.returncode == 0 and len(rows) == 1, done.stderr
    assert [p.name for p in out.iterdir()] == ["Meta-Llama-3-tiny_0.25.bin"]


# --------------------------------------------------------------------------- paths (item 18)


def test_dotdot_after_a_symlink_is_resolved_as_the_shell_does(bridge, tmp_path):
    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    result = bridge.convert(CHECKPOINT, f"{tmp_path}/link/../y.bin")
    assert (tmp_path / "real" / "y.bin").is_file() and not (tmp_path / "y.bin").exists()
    assert result.output == str(tmp_path / "real" / "y.bin")


def test_a_trailing_slash_means_a_directory_made_like_mkdir_p(slicegpt_env, bridge, tmp_path):
    done = run_cli("convert", str(CHECKPOINT), "--output", f"{tmp_path}/converted/", "--env", str(slicegpt_env))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "converted").is_dir()
    assert load(tmp_path / "converted" / "Meta-Llama-3-tiny_0.25.bin")["method"] == "SliceGPT"
    exported = bridge.export(CHECKPOINT, f"{tmp_path}/deep/exported/")
    assert exported.output == str(tmp_path / "deep" / "exported" / "Meta-Llama-3-tiny_0.25")
    assert (tmp_path / "deep" / "exported" / "Meta-Llama-3-tiny_0.25" / "config.json").is_file()


def test_an_output_directory_that_cannot_be_made_is_one_sentence(slicegpt_env, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    done = run_cli(
        "convert", str(CHECKPOINT), "--output-dir", str(tmp_path / "file" / "sub"), "--env", str(slicegpt_env)
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("slicebridge: error: cannot create the output directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# --------------------------------------------------------------------------- directory publish (item 17)


def test_overwrite_through_a_symlink_to_a_directory_replaces_its_target_and_leaves_nothing(bridge, tmp_path):
    bridge.export(CHECKPOINT, tmp_path / "v1")
    (tmp_path / "v1" / "stale.txt").write_text("from before")
    (tmp_path / "latest").symlink_to("v1")
    bridge.export(CHECKPOINT, tmp_path / "latest", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "v1"]  # no .latest.*.partial
    assert (tmp_path / "latest").is_symlink() and os.readlink(tmp_path / "latest") == "v1"
    assert not (tmp_path / "v1" / "stale.txt").exists() and (tmp_path / "v1" / "config.json").is_file()


def test_concurrent_directory_publishes_lose_with_output_exists(tmp_path):
    """Writers released together at the publish step: one wins, every other one gets OutputExists."""
    writers = 6
    for round_ in range(15):
        target = tmp_path / f"export{round_}"
        barrier = threading.Barrier(writers)
        outcomes = []

        def write(index, target=target, barrier=barrier, outcomes=outcomes):
            try:
                with (
                    request_scope.serving(lambda: None, lambda path: barrier.wait(timeout=30)),
                    atomic.atomic_directory(target) as tmp,
                ):
                    (tmp / "writer.txt").write_text(str(index))
                outcomes.append("won")
            except Exception as exc:  # noqa: BLE001 - the type is what is checked
                outcomes.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        lost = [o for o in outcomes if o != "won"]
        assert outcomes.count("won") == 1 and all(o.startswith("OutputExists: ") for o in lost), outcomes
        assert [p.name for p in target.iterdir()] == ["writer.txt"]
    assert partials(tmp_path) == []


def test_two_servers_exporting_to_one_directory_one_wins_the_other_gets_output_exists(slicegpt_env, tmp_path):
    out = tmp_path / "shared-export"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITE_ONE, str(slicegpt_env), "export", str(CHECKPOINT), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sorted(r["won"] for r in results) == [False, True]
    assert (out / "config.json").is_file() and partials(tmp_path) == []


def test_ctrl_c_mid_publish_of_an_export_leaves_nothing(slicegpt_env, tmp_path, monkeypatch):
    monkeypatch.setenv("SLICEBRIDGE_DEBUG_FAULTS", "publish:pause=60")
    with Bridge(env=str(slicegpt_env), attach=False, debug_ops=True) as paused:
        interrupt_main_when(lambda: partials(tmp_path))
        with pytest.raises(KeyboardInterrupt):
            paused.export(CHECKPOINT, tmp_path / "exported")
        assert wait_for(lambda: not paused.stats().busy, 10)
        assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- errors users see (item 20)


FULL_DISK = r"""
import json, sys
from slicebridge import Bridge
with Bridge(env=sys.argv[1], attach=False) as b:
    seen = {}
    for op, out in (("export", sys.argv[3] + "/exported"), ("convert", sys.argv[3] + "/model.bin")):
        try:
            getattr(b, op)(sys.argv[2], out)
            seen[op] = None
        except Exception as exc:
            seen[op] = {"types": [c.__name__ for c in type(exc).__mro__], "message": str(exc)}
    seen["alive"] = b.echo("still here") == "still here"
    print(json.dumps(seen))
"""


def test_a_full_disk_during_export_is_a_typed_one_sentence_error_and_leaves_nothing(slicegpt_env, tmp_path):
    """The disk is a 1 MiB tmpfs in a private mount namespace; the client and its server run inside it."""
    small = tmp_path / "small"
    small.mkdir()
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"this kernel refuses a private tmpfs mount: {probe.stderr.strip()}")
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    inside = (
        f"mount -t tmpfs -o size=1m tmpfs {small} && {sys.executable} {script} {slicegpt_env} "
        f"{CHECKPOINT} {small} && ls -A {small}"
    )
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", inside], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    *_, report, listing = done.stdout.strip().splitlines() + [""]
    seen = json.loads(report)
    for op in ("export", "convert"):  # export's weights are 1.7 MB; so is the .bin
        error = seen[op]
        assert {"DiskFull", "OutputError", "RemoteError"} <= set(error["types"]), error
        assert error["message"].startswith("no space left on the device while writing")
        assert error["message"].endswith("nothing was written") and "\n" not in error["message"]
        assert "SafetensorError" not in error["message"] and "DiskFull" not in error["message"]
    assert seen["alive"] is True
    assert listing == ""  # nothing left on the full disk, not even a temporary


def test_a_server_error_names_its_type_once(bridge, tmp_path):
    with pytest.raises(SparsityMismatch) as info:
        bridge.convert(CHECKPOINT, tmp_path / "m.bin", sparsity=0.3)
    rendered = "".join(traceback.format_exception_only(type(info.value), info.value))
    assert rendered.count("SparsityMismatch") == 1, rendered
    assert str(info.value).startswith(f"{CHECKPOINT.resolve()} has no checkpoint for sparsity 0.3")
    assert repr(info.value).count("SparsityMismatch") == 1
    with pytest.raises(RemoteError) as untyped:  # a type the client has no class for keeps its name
        bridge.request("fail", {"kind": "ValueError", "message": "bad thing"})
    assert str(untyped.value) == "ValueError: bad thing"
    with pytest.raises(OutputExists) as exists:
        bridge.convert(CHECKPOINT, tmp_path / "m.bin", sparsity=0.25)
        bridge.convert(CHECKPOINT, tmp_path / "m.bin", sparsity=0.25)
    assert not str(exists.value).startswith("OutputExists")


def test_the_cli_prints_a_server_error_as_one_sentence_like_a_local_one(slicegpt_env, bridge, tmp_path):
    artifact = bridge.convert(CHECKPOINT, tmp_path / "m.bin").output
    bad = tmp_path / "bad-run"
    shutil.copytree(CHECKPOINT, bad)
    (bad / PT_NAME).write_bytes((CHECKPOINT / PT_NAME).read_bytes()[:1000])
    done = run_cli("verify", artifact, "--checkpoint", str(bad), "--env", str(slicegpt_env))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"slicebridge: error: {bad / PT_NAME}") and "cut short" in done.stderr
    assert "TruncatedCheckpoint" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
