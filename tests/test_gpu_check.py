"""The GPU check (issue 16): its dry run on the CPU, and the device tests ``bench/gpu_check.sh`` runs on a GPU.

The dry run is ``bench/gpu_check.py --dry-run`` as ``bench/gpu_check.sh --cpu-dry-run`` runs it: every section on
the CPU with tiny models, each check held and each figure reported with its command. Its timings are never asserted
(the machine is shared), only that every row is there and what each check says.

The tests marked ``gpu`` need CUDA and skip without it (``pytest -m gpu``: on the GPU machine ``gpu_check.sh`` runs
them): every family through a server on ``cuda:0`` in fp16 and bf16, each artifact loaded on the CPU here; a CUDA
tensor through the wire; a model that does not fit on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.paths import REPO, slicegpt_env_path

from slicebridge.bridge.errors import RemoteOutOfMemory
from slicebridge.model.dense import make_dense_preset
from slicebridge.model.slicing import slice_model

FAMILIES = ("llama", "opt", "phi2", "phi3")
DTYPES = ("float16", "bfloat16")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh)")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """gpu.json, gpu.md and gpu_check.log of one ``bench/gpu_check.sh --cpu-dry-run`` (its envs made from the prepared
    wheels when ``bench/gpu_prepare.sh`` has been run here, else ``.envs`` as they are)."""
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    done = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-dry-run", str(out)],
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "SLICEBRIDGE_TEST_SLICEGPT_ENV": str(slicegpt_env_path())},
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text(), (out / "gpu_check.log").read_text()


def test_the_dry_run_holds_every_check_with_every_family_on_the_device(dry_run):
    data, _, log = dry_run
    assert data["ok"] and data["checks"] == dict.fromkeys(data["checks"], True) and len(data["checks"]) == 6
    assert data["meta"]["dry_run"] and data["meta"]["device"] == "cpu"
    assert data["envs"]["slicegpt"]["transformers"] == "4.41.0" and data["envs"]["base"]["transformers"] >= "5"
    rows = {(row["family"], row["dtype"]): row for row in data["families"]}
    assert set(rows) == {(family, dtype) for family in FAMILIES for dtype in DTYPES}
    for (_, dtype), row in rows.items():
        assert row["server_device"] == ["cpu", "cpu"] and row["artifact_dtype"] == [dtype, dtype], row
        for figures in row["verify"].values():
            assert figures["passed"] and figures["artifact_device"] == "cpu" and figures["compared_dtype"] == dtype
    sliced = {row["family"]: row for row in data["slicing"]}
    assert set(sliced) == set(FAMILIES)
    assert all(
        row["device"] == "cpu" and row["verified"] == "pass" and row["ppl_sliced"] > 1 for row in sliced.values()
    )
    assert not Path(data["meta"]["work"]).exists(), "the run's scratch outputs were left behind"
    for side in ("base", "slicegpt"):  # the script printed both envs' versions before the tests
        assert log.index(f"{side} env: ") < log.index("] the tests marked gpu")
    assert data["tests"]["status"] == 0 and " passed" in data["tests"]["summary"]


def test_the_dry_run_converts_cold_then_warm_and_a_model_that_does_not_fit_is_typed_and_freed(dry_run):
    data, _, _ = dry_run
    scale = {row["model"]: row for row in data["scale"]}
    assert list(scale) == ["1b", "7b"]
    for row in scale.values():
        assert not row["cold"]["cache_hit"] and row["warm"]["cache_hit"] and row["model_bytes"] > 0
        assert row["cold"]["server_timings"]["load"] > 0 and row["warm"]["server_timings"]["load"] == 0
    assert scale["7b"]["verify"]["passed"] and "verify" not in scale["1b"]
    does_not_fit = data["does_not_fit"]
    assert does_not_fit["error"]["remote_type"] == "OutOfMemory"
    assert does_not_fit["error"]["type"] == "RemoteOutOfMemory" and "host memory" in does_not_fit["error"]["message"]
    assert does_not_fit["freed"] and not does_not_fit["output_left"]
    assert does_not_fit["then_warm_convert"]["cache_hit"] and len(does_not_fit["cached_entries"]) == 1


def test_the_dry_run_report_gives_each_figure_with_its_command(dry_run):
    _, markdown, _ = dry_run
    assert markdown.startswith("# GPU check: the warm server on cpu\n") and "**Dry run on the CPU**" in markdown
    for title in ("The two envs", "Every family", "Slicing on the device", "Converting at scale", "does not fit"):
        assert f"## {title}" in markdown or title in markdown, title
    for call in (
        "bench/gpu_check.py --env ENV --envs-only",
        "`bridge.convert(pt, bin, device='cpu', dtype=D)`",
        "`bridge.verify(artifact, pt, device='cpu', artifact_device='cpu')`",
        "`bridge.slice(dense, [0.25], out, calibration=text, device='cpu', verify=True,",
        "`bridge.convert(pt, bin, device='cpu', overwrite=True)` twice",
        "`bridge.verify(bin, pt, device='cpu', artifact_device='cpu')`: PASS",
        "`bridge.convert(pt, bin, device='cpu', dtype='float32')`",
    ):
        assert call in markdown, call
    # a row per family and dtype, per family sliced, per scale, and the does-not-fit check's
    assert markdown.count("| ok |") == len(FAMILIES) * len(DTYPES) + len(FAMILIES) + 2 + 1 and "FAIL" not in markdown


# ------------------------------------------------------------------------------------------------ on a GPU


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Each family's tiny dense model sliced at 0.25 by our maker: family -> .pt."""
    root = tmp_path_factory.mktemp("families")
    runs = {}
    for family in FAMILIES:
        dense = make_dense_preset(root / f"{family}-dense", "tiny", family)
        (runs[family],) = slice_model(dense, root / f"{family}-run", sparsity=0.25).glob("*.pt")
    return runs


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_family_converts_exports_and_verifies_with_the_server_on_the_gpu(bridge, tiny_runs, tmp_path, dtype):
    for family, checkpoint in tiny_runs.items():
        converted = bridge.convert(checkpoint, tmp_path / f"{family}.bin", device="cuda:0", dtype=dtype)
        exported = bridge.export(checkpoint, tmp_path / family, device="cuda:0", dtype=dtype)
        assert (converted.device, converted.dtype, exported.device, exported.dtype) == ("cuda:0", dtype) * 2
        for artifact in (tmp_path / f"{family}.bin", tmp_path / family):
            report = bridge.verify(artifact, checkpoint, device="cuda:0", artifact_device="cpu")
            assert report.passed, report.table()
            assert report.reference_side["device"] == "cuda:0" and report.artifact_side["device"] == "cpu"


