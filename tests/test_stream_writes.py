"""How the big files of an output are written: ``atomic.StreamFile`` (one stream from the caller's memory,
writeback started behind it) and ``binfile.save_archive`` (torch.save with zlib summing the CRC-32s).

The archive must hold the CRC-32s torch itself would have written (``binfile.load`` checks them), in the central
directory and in each data descriptor; torch's process-wide CRC setting must stay as it is throughout (another
thread's torch.save keeps its sums), and a failed write must surface as its ``OSError``."""

from __future__ import annotations

import errno
import os
import stat
import zipfile

import dill
import pytest
import torch

from slicebridge.model import atomic, binfile
from slicebridge.model.atomic import StreamFile
from slicebridge.model.checkpoint import verify_archive_crcs
from slicebridge.model.errors import CorruptCheckpoint


def _contents() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "state": {
            "big": torch.randn(600, 1000, generator=generator).half(),  # 1.2 MB: summed aside
            "small": torch.arange(10),
            "scalar": torch.tensor(3.5),
            "empty": torch.zeros(0),
        },
        "note": "x" * 100,
    }


def _save(path, contents) -> None:
    with StreamFile(path) as stream:
        binfile.save_archive(contents, stream, dill)


def test_the_archive_holds_the_crcs_torch_would_write_and_torch_is_left_as_it_was(tmp_path, monkeypatch):
    read_back = []
    real_crc_of_range = binfile._crc_of_range
    monkeypatch.setattr(
        binfile, "_crc_of_range", lambda fd, start, size: read_back.append(size) or real_crc_of_range(fd, start, size)
    )
    contents = _contents()
    _save(tmp_path / "ours.pt", contents)
    assert read_back and max(read_back) < 1024**2  # the big record was summed while it was written, not read back
    torch.save(contents, tmp_path / "torch.pt", pickle_module=dill)
    assert torch.serialization.get_crc32_options() is True
    with zipfile.ZipFile(tmp_path / "ours.pt") as ours, zipfile.ZipFile(tmp_path / "torch.pt") as theirs:
        assert ours.testzip() is None  # zipfile sums every record against the central directory
        crcs = {record.filename.split("/", 1)[1]: record.CRC for record in ours.infolist()}
        expected = {record.filename.split("/", 1)[1]: record.CRC for record in theirs.infolist()}
    crcs.pop(".data/serialization_id"), expected.pop(".data/serialization_id")  # random per save
    assert crcs == expected
    verify_archive_crcs(tmp_path / "ours.pt")
    with open(tmp_path / "ours.pt", "rb") as handle, zipfile.ZipFile(handle) as archive:  # where each record holds it
        for record in archive.infolist():
            local = binfile._LOCAL_HEADER.unpack(
                os.pread(handle.fileno(), binfile._LOCAL_HEADER.size, record.header_offset)
            )
            after = record.header_offset + binfile._LOCAL_HEADER.size + local[1] + local[2] + record.file_size
            crc = record.CRC.to_bytes(4, "little")
            if record.flag_bits & 0x08:  # a data descriptor follows the bytes
                assert os.pread(handle.fileno(), 8, after) == b"PK\x07\x08" + crc, record.filename
            else:  # the local header holds it
                assert os.pread(handle.fileno(), 4, record.header_offset + 14) == crc, record.filename
    loaded = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert all(torch.equal(loaded["state"][k], v) for k, v in contents["state"].items())


def test_the_filled_in_crcs_catch_damage(tmp_path):
    path = tmp_path / "ours.pt"
    _save(path, _contents())
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the big record
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint):
        verify_archive_crcs(path)


def test_torchs_process_wide_crc_setting_stays_on_while_we_save(tmp_path, monkeypatch):
    """Another thread's torch.save during ours keeps its CRC-32s: only our save's zip writer leaves them out."""
    seen, real_write = [], binfile._SummingWriter.write
    monkeypatch.setattr(
        binfile._SummingWriter,
        "write",
        lambda self, data: seen.append(torch.serialization.get_crc32_options()) or real_write(self, data),
    )
    _save(tmp_path / "ours.pt", _contents())
    assert seen and all(seen)


def test_where_torch_cannot_leave_the_sums_out_torch_sums_them_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(binfile, "_save_unsummed", lambda *args: False)
    monkeypatch.setattr(binfile, "_fill_crcs", lambda *args: pytest.fail("nothing to fill in"))
    _save(tmp_path / "ours.pt", _contents())
    with zipfile.ZipFile(tmp_path / "ours.pt") as archive:
        assert archive.testzip() is None


def test_a_failed_write_is_raised_as_its_oserror(tmp_path, monkeypatch):
    real_write, calls = os.write, []

    def full_disk(fd, data):
        calls.append(fd)
        if len(calls) == 8:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError) as failed:
        _save(tmp_path / "ours.pt", _contents())
    assert failed.value.errno == errno.ENOSPC
    assert torch.serialization.get_crc32_options() is True


def test_a_stream_file_writes_in_pieces_from_the_callers_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "WRITEBACK_BYTES", 4096)
    tensor = torch.arange(10_000, dtype=torch.int32)
    with StreamFile(tmp_path / "out", mode=0o640) as stream:
        assert stream.write(b"head") == 4
        assert stream.write(tensor.numpy()) == 40_000
        assert stream.position == 40_004
    assert (tmp_path / "out").read_bytes() == b"head" + tensor.numpy().tobytes()
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o640 & ~_umask()
    with pytest.raises(FileExistsError):  # a fresh temporary only: never an existing file or a planted link
        StreamFile(tmp_path / "out")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
