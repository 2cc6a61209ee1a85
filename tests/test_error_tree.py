"""One error tree: everything slicebridge raises is a ``SlicebridgeError``, so the CLI, a batch and
a caller catch that one type, and errors raised in the server are caught by their own type.

Each test reproduces a bug that a separate error family caused (``ExportError`` and
``CheckpointError`` did not derive from ``SlicebridgeError``; the client knew only the remote
error types of three modules), against a real server and the real CLI.
"""

from __future__ import annotations

import json
import shutil

import pytest
from helpers.paths import FIXTURE
from helpers.run import run_cli

from slicebridge import CheckpointError, ExportError, RemoteError, SlicebridgeError, SparsityMismatch

CHECKPOINT = FIXTURE / "sliced"


@pytest.fixture(scope="module")
def export_dir(bridge, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "tiny-export"
    bridge.export(CHECKPOINT, out)
    return out


def test_info_on_an_export_without_weights_says_so_in_a_sentence(export_dir, tmp_path):
    """It printed ExportError's traceback: ExportError was not one of the CLI's user errors."""
    broken = tmp_path / "no-weights"
    shutil.copytree(export_dir, broken)
    (broken / "model.safetensors").unlink()
    done = run_cli("info", str(broken))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(f"slicebridge: error: {broken}: ") and "model.safetensors" in done.stderr


def test_info_describes_every_path_it_can_and_names_the_ones_it_cannot(export_dir, tmp_path):
    """``info bad.pt good_dir`` stopped at bad.pt (a CheckpointError ended the command)."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file at all")
    done = run_cli("info", str(bad), str(export_dir), "--json")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"slicebridge: error: {bad}: " in done.stderr
    described = json.loads(done.stdout)
    assert [item["path"] for item in described] == [str(export_dir)]


def test_an_export_error_raised_in_the_server_is_caught_as_export_error(bridge, tmp_path):
    """It arrived as a plain RemoteError: only three modules' error types were known to the client."""
    with pytest.raises(ExportError) as raised:
        bridge.export(CHECKPOINT, tmp_path / "out", max_shard_size=-1)
    assert isinstance(raised.value, RemoteError) and isinstance(raised.value, SlicebridgeError)
    assert str(raised.value) == "max_shard_size must be positive, not -1"
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_error_from_the_server_is_a_slicebridge_error_of_its_own_type(bridge, tmp_path):
    with pytest.raises(SparsityMismatch) as raised:
        bridge.convert(CHECKPOINT, tmp_path / "x.bin", sparsity=0.6)
    assert isinstance(raised.value, CheckpointError) and isinstance(raised.value, SlicebridgeError)


def test_a_batch_goes_on_after_an_item_fails_with_any_slicebridge_error(slicegpt_env, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file at all")
    good = tmp_path / "run"
    shutil.copytree(CHECKPOINT, good)
    done = run_cli(
        "convert", str(bad), str(good), "--output-dir", str(tmp_path / "out"), "--env", str(slicegpt_env), "--json"
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    rows = {row["checkpoint"].rsplit("/", 1)[-1]: row for row in json.loads(done.stdout)}
    assert rows["bad.pt"]["ok"] is False and rows["bad.pt"]["error"]
    assert rows["Meta-Llama-3-tiny_0.25.pt"]["ok"] is True
