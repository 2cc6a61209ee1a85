"""One model over a device group (``model.placement``, ``device="cuda:0+cuda:1"``).

The plan on its own: contiguous runs as balanced by bytes as any split can be (checked against every split of
small cases), every layer placed, more devices than layers. The portable model of each family placed over a
group of CPU "devices" computes exactly what it computes unplaced, generation included (on CPU the hidden states
have nowhere to move: the moves themselves are checked by the GPU tests). accelerate's device map of a Hugging
Face model covers every tensor. Through a server: a convert on ``cpu+cpu`` says its placement and writes the
``.bin`` one device writes, cached apart from ``cpu``; with the official loader the official model is dispatched
on the same plan and the export's check and the reference pass; a GPU group on a server without CUDA, a
malformed group, and a group for slicing are each refused in one sentence, and the server keeps serving.
"""

from __future__ import annotations

import copy
import itertools
import random
import zipfile
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURE, SHARED_FIXTURES

from slicebridge import Bridge
from slicebridge.bridge import protocol
from slicebridge.bridge.errors import BadRequest, RemoteError
from slicebridge.model import placement
from slicebridge.model.checkpoint import read_checkpoint
from slicebridge.model.sample_text import embedded_text

FAMILIES = ("llama", "opt", "phi2", "phi3")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def fixture_of(family: str) -> Path:
    return SHARED_FIXTURES / f"slicegpt-{family}-tiny"


def loads(layer_bytes, layers, count, first=0, last=0) -> list[int]:
    """Each device's bytes under a plan."""
    held = [0] * count
    for size, device in zip(layer_bytes, layers, strict=True):
        held[device] += size
    held[0] += first
    held[-1] += last
    return held


def best_split(layer_bytes, count, first=0, last=0) -> int:
    """The smallest fullest device over every contiguous split (brute force)."""
    total = len(layer_bytes)
    best = None
    for cuts in itertools.combinations_with_replacement(range(total + 1), count - 1):
        bounds = (0, *cuts, total)
        layers = [device for device in range(count) for _ in range(bounds[device], bounds[device + 1])]
        fullest = max(loads(layer_bytes, layers, count, first, last))
        best = fullest if best is None else min(best, fullest)
    return best


# --------------------------------------------------------------------------------------------------- the plan


def test_plan_is_contiguous_and_as_balanced_by_bytes_as_any_split():
    assert placement.plan([4] * 8, ["cuda:0", "cuda:1"]) == [0] * 4 + [1] * 4
    assert placement.plan([4] * 8, ["cuda:0", "cuda:1"], first_bytes=8) == [0] * 3 + [1] * 5  # 20 and 20
    assert placement.plan([1, 1, 1, 1, 8], ["a", "b"]) == [0, 0, 0, 0, 1]
    assert placement.plan([8, 1, 1, 1], ["a", "b"], last_bytes=6) == [0, 0, 1, 1]  # 9 and 8
    rng = random.Random(14)
    for _ in range(300):
        layer_bytes = [rng.randint(0, 50) for _ in range(rng.randint(0, 7))]
        count, first, last = rng.randint(1, 4), rng.randint(0, 60), rng.randint(0, 60)
        layers = placement.plan(layer_bytes, range(count), first_bytes=first, last_bytes=last)
        assert len(layers) == len(layer_bytes) and layers == sorted(layers), layers  # every layer, in runs
        assert all(0 <= device < count for device in layers)
        fullest = max(loads(layer_bytes, layers, count, first, last))
        assert fullest == best_split(layer_bytes, count, first, last), (layer_bytes, count, first, last, layers)


def test_plan_with_more_devices_than_layers_and_edge_cases():
    assert placement.plan([5, 5], ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]) == [0, 1]  # earlier devices first
    assert placement.plan([5, 5], ["cuda:0", "cuda:1", "cuda:2"], last_bytes=9) == [0, 1]  # the head alone
    assert placement.plan([], ["cpu", "cpu"]) == [] and placement.plan([3, 3, 3], ["cpu"]) == [0, 0, 0]
    with pytest.raises(ValueError, match="at least one device"):
        placement.plan([1], [])
    with pytest.raises(ValueError, match="negative"):
        placement.plan([1, -1], ["cpu"])


