"""A dense model read once and sliced many times (``DenseCheckpoint.load``, ``slice_dense``,
``dense_model`` in ``slicebridge.model.slicing``), as the warm server's builtin slicer uses them.

What is held: ``load`` reads every tensor of a single or sharded safetensors model into memory,
each file once, after which nothing is read from disk (the files may be gone); slicing a loaded
checkpoint at two sparsities writes, bit for bit, what two fresh ``slice_model(path)`` runs write,
for every family, and leaves the held tensors exactly as they were; ``slice_dense`` without an
output directory writes nothing and returns what the files would hold (state dict, SlicingConfig,
parameter counts as the checkpoint reader counts them); ``dense_model`` is the model
``AutoModelForCausalLM.from_pretrained`` loads (same logits, tied head tied), built from memory,
owning its tensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.paths import SHARED_FIXTURES
from safetensors.torch import load_file, save_file

from slicebridge.model.checkpoint import read_checkpoint
from slicebridge.model.slicing import DenseCheckpoint, dense_model, slice_dense, slice_model

FAMILIES = ("llama", "opt", "phi2", "phi3")


def base_of(family: str) -> Path:
    return SHARED_FIXTURES / f"slicegpt-{family}-tiny" / "base"


def copy_of(family: str, directory: Path) -> Path:
    """A copy of the family's fixture base model, named like it ("base"), whose files may be removed."""
    shutil.copytree(base_of(family), directory / "base")
    return directory / "base"


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def contents(directory: Path) -> dict[str, object]:
    """Every file's bytes, a ``.pt``'s as its tensors' names, dtypes, shapes and bits (torch.save
    names its archive after the temporary file it was written to, so the file bytes differ)."""
    return {
        path.name: [(name, t.dtype, tuple(t.shape), bits(t)) for name, t in torch.load(path, weights_only=True).items()]
        if path.suffix == ".pt"
        else path.read_bytes()
        for path in sorted(directory.iterdir())
    }


