"""Server lifecycle and identity under attack and fault: which env a server is of, concurrent
starts, reused pids, exposed or lost connection files, a squatted runtime dir, runaway logs.

Every test starts real detached or owned servers in the stand-in env (and its second venv)
and looks at the real processes in /proc.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers.paths import FIXTURE
from helpers.run import run_cli, run_python

from slicebridge import Bridge
from slicebridge.bridge.connection import (
    ConnectionInfo,
    detached_connection_path,
    write_connection_file,
)
from slicebridge.bridge.envs import reported_prefix
from slicebridge.bridge.errors import ServerEnvMismatch
from slicebridge.bridge.launcher import LOGS_KEPT
from slicebridge.bridge.signing import new_key
from slicebridge.processes import pid_alive, process_start_time

CLI = [sys.executable, "-m", "slicebridge.client.cli"]


def server_pids(runtime: str | None = None) -> set[int]:
    """Live slicebridge server processes of a runtime dir (default: this session's), from /proc."""
    runtime = (runtime or os.environ["SLICEBRIDGE_RUNTIME_DIR"]).encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"slicebridge.server.main" in cmdline and runtime in cmdline and state not in ("Z", "X"):
            pids.add(int(entry.name))
    return pids


def wait_gone(pids, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(pid_alive(p) for p in pids)


def start_json(env: Path, environ: dict | None = None) -> dict:
    done = subprocess.run(
        [*CLI, "server", "start", "--env", str(env), "--json"], capture_output=True, text=True, timeout=180, env=environ
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(autouse=True)
def no_servers_left():
    yield
    run_cli("server", "stop", "--all")
    assert wait_gone(server_pids()), "a server of this test is still running after stop --all"


# ---------------------------------------------------------------- item 3: one server per env


def test_venvs_of_one_interpreter_get_servers_of_their_own(slicegpt_env, official_env):
    assert os.path.realpath(slicegpt_env / "bin" / "python") == os.path.realpath(official_env / "bin" / "python")
    standin = start_json(slicegpt_env)
    official = start_json(official_env)
    assert official["started"] is True and official["pid"] != standin["pid"]
    assert official["connection_file"] != standin["connection_file"]
    assert official["prefix"] == os.path.realpath(official_env)
    with Bridge(env=str(slicegpt_env)) as a, Bridge(env=str(official_env)) as b:
        assert not a.owns_server and a.server_hello.pid == standin["pid"]
        assert not b.owns_server and b.server_hello.pid == official["pid"]
        assert os.path.realpath(a.server_hello.prefix) == os.path.realpath(slicegpt_env)
        assert os.path.realpath(b.server_hello.prefix) == os.path.realpath(official_env)
        assert a.server_hello.versions["slicegpt"] is None  # each server has its own env's packages
        assert b.server_hello.versions["slicegpt"] is not None


def test_a_connection_file_naming_a_server_of_another_env_is_refused(slicegpt_env, official_env):
    standin = start_json(slicegpt_env)
    official = start_json(official_env)
    shutil.copy(official["connection_file"], standin["connection_file"])  # e.g. a stale or planted file
    with pytest.raises(ServerEnvMismatch, match="runs in the env .*slicegpt-official, not in"):
        Bridge(env=str(slicegpt_env)).start()
    done = run_cli("hello", "--env", str(slicegpt_env))
    assert done.returncode == 1 and "refusing it" in done.stderr and "Traceback" not in done.stderr
    assert pid_alive(official["pid"])  # refusing is not stopping someone's server
    # the stand-in's server lost its file to the copy; stop --all still finds it (no_servers_left)


# ---------------------------------------------------------------- item 6: concurrent starts


def test_concurrent_starts_make_one_server_and_stop_all_stops_every_one(slicegpt_env):
    starts = [
        subprocess.Popen(
            [*CLI, "server", "start", "--env", str(slicegpt_env), "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    results = []
    for proc in starts:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert len({r["pid"] for r in results}) == 1
    assert sorted(r["started"] for r in results) == [False, False, True]
    assert server_pids() == {results[0]["pid"]}
    status = json.loads(run_cli("server", "status", "--json").stdout)
    assert [s["pid"] for s in status if s["state"] == "running"] == [results[0]["pid"]]
    stopped = run_cli("server", "stop", "--all")
    assert stopped.returncode == 0 and f"stopped: pid {results[0]['pid']}" in stopped.stdout
    assert wait_gone(server_pids())


def test_stop_all_finds_a_server_whose_connection_file_was_lost(slicegpt_env):
    info = start_json(slicegpt_env)
    Path(info["connection_file"]).unlink()
    stopped = run_cli("server", "stop", "--all")
    assert stopped.returncode == 0 and f"stopped: pid {info['pid']}" in stopped.stdout
    assert wait_gone([info["pid"]])


# ---------------------------------------------------------------- item 7: reused pids


def test_a_reused_pid_is_never_signalled_and_convert_starts_a_fresh_server(slicegpt_env, tmp_path):
    python = str(slicegpt_env / "bin" / "python")
    unrelated = subprocess.Popen(["sleep", "300"])  # what the pid of a SIGKILLed server now names
    try:
        fake = ConnectionInfo(
            key=new_key(),
            endpoint=f"ipc://{tmp_path}/gone.sock",
            env=str(slicegpt_env),
            python=python,
            prefix=reported_prefix(python),
            detached=True,
            ready=True,
            pid=unrelated.pid,
            server_start=str(int(process_start_time(unrelated.pid)) - 1),
        )
        conn_path = detached_connection_path(python)
        write_connection_file(fake, conn_path)
        stopped = run_cli("server", "stop", "--env", str(slicegpt_env))
        assert stopped.returncode == 1 and "no slicebridge server is running" in stopped.stderr
        assert unrelated.poll() is None

        write_connection_file(fake, conn_path)
        done = run_cli(
            "convert",
            "--slicegpt_model",
            str(FIXTURE / "sliced"),
            "--output",
            str(tmp_path / "m.bin"),
            "--env",
            str(slicegpt_env),
            "--json",
        )
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "m.bin").is_file()
        assert "stopped answering" not in done.stderr

        write_connection_file(fake, conn_path)
        stopped_all = run_cli("server", "stop", "--all")
        assert stopped_all.returncode == 0 and f"pid {unrelated.pid}" not in stopped_all.stdout
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()


# ---------------------------------------------------------------- item 21: an exposed connection file


def test_an_exposed_connection_file_gets_its_server_stopped_not_forgotten(slicegpt_env):
    first = start_json(slicegpt_env)
    os.chmod(first["connection_file"], 0o644)
    status = json.loads(run_cli("server", "status", "--json").stdout)
    assert [(s["state"], s["pid"]) for s in status] == [("refused", first["pid"])]
    second = start_json(slicegpt_env)  # takes the file's place: the exposed one must not live on unseen
    assert second["started"] is True and wait_gone([first["pid"]])
    assert stat.S_IMODE(os.stat(second["connection_file"]).st_mode) == 0o600

    os.chmod(second["connection_file"], 0o644)
    stopped = run_cli("server", "stop", "--all")
    assert stopped.returncode == 0 and f"stopped: pid {second['pid']}" in stopped.stdout
    assert wait_gone([second["pid"]])
    assert server_pids() == set()


# ---------------------------------------------------------------- item 4: a squatted runtime dir


def _environ_without_runtime_dir(tmp: Path) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in ("SLICEBRIDGE_RUNTIME_DIR", "XDG_RUNTIME_DIR")}
    environ["TMPDIR"] = str(tmp)  # never the real /tmp/slicebridge-<uid> of anyone else's tests
    return environ


@pytest.fixture
def private_tmp():
    tmp = Path(tempfile.mkdtemp(prefix="sbh-", dir="/tmp"))  # short: ipc socket paths live in it
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def squat(tmp: Path, how: str) -> Path:
    squatted = tmp / f"slicebridge-{os.getuid()}"
    if how == "symlink":
        (tmp / "elsewhere").mkdir(mode=0o700)
        squatted.symlink_to(tmp / "elsewhere")
        return squatted
    squatted.mkdir()
    if how == "open":
        squatted.chmod(0o777)
    else:  # another user's
        os.chown(squatted, 65534, 65534)
    return squatted


@pytest.mark.parametrize("how", ["open", "symlink", "foreign"])
def test_a_squatted_default_runtime_dir_is_replaced_by_a_private_one_found_again(private_tmp, how):
    squatted = squat(private_tmp, how)
    code = "from slicebridge.bridge.connection import runtime_dir; print(runtime_dir())"
    first = run_python(code, env=_environ_without_runtime_dir(private_tmp))
    second = run_python(code, env=_environ_without_runtime_dir(private_tmp))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    chosen = Path(first.stdout.strip())
    assert second.stdout.strip() == str(chosen) and chosen.parent == private_tmp
    assert chosen.name.startswith(f"slicebridge-{os.getuid()}-") and chosen != squatted
    st = os.lstat(chosen)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert f"{squatted} " in first.stderr and f"using the private directory {chosen}" in first.stderr


def test_a_squatted_runtime_dir_does_not_stop_servers_from_being_found(slicegpt_env, private_tmp):
    squatted = squat(private_tmp, "open")
    environ = _environ_without_runtime_dir(private_tmp)
    try:
        started = start_json(slicegpt_env, environ)
        assert started["started"] is True and Path(started["connection_file"]).parent.parent.parent == private_tmp
        again = start_json(slicegpt_env, environ)  # a later process finds it
        assert again["started"] is False and again["pid"] == started["pid"]
        assert list(squatted.iterdir()) == []
    finally:
        subprocess.run([*CLI, "server", "stop", "--all"], capture_output=True, timeout=120, env=environ)
    assert wait_gone(server_pids(str(private_tmp)))


def test_an_explicit_runtime_dir_that_is_not_ours_is_still_refused(private_tmp):
    foreign = squat(private_tmp, "foreign")
    done = run_cli("server", "status", env={"SLICEBRIDGE_RUNTIME_DIR": str(foreign)})
    assert done.returncode == 1 and "belongs to uid 65534" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- item 22: logs


def test_a_runaway_log_is_cut_and_old_logs_are_pruned(slicegpt_env, monkeypatch, request):
    # A runtime dir of its own: the session's holds the logs of every server earlier tests stopped,
    # which are newer than the old ones planted here and would rightly prune them all.
    runtime = Path(tempfile.mkdtemp(prefix="sbl-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(runtime, ignore_errors=True))
    monkeypatch.setenv("SLICEBRIDGE_RUNTIME_DIR", str(runtime))
    logs = runtime / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    now = time.time()
    for i in range(3 * LOGS_KEPT):
        old = logs / f"server-old{i:03d}.log"
        old.write_text("an old server's log\n")
        os.utime(old, (now - 1000 + i, now - 1000 + i))
    cap = 64 * 1024
    monkeypatch.setenv("SLICEBRIDGE_LOG_MAX_BYTES", str(cap))
    with Bridge(env=str(slicegpt_env), attach=False) as b:
        kept = sorted(p.name for p in logs.glob("server-old*.log"))
        assert len(kept) <= LOGS_KEPT and f"server-old{3 * LOGS_KEPT - 1:03d}.log" in kept
        log_path = Path(b.server.info.log_path)
        assert log_path.is_file()
        with open(log_path, "a") as flood:  # whatever writes to the server's stdout/stderr (a C library, say)
            for i in range(20000):
                flood.write(f"flood line {i:06d} " + "x" * 40 + "\n")
        deadline = time.monotonic() + 20
        while log_path.stat().st_size > cap and time.monotonic() < deadline:
            time.sleep(0.1)
        assert log_path.stat().st_size <= cap
        text = log_path.read_text()
        assert "[slicebridge: log cut to its last" in text and "flood line 019999" in text
        assert b.echo("still serving") == "still serving"