def test_placement_in_words():
    two = placement.Placement(["cuda:0", "cuda:1"], [0, 0, 1, 1], head=1)
    assert two.describe() == {"cuda:0": "embed, layers 0-1", "cuda:1": "layers 2-3, norm, head"}
    sparse = placement.Placement(["cpu", "cpu", "cpu"], [0, 1], head=2)
    assert sparse.describe() == {"cpu#0": "embed, layer 0", "cpu#1": "layer 1, norm", "cpu#2": "head"}
    tied = placement.Placement(["cuda:1", "cuda:0"], [0, 1, 1], head=0)
    assert tied.describe() == {"cuda:1": "embed, layer 0, head", "cuda:0": "layers 1-2, norm"}
    accelerate_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1, "lm_head": 1}
    assert placement.describe_device_map(accelerate_map) == {
        "cuda:0": "model.embed_tokens, model.layers.0",
        "cuda:1": "model.layers.1, model.norm, lm_head",
    }


# --------------------------------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def models():
    return {
        family: read_checkpoint(fixture_of(family) / "sliced").build_model(dtype=torch.float32) for family in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_a_placed_model_computes_what_the_unplaced_one_does(models, family):
    model = models[family]
    ids = torch.load(fixture_of(family) / "reference.pt", weights_only=True)["text_ids"]
    placed = copy.deepcopy(model)
    layout = placement.place(placed, ["cpu", "cpu", "cpu"])
    count = len(model.get_decoder().layers)
    assert len(layout.layers) == count and layout.layers == sorted(layout.layers) and layout.head == 2
    assert layout.describe()["cpu#0"].startswith("embed") and layout.describe()["cpu#2"].endswith("head")
    with torch.no_grad():
        assert torch.equal(placed(ids).logits, model(ids).logits)
        prompt = ids[:, :6]
        want = model.generate(prompt, max_new_tokens=5, do_sample=False)
        assert torch.equal(placed.generate(prompt, max_new_tokens=5, do_sample=False), want)


@pytest.mark.parametrize("tied", [False, True])
def test_accelerate_device_map_of_a_hugging_face_model_covers_every_tensor(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=5, num_attention_heads=2,
        tie_word_embeddings=tied,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    plan = placement.Placement(["cuda:0", "cuda:1"], placement.plan([1] * 5, "ab"), head=0 if tied else 1)
    device_map = placement.hf_device_map(model, plan)
    assert list(device_map)[:2] == ["model.embed_tokens", "model.layers.0"]  # in the model's order
    assert [device_map[f"model.layers.{index}"] for index in range(5)] == ["cuda:0"] * 3 + ["cuda:1"] * 2
    assert device_map["model.norm"] == "cuda:1" and device_map["lm_head"] == ("cuda:0" if tied else "cuda:1")
    uncovered = [name for name in model.state_dict() if not any(name.startswith(f"{key}.") for key in device_map)]
    assert uncovered == []
    with pytest.raises(ValueError, match="holds 5 layers, the plan 2"):
        placement.hf_device_map(model, placement.Placement(["cpu", "cpu"], [0, 1], 1))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_over_a_gpu_and_more_computes_what_it_does_on_one_device(models, family):
    """Over cuda:0 and cuda:1 where there are two GPUs, else over cuda:0 and the host."""
    model = models[family]
    ids = torch.load(fixture_of(family) / "reference.pt", weights_only=True)["text_ids"]
    group = ["cuda:0", "cuda:1"] if torch.cuda.device_count() > 1 else ["cuda:0", "cpu"]
    placed = copy.deepcopy(model)
    layout = placement.place(placed, group)
    decoder = placed.get_decoder()
    assert decoder.embed_tokens.weight.device == torch.device(group[0])
    assert placed.lm_head.weight.device == torch.device(group[-1]) and set(layout.layers) == {0, 1}
    assert {next(layer.parameters()).device.type for layer in decoder.layers} == {torch.device(d).type for d in group}
    with torch.no_grad():
        got = placed(ids.to(group[0])).logits
        want = model(ids).logits
        assert got.device == torch.device(group[0])  # back where the inputs are
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
        prompt = ids[:, :6]
        generated = placed.generate(prompt.to(group[0]), max_new_tokens=5, do_sample=False)
        assert torch.equal(generated.cpu(), model.generate(prompt, max_new_tokens=5, do_sample=False))


# --------------------------------------------------------------------------------------------------- requests


def archive(path: Path) -> dict[str, bytes]:
    """A .bin's members and their bytes (torch.save names the archive's folder after the temporary it wrote)."""
    with zipfile.ZipFile(path) as opened:
        return {name.split("/", 1)[1]: opened.read(name) for name in opened.namelist()}


def test_convert_over_a_group_says_where_and_writes_what_one_device_writes(bridge, tmp_path):
    spread = bridge.convert(FIXTURE / "sliced", tmp_path / "spread.bin", device="cpu+cpu")
    assert spread.device == "cpu+cpu" and not spread.cache_hit
    assert spread.placement == {
        "by": "slicebridge",
        "devices": {"cpu#0": "embed, layers 0-1", "cpu#1": "layers 2-3, norm, head"},
    }
    alone = bridge.convert(FIXTURE / "sliced", tmp_path / "alone.bin", device="cpu")
    assert alone.placement is None and archive(tmp_path / "spread.bin") == archive(tmp_path / "alone.bin")
    again = bridge.convert(FIXTURE / "sliced", tmp_path / "again.bin", device="cpu+cpu")
    assert again.cache_hit and again.placement == spread.placement
    cached = {entry["device"] for entry in bridge.cache_info().entries}
    assert {"cpu", "cpu+cpu"} <= cached  # one entry each


def test_groups_that_cannot_be_are_one_sentence_and_the_server_keeps_serving(bridge, tmp_path):
    refused = {
        "cuda:0+cuda:1": ("DeviceUnavailable", "in the device group 'cuda:0+cuda:1': device='cuda:0' was asked for"),
        "cpu+": ("ValueError", "a device group joins two or more devices, each cpu or cuda:N"),
        "cuda+cuda:1": ("ValueError", "a device group joins two or more devices"),
        "auto+cpu": ("ValueError", "a device group joins two or more devices"),
        "cuda:0+cuda:0": ("ValueError", "names cuda:0 twice"),
    }
    for device, (error_type, words) in refused.items():
        with pytest.raises(RemoteError) as caught:
            bridge.convert(FIXTURE / "sliced", tmp_path / "x.bin", device=device)
        message = str(caught.value)
        assert caught.value.error_type == error_type and words in message, (device, message)
        assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert not (tmp_path / "x.bin").exists()
    assert bridge.convert(FIXTURE / "sliced", tmp_path / "y.bin", device="cpu").output == str(tmp_path / "y.bin")


def test_slicing_on_a_group_is_refused_in_one_sentence(bridge, tmp_path):
    calibration = tmp_path / "cal.txt"
    calibration.write_text(embedded_text(), encoding="utf-8")
    with pytest.raises(BadRequest) as caught:
        bridge.slice(FIXTURE / "base", [0.25], tmp_path / "out", calibration=calibration, device="cpu+cpu")
    message = str(caught.value)
    assert "is a device group" in message and "runs on one device" in message and len(message.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def official_bridge(official_env):
    with Bridge(env=str(official_env), attach=False, debug_ops=True) as b:
        yield b


def test_official_model_over_a_group_is_dispatched_on_the_same_plan(official_bridge, tmp_path):
    result = official_bridge.export(FIXTURE / "sliced", tmp_path / "export", device="cpu+cpu")
    assert result.loader == "official" and result.verification["status"] == "passed", result.verification
    assert result.placement["devices"] == {"cpu#0": "embed, layers 0-1", "cpu#1": "layers 2-3, norm, head"}
    official = result.placement["official"]
    assert official["by"] == "accelerate.dispatch_model on slicebridge's plan"
    assert official["devices"]["cpu"].startswith("model.embed_tokens, model.layers 0-3")
    inputs = [torch.load(FIXTURE / "reference.pt", weights_only=True)["text_ids"]]
    spread, alone = (
        official_bridge.request("reference", protocol.ReferenceArgs(str(FIXTURE / "sliced"), inputs, device=device))
        for device in ("cpu+cpu", "cpu")
    )
    assert spread.cache_hit and spread.loader == "official" and spread.placement == result.placement
    assert alone.placement is None and torch.equal(spread.logits[0], alone.logits[0])


def test_one_syntax_names_devices_for_requests_and_pools():
    from slicebridge.bridge.devices import device_parts, repeated_gpus

    assert device_parts("cuda") == ["cuda"] and device_parts("cuda:1") == ["cuda:1"] and device_parts("cpu") == ["cpu"]
    assert device_parts("cuda:0+cpu+cpu") == ["cuda:0", "cpu", "cpu"]
    for bad in ("gpu", "cuda+cuda:1", "cuda:0+", "+cpu", "cuda:0 + cuda:1", "auto", ""):
        assert device_parts(bad) is None, bad
    assert repeated_gpus(["cuda:1", "cpu", "cuda:1", "cpu", "cuda:0"]) == ["cuda:1"]