@pytest.mark.gpu
@needs_cuda
def test_a_cuda_tensor_goes_through_the_wire_and_comes_back_on_the_cpu(bridge):
    sent = torch.arange(3 * 1024 * 1024, dtype=torch.float32, device="cuda:0").reshape(3, -1)  # 12 MB: shared memory
    back = bridge.echo({"tensor": sent})["tensor"]
    assert back.device.type == "cpu" and torch.equal(back, sent.cpu())


def device_memory(pid: int) -> int:
    """What nvidia-smi counts for process ``pid`` on the device, in bytes (0: no context)."""
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    lines = subprocess.run(query, capture_output=True, text=True, timeout=60, check=True).stdout.strip().splitlines()
    return {int(p): int(mib) << 20 for p, mib in (line.split(",") for line in lines)}.get(pid, 0)


@pytest.mark.gpu
@needs_cuda
def test_a_model_that_does_not_fit_on_the_gpu_is_out_of_memory_and_its_memory_goes_back(bridge, tmp_path):
    dense = make_dense_preset(tmp_path / "dense", "small")
    (checkpoint,) = slice_model(dense, tmp_path / "run", sparsity=0.25).glob("*.pt")
    warm = bridge.convert(checkpoint, tmp_path / "warm.bin", device="cuda:0")
    size = checkpoint.stat().st_size
    before = device_memory(bridge.server.pid)
    free, _ = torch.cuda.mem_get_info(0)
    taken = torch.empty(free - size // 2, dtype=torch.uint8, device="cuda:0")  # room for half of the fp16 model
    try:
        with pytest.raises(RemoteOutOfMemory, match="GPU memory"):
            bridge.convert(checkpoint, tmp_path / "fp32.bin", device="cuda:0", dtype="float32")
    finally:
        del taken
        torch.cuda.empty_cache()
    assert device_memory(bridge.server.pid) - before < size // 4, "the failed load's memory stayed with the server"
    again = bridge.convert(checkpoint, tmp_path / "again.bin", device="cuda:0")
    assert warm.cache_hit is False and again.cache_hit and not (tmp_path / "fp32.bin").exists()
