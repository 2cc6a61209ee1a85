"""The adversarial review's findings (F1-F8), each reproduced against this tree's code.

F1 outputs over inputs; F2/F3 the inert pickle reader crashed or spun on small files; F4 FIFOs
wedged readers; F5 a CRC-damaged .bin loaded silently; F6 a killed server left its socket and
shm dir; F7 a lock on the shared tmp dir another user could hold; F8 INST/OBJ calls unreported.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers.paths import FIXTURE, REPO
from helpers.run import run_cli

from slicebridge.bridge.errors import ServerDied
from slicebridge.errors import SlicebridgeError

CHECKPOINT = FIXTURE / "sliced" / "Meta-Llama-3-tiny_0.25.pt"
BASE = FIXTURE / "base"


def _torch_zip(path: Path, pickle_bytes: bytes, compress: bool = False) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/version", "3\n")
    return path


def _glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


_DILL = b"X\x01\x00\x00\x00d" + _glob("dill._dill", "_load_type")  # makes the file read as the seed's format


def _unicode(text: bytes) -> bytes:
    return b"X" + len(text).to_bytes(4, "little") + text


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A writable copy of the fixture's checkpoint dir and base model: top/ck/*.pt, base/."""
    shutil.copytree(FIXTURE / "sliced", tmp_path / "top" / "ck")
    shutil.copytree(BASE, tmp_path / "base")
    for path in tmp_path.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return tmp_path


