"""The portable sliced Phi-3: fidelity to the official SliceGPT logits, generation, Phi-3's RoPE
scalings and sliding window, and its exported remote code, under transformers 5.x (this
interpreter) and 4.41 (the slicegpt env, SliceGPT's pin)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.paths import HELPERS, REPO, slicegpt_env_path
from safetensors.torch import save_file

from slicebridge.model import portable
from slicebridge.model.configuration_sliced_phi3 import SlicedPhi3Config
from slicebridge.model.modeling_sliced_phi3 import SlicedPhi3ForCausalLM, SlicedPhi3RotaryEmbedding

FIXTURE = REPO.parent / "shared" / "fixtures" / "slicegpt-phi3-tiny"
HELPER = HELPERS / "family_check_phi3.py"
MODEL_SOURCES = REPO / "slicebridge" / "model"
REMOTE_CODE = (
    "configuration_sliced.py",
    "sliced_decoder.py",
    "configuration_sliced_phi3.py",
    "modeling_sliced_phi3.py",
)
VERSIONS = ("5.x", "4.41")

NMSE_LIMIT = 1e-8
FP16_NMSE_LIMIT = 1e-4  # measured: 6.4e-7 (probe), 5.9e-7 (text) under both versions
DENSE_LIMIT = 1e-5  # max |logit diff| of a rotated dense Phi-3 vs its rebuild; measured <= 3.6e-7


def _load_helper():
    spec = importlib.util.spec_from_file_location("family_check_phi3", HELPER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def helper():
    return _load_helper()


@pytest.fixture(scope="module")
def fixture_config(helper) -> SlicedPhi3Config:
    return helper.fixture_config(FIXTURE)


@pytest.fixture(scope="module")
def export_dir(helper, tmp_path_factory) -> Path:
    """The fixture model as an export: the remote code, config.json with auto_map, fp32 safetensors
    (with the ``format`` metadata transformers 4.41 insists on)."""
    directory = tmp_path_factory.mktemp("phi3-export")
    for name in REMOTE_CODE:
        shutil.copy(MODEL_SOURCES / name, directory / name)
    model = helper.fixture_model(FIXTURE, torch.float32)
    config = model.config.to_dict()
    config.update(
        model_type="sliced_phi3",
        architectures=["SlicedPhi3ForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_sliced_phi3.SlicedPhi3Config",
            "AutoModelForCausalLM": "modeling_sliced_phi3.SlicedPhi3ForCausalLM",
        },
    )
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def reports(helper, export_dir, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """The helper's report in this interpreter (5.x) and in the slicegpt env's (4.41)."""
    python = slicegpt_env_path() / "bin" / "python"
    if not python.exists():
        pytest.fail(f"the stand-in slicegpt env is missing ({python}): run `make envs`")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path_factory.mktemp("hf-modules")), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [str(python), str(HELPER), str(FIXTURE), str(export_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        env=env,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {"5.x": helper.run(FIXTURE, export_dir), "4.41": json.loads(completed.stdout)}


@pytest.fixture(params=VERSIONS)
def report(request, reports) -> dict[str, Any]:
    return reports[request.param]


# --------------------------------------------------------------------------------------------
# Fidelity, generation, the random variant and the export, under both transformers versions
# --------------------------------------------------------------------------------------------


def test_reports_come_from_both_versions(reports):
    assert reports["5.x"]["transformers"].startswith("5."), reports["5.x"]["transformers"]
    assert reports["4.41"]["transformers"] == "4.41.0", reports["4.41"]["transformers"]


def test_fp32_matches_official_logits(report):
    for name in ("probe", "text"):
        metrics = report["fp32"][name]
        assert metrics["nmse"] <= NMSE_LIMIT, (name, metrics)
        assert metrics["top1"] == 1.0, (name, metrics)


def test_fp16_is_within_fp16_rounding_of_official_logits(report):
    for name in ("probe", "text"):
        assert report["fp16"][name]["nmse"] < FP16_NMSE_LIMIT, (name, report["fp16"][name])


def test_generation_cache_padding_and_beams(report):
    assert all(report["generate"].values()), report["generate"]


def test_variant_with_su_scaling_and_sliding_window_keeps_cache_equal_to_no_cache(report):
    variant = report["variant"]
    for check in ("greedy_cache_equals_no_cache", "beam_search_cache_equals_no_cache", "finite_logits"):
        assert variant[check], variant
    assert variant["window_changes_logits"], "the 5-position window made no difference over 22 tokens"
    if report["transformers"].startswith("5."):  # generate's sliding-window cache keeps only the window's keys
        assert variant["cache_layers"] == ["DynamicSlidingWindowLayer"], variant


def test_rotated_dense_phi3_equals_its_sliced_rebuild(report):
    cases = report["dense_equivalence"]
    expected = {"default", "su", "yarn"} if report["transformers"] == "4.41.0" else {"default", "longrope"}
    assert set(cases) == expected
    for name, case in cases.items():
        assert case["short"] <= DENSE_LIMIT and case["long"] <= DENSE_LIMIT, (name, case)
        assert case["generate_equal"], (name, case)
        if "window_one_shorter" in case:  # 4.41 lets a query see `sliding_window` predecessors and itself
            assert case["window_one_shorter"] > 1e-2, (name, case)


def test_rope_equals_transformers_4_41_phi3_classes(reports):
    rope = reports["4.41"]["rope_against_441"]
    assert set(rope) == {"default", "su", "yarn"}
    for name, case in rope.items():
        assert case["short"] <= 1e-7 and case["long"] <= 1e-7, (name, case)
    assert rope["default"]["attention_factor"] == 1.0
    assert rope["su"]["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(64 / 16) / math.log(16)))
    assert rope["yarn"]["attention_factor"] == pytest.approx(0.1 * math.log(64 / 16) + 1.0)


def test_export_loads_with_remote_code(report):
    export = report["export"]
    assert export["class"] == "SlicedPhi3ForCausalLM", export
    assert export["dtype"] == "torch.float32", export
    assert export["equals_in_process"], export
    for name, metrics in export["fp32"].items():
        assert metrics["nmse"] <= NMSE_LIMIT and metrics["top1"] == 1.0, (name, metrics)


# --------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------


def test_config_from_base_and_slicing_matches_the_official_checkpoint(helper, fixture_config):
    config = fixture_config
    assert (config.model_type, config.head_dim, config.original_max_position_embeddings) == ("sliced_phi3", 24, 256)
    assert config.sliding_window == 256 and config.base_sliding_window == 255
    assert config.tie_word_embeddings is False and config.base_tie_word_embeddings is False
    assert config.rotary_scaling is None and config.rope_theta == 10000.0
    assert (config.embedding_dimension, config.mlp_output_dimensions, config.lm_head_dimension) == (72, [72, 96], 96)
    assert (config.sparsity, config.round_interval) == (0.2, 8)
    assert config.residual_width_errors() == []

    with torch.device("meta"):
        model = SlicedPhi3ForCausalLM(config)
    checkpoint = torch.load(FIXTURE / "sliced" / f"{helper.CHECKPOINT}.pt", weights_only=True)
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == {
        name: tuple(t.shape) for name, t in checkpoint.items()
    }
    assert model.lm_head.bias is None


def test_config_round_trips_through_its_dict(fixture_config):
    again = portable.config_from_dict(json.loads(json.dumps(fixture_config.to_dict())))
    assert isinstance(again, SlicedPhi3Config)
    assert again.to_dict() == fixture_config.to_dict()  # the window is not widened a second time


def test_inconsistent_widths_are_caught(helper):
    config = helper.variant_config()
    config.mlp_input_dimensions = [56, 48, 48]
    errors = config.residual_width_errors()
    assert len(errors) == 1 and errors[0].startswith("mlp_input_dimensions[1] is 48"), errors
    with pytest.raises(ValueError, match="inconsistent sliced widths"):
        SlicedPhi3ForCausalLM(config)


def test_rope_types_phi3_does_not_have_are_refused():
    for rope_type in ("linear", "dynamic", "llama3"):
        with pytest.raises(ValueError, match=f"{rope_type}.*not supported by the sliced Phi-3 model"):
            SlicedPhi3Config(hidden_size=64, num_attention_heads=4, rope_scaling={"type": rope_type, "factor": 2.0})
    with pytest.raises(ValueError, match="long_factor as a list of 8 numbers"):
        SlicedPhi3Config(
            hidden_size=64,
            num_attention_heads=4,
            rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": [1.0] * 7},
        )


def test_longrope_is_su_unless_it_names_its_attention_factor(helper):
    factors = {"short_factor": helper.SHORT_FACTORS, "long_factor": helper.LONG_FACTORS}

    def cos_sin(**scaling: Any) -> tuple[torch.Tensor, torch.Tensor]:
        config = SlicedPhi3Config(
            hidden_size=64,
            num_attention_heads=4,
            max_position_embeddings=64,
            original_max_position_embeddings=8,
            rope_parameters={"rope_theta": 500.0, **factors, **scaling},  # the transformers 5.x spelling
        )
        assert config.rope_theta == 500.0
        return SlicedPhi3RotaryEmbedding(config)(torch.zeros(1), torch.arange(20)[None])

    su, longrope = cos_sin(rope_type="su"), cos_sin(rope_type="longrope")
    assert torch.equal(su[0], longrope[0]) and torch.equal(su[1], longrope[1])
    named = cos_sin(rope_type="longrope", attention_factor=2.0)
    su_factor = math.sqrt(1 + math.log(64 / 8) / math.log(8))
    assert torch.allclose(named[0], su[0] * 2.0 / su_factor) and not torch.allclose(named[0], su[0])


def test_model_built_from_config_alone_runs(helper):
    config = helper.variant_config()
    torch.manual_seed(0)
    model = SlicedPhi3ForCausalLM(config).eval()
    assert torch.equal(model.model.layers[0].attn_shortcut_Q, torch.eye(40, 56))
    ids = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 11, config.vocab_size) and torch.isfinite(logits).all()
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 14)
