"""A plain ``torch.load(p)`` (``weights_only=True``, torch's default) loads a ``.bin`` after ``import slicebridge``.

Every check runs in a fresh base-env interpreter, since what ``import slicebridge`` does to torch is
process-wide: with slicebridge imported (before or after torch) the ``.bin`` loads and gives the model's
tensors; without it, torch refuses it as before; torch's safe globals gain exactly the two rebuild functions;
and a file that references any other global is still refused before any of it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers.paths import FIXTURE

from slicebridge import NotASliceGPTCheckpoint
from slicebridge.model import portable
from slicebridge.model.binfile import ModelRecipe, save_bin, tokenizer_files
from slicebridge.model.checkpoint import read_checkpoint

CHECKPOINT = FIXTURE / "sliced" / "Meta-Llama-3-tiny_0.25.pt"
REBUILD_FUNCTIONS = ["slicebridge.model.binfile.rebuild_model", "slicebridge.model.binfile.rebuild_tokenizer"]

ORDERS = ("slicebridge-first", "torch-first", "torch-only")

# argv: an order (ORDERS), the good .bin, the crafted .bin. Prints one JSON line.
CHILD = r"""
import hashlib, json, sys
order, good, crafted = sys.argv[1:4]
name = lambda g: g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
safe_globals = lambda: sorted(name(g) for g in torch.serialization.get_safe_globals())
if order == "slicebridge-first":
    import slicebridge
import torch
seen = {"plain_globals": safe_globals()}
if order == "torch-first":
    import slicebridge
seen.update(globals=safe_globals(), finders=[type(f).__name__ for f in sys.meta_path])
seen["torch_loader"] = type(torch.__loader__).__name__
for label, path in (("good", good), ("crafted", crafted)):
    try:
        contents = torch.load(path)
    except Exception as exc:
        seen[label] = {"error": type(exc).__name__, "message": str(exc)}
        continue
    seen[label] = {
        "model": type(contents["model"]).__name__,
        "tokenizer": type(contents["tokenizer"]).__name__,
        "method": contents["method"],
        "digests": {
            n: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, t in contents["model"].state_dict().items()
        },
    }
if order != "torch-only":  # the caller's code may clear them: slicebridge.load allows them again, and keeps them
    torch.serialization.clear_safe_globals()
    slicebridge.load(good)
    seen["plain_load_after_slicebridge_load"] = type(torch.load(good)["model"]).__name__
print(json.dumps(seen))
"""


def _digests(model) -> dict[str, str]:
    return {
        name: hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        for name, tensor in model.state_dict().items()
    }


class _Mkdir:
    """Pickles as a call of ``os.mkdir``: observable if a loader ever ran it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A ``.bin`` of the fixture's sliced model, written in this process as convert writes it; and that model."""
    checkpoint = read_checkpoint(CHECKPOINT, base_dir=FIXTURE / "base")
    model = portable.build_model(checkpoint.load_tensors(), checkpoint.sliced_config())
    path = tmp_path_factory.mktemp("torch_load") / "model.bin"
    save_bin(
        path,
        model=model,
        tokenizer_files=tokenizer_files(FIXTURE / "base"),
        pruning_ratio=0.25,
        actual_ratio=0.2,
        config={"sparsity": 0.25},
    )
    return path, model


@pytest.fixture(scope="module")
def seen(made, tmp_path_factory):
    """What a fresh interpreter sees, for each import order (run at once, each in its own process)."""
    path, model = made
    scratch = tmp_path_factory.mktemp("crafted")
    crafted = scratch / "crafted.bin"
    recipe = ModelRecipe(model.config.to_dict(), dict(model.state_dict()))
    torch.save({"model": recipe, "method": "SliceGPT", "extra": _Mkdir(scratch / "ran")}, crafted)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    procs = {
        order: subprocess.Popen(
            [sys.executable, "-I", "-c", CHILD, order, str(path), str(crafted)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for order in ORDERS
    }
    results = {}
    for order, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results[order] = json.loads(out.strip().splitlines()[-1])
    results["ran"] = (scratch / "ran").exists()
    return results


@pytest.mark.parametrize("order", ["slicebridge-first", "torch-first"])
def test_plain_torch_load_after_import_slicebridge_gives_the_tensors(made, seen, order):
    _, model = made
    loaded = seen[order]["good"]
    assert "error" not in loaded, loaded
    assert (loaded["model"], loaded["method"]) == ("SlicedLlamaForCausalLM", "SliceGPT")
    assert loaded["tokenizer"] != "NoneType"
    assert loaded["digests"] == _digests(model)
    # the import hook has left sys.meta_path, and torch keeps its own loader
    assert "_AfterTorchImport" not in seen[order]["finders"]
    assert seen[order]["torch_loader"] == "SourceFileLoader"


def test_without_import_slicebridge_torch_load_refuses_it_as_before(seen):
    refused = seen["torch-only"]["good"]
    assert refused["error"] == "UnpicklingError"
    assert "slicebridge.model.binfile.rebuild_model" in refused["message"]


@pytest.mark.parametrize("order", ["slicebridge-first", "torch-first"])
def test_torch_safe_globals_gain_exactly_the_two_rebuild_functions(seen, order):
    plain = seen["torch-only"]["globals"]
    assert seen["torch-first"]["plain_globals"] == plain  # torch's own, before slicebridge is imported
    assert sorted(set(seen[order]["globals"]) - set(plain)) == REBUILD_FUNCTIONS
    assert len(seen[order]["globals"]) == len(plain) + 2


def test_slicebridge_load_leaves_them_allowed(seen):
    for order in ("slicebridge-first", "torch-first"):
        assert seen[order]["plain_load_after_slicebridge_load"] == "SlicedLlamaForCausalLM"


def test_a_bin_with_another_global_is_still_refused_before_running_it(seen):
    for order in ORDERS:
        assert seen[order]["crafted"]["error"] == "UnpicklingError", seen[order]["crafted"]
    for order in ("slicebridge-first", "torch-first"):  # past the recipe, refused at the other global
        assert "posix.mkdir" in seen[order]["crafted"]["message"]
    assert not seen["ran"]


def test_the_server_keeps_its_checkpoint_reads_strict(made, bridge, tmp_path):
    """The server imports slicebridge too, but a .pt it reads may call no rebuild function: a .bin passed as a
    checkpoint is refused as pickled objects before anything in it runs, and nothing is written."""
    path, _ = made
    disguised = tmp_path / "llama_0.25.pt"
    shutil.copyfile(path, disguised)
    with pytest.raises(NotASliceGPTCheckpoint, match="holds pickled Python objects"):
        bridge.convert(disguised, tmp_path / "out.bin", base_model=FIXTURE / "base")
    assert not (tmp_path / "out.bin").exists()
    bridge.ping()  # and it still serves