def _snapshot(*dirs: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for d in dirs for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------- F1


def test_f1_cli_export_over_the_checkpoint_dir_is_refused(workdir, slicegpt_env):
    ck = workdir / "top" / "ck"
    before = _snapshot(ck, workdir / "base")
    result = run_cli(
        "export",
        str(ck / CHECKPOINT.name),
        "--base_model",
        str(workdir / "base"),
        "--output",
        str(ck),
        "--overwrite",
        "--env",
        str(slicegpt_env),
        "--quiet",
    )
    assert result.returncode != 0, result.stdout
    assert "OutputCollision" in result.stderr or "refusing to start" in result.stderr, result.stderr
    assert _snapshot(ck, workdir / "base") == before


@pytest.mark.parametrize(
    "command,output",
    [
        ("export", "top/ck"),  # the checkpoint's dir
        ("export", "top"),  # a dir above the checkpoint
        ("export", "base"),  # the base model dir
        ("convert", "top/ck/Meta-Llama-3-tiny_0.25.pt"),  # the checkpoint itself
        ("convert", "link.bin"),  # a link to the checkpoint
        ("convert", "top/ck/Meta-Llama-3-tiny_0.25.json"),  # its slicing config
        ("convert", "base/tokenizer.json"),  # a file read from the base model dir
    ],
)
def test_f1_server_refuses_an_output_over_an_input(bridge, workdir, command, output):
    """API callers go straight to the server: it refuses before any work, and nothing is lost."""
    from slicebridge.model.guards import OutputCollision

    os.symlink(workdir / "top" / "ck" / CHECKPOINT.name, workdir / "link.bin")
    before = _snapshot(workdir / "top", workdir / "base")
    with pytest.raises(OutputCollision, match="refusing to start"):
        getattr(bridge, command)(
            workdir / "top" / "ck" / CHECKPOINT.name, workdir / output, base_model=workdir / "base", overwrite=True
        )
    assert _snapshot(workdir / "top", workdir / "base") == before
    assert bridge.echo("still serving") == "still serving"


def test_f1_batch_planning_refuses_outputs_over_inputs(workdir):
    from slicebridge.client.batch import outputs_for
    from slicebridge.model.guards import OutputCollision

    checkpoint = workdir / "top" / "ck" / CHECKPOINT.name
    for output in (workdir / "top" / "ck", workdir / "top", workdir / "base"):
        with pytest.raises(OutputCollision):
            outputs_for([checkpoint], str(output), None, "", base_model=str(workdir / "base"))
    assert outputs_for([checkpoint], None, str(workdir / "out"), ".bin", base_model=str(workdir / "base")) == [
        workdir / "out" / "Meta-Llama-3-tiny_0.25.bin"
    ]


# ------------------------------------------------------------------------------------- F2, F3


def _info_local(path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "slicebridge.client.cli", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def test_f2_a_million_deep_tuple_key_does_not_crash_info(tmp_path):
    deep = b"N" + b"\x85" * 1_000_000  # TUPLE1 a million times: a dict key whose hash() recursed in C
    path = _torch_zip(tmp_path / "deep_key.bin", b"\x80\x02}(" + deep + b"K\x01" + _DILL + b"u.")
    result = _info_local(path)
    assert result.returncode in (0, 1), (result.returncode, result.stderr[-2000:])  # -11 was SIGSEGV
    assert "Traceback" not in result.stderr


def test_f2_a_deep_stack_global_name_is_a_typed_error(tmp_path):
    from slicebridge.model.seed_bin import NotASeedModel, describe_seed_bin

    deep = b"N" + b"\x85" * 1_000_000
    pickle_bytes = b"\x80\x04}(" + _unicode(b"model") + deep + _unicode(b"a") + b"\x93" + _DILL + b"u."
    path = _torch_zip(tmp_path / "deep_sg.bin", pickle_bytes)
    with pytest.raises(NotASeedModel, match="not a readable torch file"):
        describe_seed_bin(path)
    result = _info_local(path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]


class _Model:
    pass


class _Config:
    pass


def _dag_config_bin(path: Path) -> Path:
    """A 1 KB seed-format file whose config value is lists sharing references: 40 ** 8 paths."""
    import pickle

    node: object = 1
    for _ in range(8):
        node = [node] * 40
    model, config = _Model(), _Config()
    config.__dict__ = {"hidden_size": 128, "vocab_size": 1000, "num_hidden_layers": 1, "x": node}
    model.__dict__ = {"config": config, "_modules": {}, "_parameters": {}}
    data = pickle.dumps({"model": model}, protocol=2)
    assert data.endswith(b"s.")
    return _torch_zip(path, data[:-1] + _DILL + b"s.")  # a dill name besides: read as the seed's format


def test_f3_shared_references_in_a_config_do_not_spin(tmp_path):
    path = _dag_config_bin(tmp_path / "dag_config.bin")
    assert path.stat().st_size < 4096
    result = _info_local(path, timeout=120)  # it ran for hours (a wedged server) before the fix
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_f3_a_deflate_bomb_is_refused_before_it_is_read(tmp_path):
    from slicebridge.model.pickle_scan import UnreadablePickle, pickle_bytes

    data = b"\x80\x02" + _glob("dill._dill", "_load_type") + b"N" * (64 * 2**20) + b"."
    path = _torch_zip(tmp_path / "bomb.bin", data, compress=True)
    assert path.stat().st_size < 2**20
    with pytest.raises(UnreadablePickle, match="over"):
        pickle_bytes(path)


def test_f3_the_reader_stops_at_its_opcode_cap(tmp_path):
    from slicebridge.model import pickle_scan

    data = b"\x80\x02" + b"N" * (pickle_scan.MAX_PICKLE_OPS + 10) + b"."  # stored: inside the byte cap
    path = _torch_zip(tmp_path / "many_ops.bin", data)
    with pytest.raises(pickle_scan.UnreadablePickle, match="opcodes"):
        pickle_scan.read_inert(path)


def test_f2_f3_the_server_survives_hostile_seed_files(bridge, tmp_path):
    deep = b"N" + b"\x85" * 1_000_000
    hostile = [
        _torch_zip(tmp_path / "deep_key.bin", b"\x80\x02}(" + deep + b"K\x01" + _DILL + b"u."),
        _dag_config_bin(tmp_path / "dag.bin"),
    ]
    from slicebridge.bridge import protocol

    pid = bridge.hello().pid
    for path in hostile:
        try:
            bridge.request("info", protocol.InfoArgs(path=str(path)), timeout=60)  # it spun for hours on dag.bin
        except ServerDied:  # it crashed (SIGSEGV) before the fix
            raise
        except SlicebridgeError:
            pass
    assert bridge.echo("alive") == "alive" and bridge.hello().pid == pid
    facts = bridge.info(FIXTURE / "seed_pruned_model.bin")
    assert facts.architecture


# ------------------------------------------------------------------------------------- F4


def test_f4_a_fifo_bin_is_refused_by_info_without_blocking(tmp_path):
    fifo = tmp_path / "y.bin"
    os.mkfifo(fifo)
    result = _info_local(fifo, timeout=60)  # it blocked forever opening the FIFO
    assert result.returncode == 1 and "FIFO" in result.stderr, result.stderr[-2000:]


def test_f4_a_fifo_checkpoint_is_refused_and_the_server_keeps_serving(bridge, tmp_path):
    from slicebridge.bridge import protocol
    from slicebridge.model.errors import NotASliceGPTCheckpoint

    fifo = tmp_path / "x_0.25.pt"
    os.mkfifo(fifo)
    shutil.copy(FIXTURE / "sliced" / "Meta-Llama-3-tiny_0.25.json", tmp_path / "x_0.25.json")
    args = protocol.ConvertArgs(slicegpt_model=str(fifo), output=str(tmp_path / "out.bin"), base_model=str(BASE))
    with pytest.raises(NotASliceGPTCheckpoint, match="not a regular file"):
        bridge.request("convert", args, timeout=60)  # the worker blocked forever opening the FIFO
    assert bridge.echo("alive") == "alive"


def test_f4_the_pickle_scanner_refuses_a_fifo(tmp_path):
    from slicebridge.model.pickle_scan import UnreadablePickle, diagnose_seed_bin, pickle_bytes

    fifo = tmp_path / "z.bin"
    os.mkfifo(fifo)
    with pytest.raises(UnreadablePickle, match="FIFO"):
        pickle_bytes(fifo)
    assert not diagnose_seed_bin(fifo).is_seed_format


# ------------------------------------------------------------------------------------- F5


def _flip_record_bytes(path: Path) -> str:
    """XOR 100 bytes in the middle of a stored tensor record, leaving the zip's structure intact."""
    with zipfile.ZipFile(path) as archive:
        records = [i for i in archive.infolist() if i.compress_type == zipfile.ZIP_STORED and i.file_size > 4096]
    record = records[len(records) // 2]
    with open(path, "r+b") as handle:
        handle.seek(record.header_offset)
        header = handle.read(30)
        start = (
            record.header_offset
            + 30
            + int.from_bytes(header[26:28], "little")
            + int.from_bytes(header[28:30], "little")
            + record.file_size // 2
        )
        handle.seek(start)
        damaged = bytes(b ^ 0x5A for b in handle.read(100))
        handle.seek(start)
        handle.write(damaged)
    return record.filename


def test_f5_a_crc_damaged_bin_is_refused_by_load_and_info(bridge, tmp_path):
    import slicebridge
    from slicebridge.client.artifact_info import info
    from slicebridge.model.errors import CorruptCheckpoint

    good = tmp_path / "good.bin"
    bridge.convert(CHECKPOINT, good, base_model=BASE)
    bad = tmp_path / "bad.bin"
    shutil.copy(good, bad)
    record = _flip_record_bytes(bad)
    with pytest.raises(CorruptCheckpoint, match=record):
        slicebridge.load(bad)
    with pytest.raises(CorruptCheckpoint, match=record):
        info(bad)
    assert slicebridge.load(good)["model"] is not None


# ------------------------------------------------------------------------------------- F6


def test_f6_a_killed_server_leaves_no_socket_and_no_shm_dir(slicegpt_env):
    from slicebridge.bridge.envs import find_env
    from slicebridge.bridge.launcher import start_server

    server = start_server(find_env(str(slicegpt_env)))
    socket = Path(server.info.endpoint[len("ipc://") :])
    shm_dir = Path(server.info.shm_dir)
    assert socket.exists() and shm_dir.is_dir()
    os.kill(server.pid, signal.SIGSTOP)  # frozen: it cannot clean up, so stop must kill it
    server.terminate(timeout=2)
    assert not server.alive()
    assert not socket.exists() and not shm_dir.exists()


def test_f6_the_sweep_removes_the_socket_of_a_dead_server(slicegpt_env):
    from slicebridge.bridge.envs import find_env
    from slicebridge.bridge.launcher import attach, start_server
    from slicebridge.bridge.leftovers import sweep_sockets

    for remove in ("attach", "sweep"):
        server = start_server(find_env(str(slicegpt_env)))
        socket = Path(server.info.endpoint[len("ipc://") :])
        shm_dir = Path(server.info.shm_dir)
        os.kill(server.pid, signal.SIGKILL)  # crashed: nothing of it runs any more
        server.popen.wait(timeout=30)
        assert socket.exists()
        if remove == "attach":  # finding a dead server's connection file removes what it left
            assert attach(server.conn_path, quiet=True) is None
            assert not shm_dir.exists()
        else:
            server.conn_path.unlink()
            assert sweep_sockets() >= 1
        assert not socket.exists()


# ------------------------------------------------------------------------------------- F7


_FIND_DIR = """
import sys, time
from pathlib import Path
from slicebridge.bridge.connection import private_tmp_dir
started = time.monotonic()
print(private_tmp_dir(Path(sys.argv[1]), "slicebridge-test"), round(time.monotonic() - started, 3))
"""


def test_f7_a_lock_held_on_the_shared_tmp_dir_costs_nothing(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o777)
    tmp.chmod(0o1777)
    (tmp / "slicebridge-test").mkdir(mode=0o777)  # squatted: open to others
    (tmp / "slicebridge-test").chmod(0o777)
    holder = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # what another user could do to the shared dir for as long as they like
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", _FIND_DIR, str(tmp)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(3)
        ]
        outputs = [run.communicate(timeout=60) for run in runs]
    finally:
        os.close(holder)
    assert all(run.returncode == 0 for run in runs), [err for _, err in outputs]
    chosen = {out.split()[0] for out, _ in outputs}
    waited = [float(out.split()[1]) for out, _ in outputs]
    assert len(chosen) == 1, chosen  # processes starting together agree on one dir
    assert max(waited) < 4.0, waited  # it waited the full 5 s for the lock before the fix
    assert [p.name for p in tmp.glob("slicebridge-test-*")] == [Path(next(iter(chosen))).name]
    assert (os.stat(next(iter(chosen))).st_mode & 0o777) == 0o700


# ------------------------------------------------------------------------------------- F8


@pytest.mark.parametrize(
    "payload",
    [
        b"(" + _unicode(b"echo pwned") + b"ios\nsystem\n",  # INST
        b"(" + _glob("os", "system") + _unicode(b"echo pwned") + b"o",  # OBJ
    ],
)
def test_f8_inst_and_obj_calls_are_reported(tmp_path, payload):
    from slicebridge.model.pickle_scan import referenced_globals
    from slicebridge.model.seed_bin import describe_seed_bin

    path = _torch_zip(tmp_path / "call.bin", b"\x80\x02}q\x00(" + _unicode(b"model") + payload + _DILL + b"u.")
    assert "os.system" in referenced_globals(path)
    facts = describe_seed_bin(path)
    assert any("would also call os.system" in note for note in facts.notes), facts.notes
    assert "system" not in (facts.architecture or "")
    assert not list(tmp_path.glob("pwned*"))
