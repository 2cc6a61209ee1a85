"""The portable sliced Phi-2: fidelity to the official SliceGPT logits, generation, a random variant, rotated
dense Phi models and exports with remote code, under transformers 5.x (this interpreter) and 4.41 (the slicegpt
env), through ``helpers/family_check.py``; the checkpoint's layout and the config."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import family_check as helper
from helpers.paths import SHARED_FIXTURES

from slicebridge.model import families, portable
from slicebridge.model.configuration_sliced_phi2 import SlicedPhi2Config
from slicebridge.model.modeling_sliced_phi2 import SlicedPhi2ForCausalLM
from slicebridge.model.sliced_decoder import count_sliced_parameters

PHI2_FIXTURE = SHARED_FIXTURES / "slicegpt-phi2-tiny"
FP16_NMSE_LIMIT = 1e-4  # measured: 0.0 on both inputs (the official model also ran in fp16 on a CPU)
DENSE_LIMIT = 1e-4  # max |logit diff| of a rotated dense Phi vs transformers' own (measured <= 5e-7)


@pytest.fixture(scope="module")
def reports(slicegpt_env, tmp_path_factory) -> dict[str, dict]:
    return helper.reports_under_both_versions(PHI2_FIXTURE, tmp_path_factory.mktemp("phi2-reports"), slicegpt_env)


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    return torch.load(helper.checkpoint_path(PHI2_FIXTURE), weights_only=True)


@pytest.fixture(scope="module")
def base_config() -> dict:
    return json.loads((PHI2_FIXTURE / "base" / "config.json").read_text())


# --------------------------------------------------------------------------------------------
# Fidelity, generation, rotated dense models and exports, under both transformers versions
# --------------------------------------------------------------------------------------------


def test_matches_official_model_under_both_versions(reports):
    helper.assert_reports(reports, FP16_NMSE_LIMIT)
    for version, report in reports.items():
        assert all(report["fp16"][name]["top1"] == 1.0 for name in helper.INPUTS), (version, report["fp16"])


def test_rotated_dense_phi_equals_its_sliced_rebuild(reports):
    cases = {"default", "linear", "dynamic"}
    helper.assert_dense_equivalence(reports, dict.fromkeys(helper.VERSIONS, cases), DENSE_LIMIT)


# --------------------------------------------------------------------------------------------
# The checkpoint's layout and the family table
# --------------------------------------------------------------------------------------------


def test_state_dict_names_are_the_official_ones(state_dict):
    model = helper.fixture_model(PHI2_FIXTURE, torch.float32)
    assert set(model.state_dict()) == set(state_dict)
    assert not any("mlp_shortcut_Q" in name or "norm" in name for name in model.state_dict())
    assert model.lm_head.bias is not None
    assert model.model.layers[1].attn_shortcut_Q.shape == (112, 160)

    assert families.family_of_tensors(state_dict).key == "phi2"
    assert portable.family_of(model.config).key == "phi2"
    assert portable.model_class(families.family_named("phi2")) is SlicedPhi2ForCausalLM

    counts = count_sliced_parameters(model)
    assert counts.total == json.loads((PHI2_FIXTURE / "fixture.json").read_text())["sliced_param_count"] == 747_428
    assert counts.shortcut == 112 * 112 + 112 * 160


def test_build_refuses_a_sequential_layout(state_dict):
    tensors = {**state_dict, "model.layers.0.mlp_shortcut_Q": torch.zeros(112, 112, dtype=torch.float16)}
    with pytest.raises(ValueError, match="unexpected model.layers.0.mlp_shortcut_Q"):
        portable.build_model(tensors, helper.fixture_config(PHI2_FIXTURE))


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_config_from_fixture_and_json_round_trip(tmp_path):
    config = helper.fixture_config(PHI2_FIXTURE)
    assert SlicedPhi2Config.parallel_blocks is True and config.model_type == "sliced_phi2"
    assert config.embedding_dimension == 112 and config.lm_head_dimension == 160
    assert config.attention_input_dimensions == config.mlp_input_dimensions == [112, 112]
    assert config.attention_output_dimensions == config.mlp_output_dimensions == [112, 160]
    assert config.residual_width_errors() == []
    assert config.head_dim == 32 and config.rotary_dim == 16 and config.rotary_scaling is None
    assert config.hidden_act == "gelu_new" and config.lm_head_bias is True and config.fused_norm_eps == 1e-5
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)  # pad = EOS, as the adapter
    assert config.tie_word_embeddings is False and config.base_tie_word_embeddings is False
    assert (config.sparsity, config.round_interval) == (0.3, 8)

    config.save_pretrained(tmp_path)
    reloaded = SlicedPhi2Config.from_pretrained(tmp_path)
    from_dict = portable.config_from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert isinstance(from_dict, SlicedPhi2Config)
    for field in ("mlp_output_dimensions", "attention_output_dimensions", "partial_rotary_factor", "pad_token_id"):
        assert getattr(reloaded, field) == getattr(from_dict, field) == getattr(config, field)


def test_config_reads_rope_settings_of_both_versions(base_config):
    five = {**base_config, "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e3}}
    five["rope_parameters"]["partial_rotary_factor"] = 0.4
    del five["partial_rotary_factor"], five["rope_theta"]
    config = SlicedPhi2Config.from_base_and_slicing(five, {"const_dimension": 96})
    assert config.rope_theta == 5e3 and config.partial_rotary_factor == 0.4 and config.rotary_dim == 12
    assert config.rotary_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.embedding_dimension == 96 and config.mlp_output_dimensions == [96, 160]

    four = {**base_config, "rope_scaling": {"type": "dynamic", "factor": 4.0}}
    assert SlicedPhi2Config.from_base_and_slicing(four, {}).rotary_scaling == {"rope_type": "dynamic", "factor": 4.0}
    with pytest.raises(ValueError, match="'yarn' is not supported by the sliced Phi-2 model"):
        SlicedPhi2Config.from_base_and_slicing({**base_config, "rope_scaling": {"type": "yarn", "factor": 2.0}}, {})


def test_qk_layernorm_is_refused(base_config):
    with pytest.raises(ValueError, match="qk_layernorm=True is not supported"):
        SlicedPhi2Config.from_base_and_slicing({**base_config, "qk_layernorm": True}, {})


def test_residual_width_errors_catch_inconsistent_widths():
    assert helper.variant_config("phi2").residual_width_errors() == []
    cases = {
        "attention_output_dimensions": ([56, 40, 40], "attention_output_dimensions[1] is 40 but the parallel MLP"),
        "mlp_input_dimensions": ([40, 56, 40], "mlp_input_dimensions[2] is 40 but the residual stream there is 32"),
        "lm_head_dimension": (48, "lm_head_dimension is 48 but the last layer outputs 40"),
    }
    for field, (value, message) in cases.items():
        config = helper.variant_config("phi2")
        setattr(config, field, value)
        errors = config.residual_width_errors()
        assert any(message in error for error in errors), (field, errors)
        with pytest.raises(ValueError, match="inconsistent sliced widths"):
            SlicedPhi2ForCausalLM(config)


# --------------------------------------------------------------------------------------------
# A model from a config alone
# --------------------------------------------------------------------------------------------


def test_model_from_config_alone_runs():
    torch.manual_seed(0)
    model = SlicedPhi2ForCausalLM(helper.variant_config("phi2")).eval()
    layer = model.model.layers[0]
    assert torch.equal(layer.attn_shortcut_Q.detach(), torch.eye(40, 56))
    assert layer.self_attn.k_proj.weight.shape == (2 * 16, 40) and layer.self_attn.dense.weight.shape == (56, 96)
    assert model.lm_head.weight.shape == (53, 40) and model.lm_head.bias is not None
    ids = torch.randint(3, 53, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = model(ids, labels=ids)
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert output.logits.shape == (2, 6, 53) and torch.isfinite(output.logits).all()
    assert torch.isfinite(output.loss)
    assert generated.shape == (2, 10)
