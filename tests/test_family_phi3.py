"""The portable sliced Phi-3: fidelity to the official SliceGPT logits, generation, Phi-3's RoPE scalings and
sliding window, rotated dense Phi-3 models and exports with remote code, under transformers 5.x (this
interpreter) and 4.41 (the slicegpt env, SliceGPT's pin), through ``helpers/family_check.py``; the config."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from helpers import family_check as helper
from helpers.paths import SHARED_FIXTURES

from slicebridge.model import portable
from slicebridge.model.configuration_sliced_phi3 import SlicedPhi3Config
from slicebridge.model.modeling_sliced_phi3 import SlicedPhi3ForCausalLM, SlicedPhi3RotaryEmbedding

FIXTURE = SHARED_FIXTURES / "slicegpt-phi3-tiny"
FP16_NMSE_LIMIT = 1e-4  # measured: 6.4e-7 (probe), 5.9e-7 (text) under both versions
DENSE_LIMIT = 1e-5  # max |logit diff| of a rotated dense Phi-3 vs its rebuild; measured <= 3.6e-7
DENSE_CASES = {"5.x": {"default", "longrope"}, "4.41": {"default", "su", "yarn"}}


@pytest.fixture(scope="module")
def fixture_config() -> SlicedPhi3Config:
    return helper.fixture_config(FIXTURE)


@pytest.fixture(scope="module")
def reports(slicegpt_env, tmp_path_factory) -> dict[str, dict[str, Any]]:
    return helper.reports_under_both_versions(FIXTURE, tmp_path_factory.mktemp("phi3-reports"), slicegpt_env)


# --------------------------------------------------------------------------------------------
# Fidelity, generation, the random variant, rotated dense models and the exports, under both versions
# --------------------------------------------------------------------------------------------


def test_matches_official_model_under_both_versions(reports):
    helper.assert_reports(reports, FP16_NMSE_LIMIT)


def test_variant_window_changes_logits_and_5x_caches_only_the_window(reports):
    """The random variant (su scaling, a 5-position window) keeps cache == no cache (``test_matches_...``);
    here: the window makes a difference over its 30 tokens, and 5.x's generate keeps only the window's keys."""
    for version, report in reports.items():
        assert report["variant"]["window_changes_logits"], (version, "the window made no difference")
    assert reports["5.x"]["variant_cache_layers"] == ["DynamicSlidingWindowLayer"], reports["5.x"]


def test_rotated_dense_phi3_equals_its_sliced_rebuild(reports):
    """4.41 lets a query see ``sliding_window`` predecessors and itself: a window one shorter must differ."""
    helper.assert_dense_equivalence(reports, DENSE_CASES, DENSE_LIMIT)


def test_rope_equals_transformers_4_41_phi3_classes(reports):
    rope = reports["4.41"]["rope_against_441"]
    assert set(rope) == {"default", "su", "yarn"}
    for name, case in rope.items():
        assert case["short"] <= 1e-7 and case["long"] <= 1e-7, (name, case)
    assert rope["default"]["attention_factor"] == 1.0
    assert rope["su"]["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(64 / 16) / math.log(16)))
    assert rope["yarn"]["attention_factor"] == pytest.approx(0.1 * math.log(64 / 16) + 1.0)


# --------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------


def test_config_from_base_and_slicing_matches_the_official_checkpoint(fixture_config):
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
    checkpoint = torch.load(helper.checkpoint_path(FIXTURE), weights_only=True)
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == {
        name: tuple(t.shape) for name, t in checkpoint.items()
    }
    assert model.lm_head.bias is None


def test_config_round_trips_through_its_dict(fixture_config):
    again = portable.config_from_dict(json.loads(json.dumps(fixture_config.to_dict())))
    assert isinstance(again, SlicedPhi3Config)
    assert again.to_dict() == fixture_config.to_dict()  # the window is not widened a second time


def test_inconsistent_widths_are_caught():
    config = helper.variant_config("phi3")
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


def test_longrope_is_su_unless_it_names_its_attention_factor():
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


def test_model_built_from_config_alone_runs():
    config = helper.variant_config("phi3")
    torch.manual_seed(0)
    model = SlicedPhi3ForCausalLM(config).eval()
    assert torch.equal(model.model.layers[0].attn_shortcut_Q, torch.eye(40, 56))
    ids = torch.randint(0, config.vocab_size, (2, 11))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 11, config.vocab_size) and torch.isfinite(logits).all()
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 14)
