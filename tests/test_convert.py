"""convert and upgrade through a real server in the stand-in env; the .bin checked in this env.

The server runs transformers 4.41; this env runs 5.x: every .bin here crosses versions.
The shared fixture's reference logits (made by the official code) are the oracle.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import dill
import pytest
import torch
from helpers.paths import FIXTURE

from slicebridge import Bridge
from slicebridge.model import errors as checkpoint_errors
from slicebridge.model.atomic import OutputError, OutputExists
from slicebridge.model.binfile import UnsafeBinFile, load
from slicebridge.model.compare import nmse, top1_agreement

FP32_NMSE = 1e-8


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE / "reference.pt", weights_only=True)


def assert_matches_reference(model, reference):
    model = model.float().eval()
    with torch.no_grad():
        probe = model(reference["probe_ids"]).logits
        text = model(reference["text_ids"]).logits
    assert nmse(probe, reference["logits_fp32"]) <= FP32_NMSE
    assert nmse(text, reference["text_logits_fp32"]) <= FP32_NMSE
    assert top1_agreement(probe, reference["logits_fp32"]) == 1.0
    assert top1_agreement(text, reference["text_logits_fp32"]) == 1.0


def base_ids(text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURE / "base")(text).input_ids


def no_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".partial" in p.name or p.name.startswith(".slicebridge")]


@pytest.fixture(scope="module")
def converted(bridge, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "pruned_model.bin"
    events = []
    result = bridge.convert(FIXTURE / "sliced", out, on_event=lambda kind, body: events.append((kind, body)))
    return out, result, events


def test_convert_reports_what_it_did(converted):
    out, result, events = converted
    assert result.output == str(out) and result.bytes == out.stat().st_size
    assert result.loader == "builtin"  # no slicegpt in this env
    assert result.cache_hit is False and result.device == "cpu" and result.dtype == "float16"
    assert result.sparsity == 0.25 and result.round_interval == 8
    assert result.params == {"dense": 982144, "sliced": 855552, "shortcut_q": 76800}
    assert result.actual_ratio == pytest.approx(1 - 855552 / 982144)
    assert result.pickle_module == "dill" and result.format_version == 1
    assert any(kind == "progress" for kind, _ in events)


@pytest.mark.parametrize("how", ["weights_only=False", "pickle_module=dill", "slicebridge.load"])
def test_bin_loads_in_this_env_three_ways_and_matches_the_official_logits(converted, reference, how):
    out = converted[0]
    contents = {
        "weights_only=False": lambda: torch.load(out, weights_only=False),
        "pickle_module=dill": lambda: torch.load(out, pickle_module=dill, weights_only=False),
        "slicebridge.load": lambda: load(out),
    }[how]()
    assert type(contents["model"]).__name__ == "SlicedLlamaForCausalLM"
    assert all(t.device.type == "cpu" for t in contents["model"].state_dict().values())
    assert contents["tokenizer"]("the license").input_ids == base_ids("the license")
    assert_matches_reference(contents["model"], reference)


def test_bin_has_the_seeds_keys_and_honest_metadata(converted):
    contents = load(converted[0])
    assert contents["method"] == "SliceGPT"
    assert contents["pruning_ratio"] == 0.25
    assert contents["actual_ratio"] == pytest.approx(0.1288935, abs=1e-6)
    assert set(contents["config"]) == {"base_model", "slicegpt_model", "sparsity", "round_interval", "note"}
    assert contents["config"]["slicegpt_model"].endswith("Meta-Llama-3-tiny_0.25.pt")
    assert contents["config"]["round_interval"] == 8
    assert contents["format"] == "slicebridge.bin" and contents["format_version"] == 1
    assert contents["producer"]["transformers"] == "4.41.0"  # made in the slicegpt env
    assert contents["loader"] == "builtin"
    assert contents["widths"]["embedding_dimensions"] == {"0": 96}


def test_fp16_model_as_converted_matches_the_official_fp16_logits(converted, reference):
    model = load(converted[0])["model"]
    assert next(model.parameters()).dtype == torch.float16
    with torch.no_grad():
        logits = model(reference["probe_ids"]).logits
    assert nmse(logits, reference["logits_fp16"]) <= 2e-6  # fp16 rounding on another CPU
    assert top1_agreement(logits, reference["logits_fp16"]) == 1.0


def test_bin_generates_text(converted):
    contents = load(converted[0])
    model, tokenizer = contents["model"].float(), contents["tokenizer"]
    ids = tokenizer("the license", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)


def test_second_convert_comes_from_the_warm_cache(bridge, converted, tmp_path):
    result = bridge.convert(FIXTURE / "sliced", tmp_path / "again.bin")
    assert result.cache_hit is True and result.timings["load"] == 0.0
    info = bridge.cache_info()
    assert [e["checkpoint"] for e in info.entries] == [
        os.path.realpath(FIXTURE / "sliced" / "Meta-Llama-3-tiny_0.25.pt")
    ]
    assert info.hits >= 1 and info.entries[0]["bytes"] > 0


def test_cache_evicts_least_recently_used_under_its_budget(slicegpt_env, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(FIXTURE / "sliced", copy)
    monkeypatch.setenv("SLICEBRIDGE_CACHE_BYTES", str(2_000_000))  # room for one tiny model
    with Bridge(env=str(slicegpt_env), attach=False) as b:
        first = b.convert(FIXTURE / "sliced", tmp_path / "a.bin")
        second = b.convert(copy, tmp_path / "b.bin")
        again = b.convert(FIXTURE / "sliced", tmp_path / "c.bin")
        assert (first.cache_hit, second.cache_hit, again.cache_hit) == (False, False, False)
        assert len(b.cache_info().entries) == 1
        assert b.convert(FIXTURE / "sliced", tmp_path / "d.bin").cache_hit is True


def test_bare_pt_plus_base_dir(bridge, tmp_path):
    result = bridge.convert(
        FIXTURE / "sliced" / "Meta-Llama-3-tiny_0.25.pt", tmp_path / "m.bin", base_model=FIXTURE / "base"
    )
    assert result.sparsity == 0.25 and load(tmp_path / "m.bin")["config"]["base_model"] == str(
        (FIXTURE / "base").resolve()
    )


def test_existing_output_is_kept_unless_overwrite(bridge, tmp_path):
    out = tmp_path / "exists.bin"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExists, match="overwrite"):
        bridge.convert(FIXTURE / "sliced", out)
    assert out.read_bytes() == b"precious"
    bridge.convert(FIXTURE / "sliced", out, overwrite=True)
    assert load(out)["method"] == "SliceGPT"


# --------------------------------------------------------------------------- bad input


def truncated_pt(tmp_path: Path) -> Path:
    target = tmp_path / "trunc"
    shutil.copytree(FIXTURE / "sliced", target)
    pt = target / "Meta-Llama-3-tiny_0.25.pt"
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    return target


def not_slicegpt(tmp_path: Path) -> Path:
    target = tmp_path / "notsliced"
    shutil.copytree(FIXTURE / "sliced", target)
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(4, 4), "model.layers.0.input_layernorm.weight": torch.ones(4)},
        target / "Meta-Llama-3-tiny_0.25.pt",
    )
    return target


def no_config(tmp_path: Path) -> Path:
    target = tmp_path / "noconfig"
    target.mkdir()
    shutil.copy(FIXTURE / "sliced" / "Meta-Llama-3-tiny_0.25.pt", target)
    return target


def mistral(tmp_path: Path) -> Path:
    target = tmp_path / "mistral"
    shutil.copytree(FIXTURE / "sliced", target)
    config = (target / "config.json").read_text().replace('"LlamaForCausalLM"', '"MistralForCausalLM"')
    (target / "config.json").write_text(config.replace('"model_type": "llama"', '"model_type": "mistral"'))
    return target


BAD_INPUTS = {
    "missing .pt": (
        lambda tmp: tmp / "nothing" / "x_0.25.pt",
        {},
        checkpoint_errors.CheckpointNotFound,
        "does not exist",
    ),
    "not a SliceGPT state dict": (not_slicegpt, {}, checkpoint_errors.NotASliceGPTCheckpoint, "plain, unsliced"),
    "truncated file": (truncated_pt, {}, checkpoint_errors.TruncatedCheckpoint, ""),
    "base dir without config": (no_config, {}, checkpoint_errors.BaseConfigMissing, "config.json"),
    "wrong sparsity": (
        lambda tmp: FIXTURE / "sliced" / "Meta-Llama-3-tiny_0.25.pt",
        {"sparsity": 0.2},
        checkpoint_errors.SparsityMismatch,
        "0.25",
    ),
    "wrong round_interval": (
        lambda tmp: FIXTURE / "sliced",
        {"round_interval": 64},
        checkpoint_errors.SparsityMismatch,
        "round_interval",
    ),
    "unsupported architecture": (mistral, {}, checkpoint_errors.UnsupportedArchitecture, "Llama"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoint_gets_a_clear_error_and_nothing_is_written(bridge, tmp_path, case):
    make, kwargs, error, words = BAD_INPUTS[case]
    source = make(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(error) as info:
        bridge.convert(source, out_dir / "model.bin", **kwargs)
    assert words in str(info.value)
    assert "Traceback" not in str(info.value)
    assert list(out_dir.iterdir()) == []
    assert bridge.echo("alive") == "alive"


@pytest.mark.parametrize("case", ["missing dir", "unwritable dir"])
def test_bad_output_fails_before_loading(bridge, tmp_path, case):
    out = tmp_path / "no" / "such" / "model.bin" if case == "missing dir" else Path("/sys/slicebridge-test.bin")
    before = bridge.cache_info().misses
    with pytest.raises(OutputError, match="does not exist|cannot create files"):
        bridge.convert(FIXTURE / "sliced", out)
    assert not out.exists()
    assert bridge.cache_info().misses == before  # nothing was loaded
    assert bridge.echo("alive") == "alive"


# --------------------------------------------------------------------------- the official loader and upgrade


@pytest.fixture(scope="module")
def official_bridge(official_env):
    with Bridge(env=str(official_env), attach=False) as b:
        assert b.server_hello.versions["slicegpt"] == "0.1.0+standin"
        yield b


@pytest.mark.parametrize("api", ["new", "old"])
def test_official_loader_through_both_api_generations(official_env, tmp_path, reference, monkeypatch, api):
    monkeypatch.setenv("SLICEGPT_STANDIN_API", api)
    with Bridge(env=str(official_env), attach=False) as b:
        result = b.convert(FIXTURE / "sliced", tmp_path / "official.bin")
    assert result.loader == "official"
    contents = load(tmp_path / "official.bin")
    assert contents["loader"] == "official"
    assert_matches_reference(contents["model"], reference)


def test_official_loader_copes_with_a_name_its_adapters_do_not_know(official_bridge, tmp_path, reference):
    renamed = tmp_path / "ckpt"
    renamed.mkdir()
    for item in (FIXTURE / "sliced").iterdir():
        name = item.name.replace("Meta-Llama-3-tiny", "my-local-model")
        shutil.copy(item, renamed / name)
    result = official_bridge.convert(renamed, tmp_path / "renamed.bin", loader="official")
    assert result.loader == "official"
    assert_matches_reference(load(tmp_path / "renamed.bin")["model"], reference)


def test_builtin_loader_can_be_forced_where_slicegpt_exists(official_bridge, tmp_path):
    assert official_bridge.convert(FIXTURE / "sliced", tmp_path / "b.bin", loader="builtin").loader == "builtin"


def test_official_loader_asked_for_where_slicegpt_is_missing(bridge, tmp_path):
    with pytest.raises(Exception, match="needs the slicegpt package") as info:
        bridge.convert(FIXTURE / "sliced", tmp_path / "x.bin", loader="official")
    assert info.value.error_type == "LoaderUnavailable"
    assert not (tmp_path / "x.bin").exists()


def test_upgrade_turns_the_seed_bin_into_a_portable_one(official_bridge, tmp_path, reference):
    result = official_bridge.upgrade(FIXTURE / "seed_pruned_model.bin", tmp_path / "upgraded.bin", trust_pickle=True)
    assert result.loader == "upgrade" and result.sparsity == 0.25
    assert result.params == {"dense": 982144, "sliced": 855552, "shortcut_q": 76800}
    contents = load(tmp_path / "upgraded.bin")  # the safe loader takes it now
    assert contents["upgraded_from"] == str((FIXTURE / "seed_pruned_model.bin").resolve())
    assert contents["config"]["sparsity"] == 0.25
    assert_matches_reference(contents["model"], reference)
    assert contents["tokenizer"]("the license").input_ids == base_ids("the license")


def test_seed_bin_is_refused_by_the_safe_loader_with_a_pointer_to_upgrade():
    with pytest.raises(UnsafeBinFile, match="slicebridge upgrade"):
        load(FIXTURE / "seed_pruned_model.bin")


def test_upgrade_needs_slicegpt_in_the_server_env(bridge, tmp_path):
    with pytest.raises(Exception, match="'slicegpt' package") as info:
        bridge.upgrade(FIXTURE / "seed_pruned_model.bin", tmp_path / "u.bin", trust_pickle=True)
    assert info.value.error_type == "NotASeedBin"
    assert not (tmp_path / "u.bin").exists()


def test_upgrade_refuses_what_is_already_portable(official_bridge, converted, tmp_path):
    with pytest.raises(Exception, match="already a portable"):
        official_bridge.upgrade(converted[0], tmp_path / "u.bin", trust_pickle=True)


LOAD_IN_OLD_ENV = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
from slicebridge.model.binfile import load
from slicebridge.model.compare import nmse
ref = torch.load(sys.argv[3], weights_only=True)
model = load(sys.argv[1])["model"].float()
with torch.no_grad():
    logits = model(ref["probe_ids"]).logits
print(nmse(logits, ref["logits_fp32"]))
"""


def test_bin_also_loads_under_transformers_4_41(converted, slicegpt_env):
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [
            str(slicegpt_env / "bin" / "python"),
            "-I",
            "-c",
            LOAD_IN_OLD_ENV,
            str(converted[0]),
            str(repo),
            str(FIXTURE / "reference.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip()) <= FP32_NMSE


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/slicebridge-pwned",))


def test_safe_loader_refuses_a_crafted_bin_before_running_it(tmp_path):
    import slicebridge

    crafted = tmp_path / "crafted.bin"
    torch.save({"model": _Exploit(), "method": "SliceGPT"}, crafted)
    Path("/tmp/slicebridge-pwned").unlink(missing_ok=True)
    with pytest.raises(UnsafeBinFile, match="posix.system|os.system"):
        slicebridge.load(crafted)
    assert not Path("/tmp/slicebridge-pwned").exists()