def sharded(directory: Path) -> Path:
    """``directory``'s single ``model.safetensors`` split in two shards with an index."""
    tensors = load_file(str(directory / "model.safetensors"))
    names = list(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file_name, part in halves.items():
        save_file({name: tensors[name] for name in part}, str(directory / file_name))
    weight_map = {name: file_name for file_name, part in halves.items() for name in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "model.safetensors").unlink()
    return directory


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_load_reads_each_file_once_and_then_never_the_disk(tmp_path, monkeypatch, layout):
    directory = copy_of("llama", tmp_path)
    expected = {name: tensor.clone() for name, tensor in load_file(str(directory / "model.safetensors")).items()}
    if layout == "sharded":
        sharded(directory)
    lazy = DenseCheckpoint(directory)
    assert lazy.nbytes == 0

    import safetensors.torch

    reads: list[str] = []
    real_load_file = safetensors.torch.load_file
    monkeypatch.setattr(
        safetensors.torch, "load_file", lambda path: reads.append(Path(path).name) or real_load_file(path)
    )
    dense = DenseCheckpoint.load(directory)
    assert sorted(reads) == sorted({path.name for path in lazy.tensor_files.values()})
    assert dense.nbytes == sum(tensor.nbytes for tensor in expected.values())

    for path in directory.glob("*.safetensors"):
        with path.open("r+b") as handle:  # the same inode, its bytes zeroed: what the tensors see if mapped
            handle.seek(64)
            handle.write(bytes(path.stat().st_size - 64))
    for name, tensor in expected.items():
        assert torch.equal(dense.tensor(name), tensor), f"{name} changed with its file: it was not read"
    for path in directory.glob("*.safetensors"):
        path.unlink()
    for name, tensor in expected.items():
        assert torch.equal(dense.tensor(name), tensor) and dense.tensor(name).dtype == tensor.dtype, name
    assert dense.tensor("model.norm.weight", torch.float64).dtype == torch.float64
    outcome = slice_dense(dense, None, sparsity=0.25)
    assert outcome.tensors["lm_head.weight"].shape == (1000, 128)
    with pytest.raises(FileNotFoundError):  # a lazy checkpoint of it reads the files: they are gone
        lazy.tensor("model.norm.weight")


@pytest.mark.parametrize("family", FAMILIES)
def test_two_sparsities_from_one_loaded_checkpoint_equal_fresh_runs_bit_for_bit(tmp_path, family):
    base = base_of(family)
    dense = DenseCheckpoint.load(base)
    before = {name: dense.tensor(name).clone() for name in dense.tensor_files}
    for sparsity in (0.25, 0.5):
        from_memory = slice_model(dense, tmp_path / "loaded" / str(sparsity), sparsity=sparsity)
        fresh = slice_model(base, tmp_path / "fresh" / str(sparsity), sparsity=sparsity)
        ours, theirs = contents(from_memory), contents(fresh)
        assert ours == theirs, (family, sparsity, [name for name in ours if ours[name] != theirs.get(name)])
        assert any(name.endswith(".pt") for name in ours)
    for name, tensor in before.items():
        held = dense.tensor(name)
        assert held.dtype == tensor.dtype and torch.equal(held, tensor), f"{family}: {name} was changed"


def test_slice_dense_returns_what_the_files_hold_and_writes_only_when_asked(tmp_path):
    dense = DenseCheckpoint.load(base_of("opt"))
    stages: list[tuple[str, int, int]] = []
    kept = slice_dense(
        dense,
        None,
        sparsity=0.2,
        dtype="float32",
        progress=lambda *stage: stages.append(stage),
        final_orientation="pca",
    )
    assert kept.out_dir is None and kept.checkpoint is None and kept.copied == []
    assert stages[-1] == ("sliced", 4, 4)
    assert {tensor.dtype for tensor in kept.tensors.values()} == {torch.float32}

    written = slice_dense(dense, tmp_path / "out", sparsity=0.2, dtype="float32", final_orientation="pca")
    assert written.out_dir == tmp_path / "out" and written.checkpoint == tmp_path / "out" / "opt-base_0.2.pt"
    assert kept.stem == written.stem == "opt-base_0.2"
    assert set(written.copied) == {"config.json", "generation_config.json", "special_tokens_map.json"} | {
        "tokenizer.json",
        "tokenizer_config.json",
    }
    saved = torch.load(written.checkpoint, weights_only=True)
    assert list(saved) == list(kept.tensors)
    assert all(torch.equal(saved[name], tensor) for name, tensor in kept.tensors.items())
    assert json.loads(written.checkpoint.with_suffix(".json").read_text()) == kept.slicing_config
    assert kept.widths.embedding == 72 and kept.slicing_config["hidden_size"] == 96
    reader = read_checkpoint(written.out_dir)
    assert kept.params == reader.params()
    assert 0 < kept.params["shortcut_q"] < kept.params["sliced"] and kept.params["dense"] == 335_040


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_dense_model_is_the_from_pretrained_model(tmp_path, family):
    from transformers import AutoModelForCausalLM

    directory = copy_of(family, tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    dense = DenseCheckpoint.load(directory)
    (directory / "model.safetensors").unlink()  # built from memory
    model = dense_model(dense, torch.float32)
    assert type(model) is type(reference) and not model.training and model.dtype == torch.float32
    ids = torch.randint(0, reference.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    assert tied is (family == "opt")

    held = dense.tensor(dense.family.token_embedding).clone()
    model.get_input_embeddings().weight.add_(1.0)  # the model owns its tensors
    assert torch.equal(dense.tensor(dense.family.token_embedding), held)
    assert dense_model(dense).dtype == torch.float16  # the stored dtype by default


def test_a_loaded_checkpoint_of_another_family_is_refused_by_slice_llama(tmp_path):
    from slicebridge.model.slicing import slice_llama

    with pytest.raises(ValueError, match="holds a Phi-3 model, not a llama one"):
        slice_llama(DenseCheckpoint.load(base_of("phi3")), tmp_path, sparsity=0.25)
    assert not any(tmp_path.iterdir())
