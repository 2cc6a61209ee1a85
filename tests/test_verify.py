"""verify and info: the artifact checked in this env against the checkpoint run in the server."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.paths import FIXTURE

from slicebridge.client.artifact_info import info
from slicebridge.model.binfile import load, save_bin, tokenizer_files
from slicebridge.model.compare import TOLERANCES

CHECKPOINT = FIXTURE / "sliced"


@pytest.fixture(scope="module")
def good_bin(bridge, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "model.bin"
    bridge.convert(CHECKPOINT, out)
    return out


def flip_exponent_bit(path, out, parameter="model.layers.1.self_attn.q_proj.weight"):
    """Bit rot in one fp16 weight: the highest exponent bit of its first element flipped."""
    model = load(path)["model"]
    weight = dict(model.named_parameters())[parameter]
    with torch.no_grad():
        weight.view(-1)[:1].view(torch.int16).bitwise_xor_(1 << 14)
    save_bin(
        out, model=model, tokenizer_files=tokenizer_files(CHECKPOINT), pruning_ratio=0.25, actual_ratio=0.13, config={}
    )
    return out


def test_our_bin_passes_with_numbers(bridge, good_bin):
    report = bridge.verify(good_bin, CHECKPOINT)
    assert report.passed, report.table()
    assert report.kind == "bin" and report.compared_dtype == "float16"
    assert [m["name"] for m in report.inputs] == ["probe", "text"]
    assert [m["tokens"] for m in report.inputs] == [96, 128]
    for metrics in report.inputs:
        assert metrics["nmse"] <= 1e-6 and metrics["top1"] == 1.0 and metrics["max_abs_diff"] < 0.01
        assert metrics["ppl_artifact"] == pytest.approx(metrics["ppl_reference"], rel=1e-3)
    assert report.artifact_side["transformers"].startswith("5.")
    assert report.reference_side["versions"]["transformers"] == "4.41.0"
    assert report.reference_side["loader"] == "builtin"
    table = report.table()
    assert "PASS" in table and "NMSE" in table and "tolerance (float16)" in table
    assert json.loads(report.to_json())["passed"] is True


def test_fp32_artifact_is_held_to_the_fp32_tolerance(bridge, good_bin, tmp_path):
    contents = load(good_bin)
    save_bin(
        tmp_path / "fp32.bin",
        model=contents["model"].float(),
        tokenizer_files=tokenizer_files(CHECKPOINT),
        pruning_ratio=0.25,
        actual_ratio=0.13,
        config={},
    )
    report = bridge.verify(tmp_path / "fp32.bin", CHECKPOINT)
    assert report.compared_dtype == "float16"  # the reference runs as stored: fp16
    assert report.passed


def test_a_corrupted_weight_fails_with_the_reason(bridge, good_bin, tmp_path):
    report = bridge.verify(flip_exponent_bit(good_bin, tmp_path / "bad.bin"), CHECKPOINT)
    assert not report.passed
    assert any("NMSE" in f for f in report.failures)
    assert report.inputs[0]["nmse"] > 100 * TOLERANCES["float16"]["nmse"]
    assert "FAIL" in report.table()


def test_the_seeds_bin_is_diagnosed_not_loaded(bridge):
    report = bridge.verify(FIXTURE / "seed_pruned_model.bin", CHECKPOINT)
    assert not report.passed and report.kind == "seed-bin"
    text = " ".join(report.diagnosis)
    assert "weights_only" in text
    assert "No module named 'slicegpt'" in text
    assert "LlamaSdpaAttention" in text  # transformers 5 in this env
    assert "upgrade" in report.fix


def test_an_unloadable_artifact_is_a_failed_verification(bridge, tmp_path):
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"not a torch file")
    report = bridge.verify(broken, CHECKPOINT)
    assert not report.passed and "does not load here" in report.failures[0]


def test_info_on_the_fixture_checkpoint_without_a_server():
    facts = info(CHECKPOINT)
    assert facts.kind == "checkpoint" and facts.num_layers == 4
    assert (facts.hidden_size, facts.sliced_width) == (128, 96)
    assert facts.params == {"dense": 982144, "sliced": 855552, "shortcut_q": 76800}
    assert facts.actual_ratio == pytest.approx(1 - 855552 / 982144)
    assert facts.sparsity == 0.25 and facts.round_interval == 8 and facts.dtype == "float16"
    assert facts.widths["mlp_output_dimensions"]["3"] == 128
    assert "128 → 96" in facts.table()


def test_info_on_our_bin_without_a_server(good_bin):
    facts = info(good_bin)
    assert facts.kind == "bin" and (facts.hidden_size, facts.sliced_width, facts.num_layers) == (128, 96, 4)
    assert facts.params == {"dense": 982144, "sliced": 855552, "shortcut_q": 76800}
    assert facts.producer["transformers"] == "4.41.0" and facts.loader == "builtin"
    assert facts.file_bytes == good_bin.stat().st_size


def test_info_on_the_seed_bin_here_says_why_not(tmp_path):
    facts = info(FIXTURE / "seed_pruned_model.bin")
    assert facts.kind == "seed-bin" and any("slicegpt" in n for n in facts.notes)


def test_info_on_the_seed_bin_through_the_slicegpt_env(official_env):
    from slicebridge import Bridge

    with Bridge(env=str(official_env), attach=False) as b:
        facts = b.info(FIXTURE / "seed_pruned_model.bin")
    assert facts.kind == "seed-bin" and (facts.hidden_size, facts.sliced_width, facts.num_layers) == (128, 96, 4)
    assert facts.params == {"dense": 982144, "sliced": 855552, "shortcut_q": 76800}
    assert facts.sparsity == 0.25
