"""The portable sliced OPT: fidelity to the official SliceGPT logits, generation, a random variant and exports
with remote code, under transformers 5.x (this interpreter) and 4.41 (the slicegpt env), through
``helpers/family_check.py``; its config and what it refuses."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import family_check as helper
from helpers.paths import SHARED_FIXTURES

from slicebridge.model import portable
from slicebridge.model.configuration_sliced_opt import SlicedOPTConfig
from slicebridge.model.families import family_named
from slicebridge.model.modeling_sliced_opt import SlicedOPTForCausalLM, opt_positions
from slicebridge.model.sliced_decoder import count_sliced_parameters

OPT_FIXTURE = SHARED_FIXTURES / "slicegpt-opt-tiny"
FP16_NMSE_LIMIT = 1e-4  # measured: 6.9e-7 (probe) and 6.6e-7 (text) on the fixture


def _base_config() -> dict:
    return json.loads((OPT_FIXTURE / "base" / "config.json").read_text())


def _slicing_config() -> dict:
    return json.loads((OPT_FIXTURE / "sliced" / "opt-tiny_0.2.json").read_text())


@pytest.fixture(scope="module")
def reports(slicegpt_env, tmp_path_factory) -> dict[str, dict]:
    return helper.reports_under_both_versions(OPT_FIXTURE, tmp_path_factory.mktemp("opt-reports"), slicegpt_env)


# --------------------------------------------------------------------------------------------
# Fidelity, generation and exports, under both transformers versions
# --------------------------------------------------------------------------------------------


def test_matches_official_model_under_both_versions(reports):
    helper.assert_reports(reports, FP16_NMSE_LIMIT)


def test_fixture_parameter_counts():
    from safetensors.torch import load_file

    facts = json.loads((OPT_FIXTURE / "fixture.json").read_text())
    model = helper.fixture_model(OPT_FIXTURE, torch.float32)
    assert count_sliced_parameters(model).total == facts["sliced_param_count"] == 369_900
    dense = load_file(str(OPT_FIXTURE / "base" / "model.safetensors"))
    assert family_named("opt").dense_parameters(_base_config()) == sum(t.numel() for t in dense.values())


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_config_from_base_and_slicing_and_json_round_trip(tmp_path):
    config = SlicedOPTConfig.from_base_and_slicing(_base_config(), _slicing_config(), sparsity=0.2, round_interval=8)
    assert config.model_type == "sliced_opt" and config.hidden_size == 96 and config.ffn_dim == 384
    assert config.embedding_dimension == 72 and config.mlp_output_dimensions == [72, 96]
    assert config.lm_head_dimension == 96 and config.residual_width_errors() == []
    assert config.activation_function == "relu" and config.enable_bias and config.do_layer_norm_before
    assert config.tie_word_embeddings is False and config.base_tie_word_embeddings is True
    assert config.lm_head_bias is True and config.fused_norm_eps == 1e-5
    config.save_pretrained(tmp_path)
    reloaded = SlicedOPTConfig.from_pretrained(tmp_path)
    again = portable.config_from_dict(config.to_dict())
    for field in ("attention_input_dimensions", "mlp_output_dimensions", "lm_head_bias", "sparsity", "pad_token_id"):
        assert getattr(reloaded, field) == getattr(again, field) == getattr(config, field), field


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"do_layer_norm_before": False}, "do_layer_norm_before False"),
        ({"word_embed_proj_dim": 64}, "word_embed_proj_dim 64 != hidden_size 96"),
        ({"_remove_final_layer_norm": True}, "_remove_final_layer_norm True"),
    ],
    ids=["post-layer-norm", "project-in-out", "no-final-norm"],
)
def test_refuses_opt_350m_style_layouts(change, words):
    with pytest.raises(ValueError, match="OPT-350m-style") as raised:
        SlicedOPTConfig.from_base_and_slicing({**_base_config(), **change}, _slicing_config())
    assert words in str(raised.value)


def test_refuses_layouts_in_the_constructor_too():
    with pytest.raises(ValueError, match="OPT-350m-style"):
        SlicedOPTConfig(do_layer_norm_before=False)
    with pytest.raises(ValueError, match="layer_norm_elementwise_affine False"):
        SlicedOPTConfig.from_base_and_slicing({**_base_config(), "layer_norm_elementwise_affine": False}, {})


def test_residual_width_errors_catch_inconsistent_widths():
    assert helper.variant_config("opt").residual_width_errors() == []
    config = helper.variant_config("opt", attention_input_dimensions=[48, 48, 56])
    errors = config.residual_width_errors()
    assert errors == [
        "attention_input_dimensions[1] is 48 but the residual stream there is 40 wide (mlp_output_dimensions[0])"
    ]
    with pytest.raises(ValueError, match="inconsistent sliced widths"):
        SlicedOPTForCausalLM(config)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def test_layout_without_enable_bias_is_what_the_official_fusion_leaves():
    """fuse_ln_linear gives q/k/v_proj and fc1 the LayerNorm's bias even when OPT had none; out_proj and
    fc2 stay bias-free; the head gets the final LayerNorm's bias; positions keep OPT's 2 extra rows."""
    config = helper.variant_config("opt")
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in SlicedOPTForCausalLM(config).state_dict().items()}
    layer = "model.decoder.layers.0."
    assert {name.removeprefix(layer) for name in shapes if name.startswith(layer)} == {
        *(f"self_attn.{proj}.{kind}" for proj in ("q_proj", "k_proj", "v_proj") for kind in ("weight", "bias")),
        "self_attn.out_proj.weight",
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "attn_shortcut_Q",
        "mlp_shortcut_Q",
    }
    assert shapes["model.decoder.embed_positions.weight"] == (42, 48)
    assert shapes["lm_head.weight"] == (61, 32) and shapes["lm_head.bias"] == (61,)
    assert shapes["model.decoder.layers.2.mlp_shortcut_Q"] == (40, 32)


def test_model_from_config_alone_runs():
    config = helper.variant_config("opt")
    torch.manual_seed(0)
    model = SlicedOPTForCausalLM(config).eval()
    shortcut = model.model.decoder.layers[0].attn_shortcut_Q
    assert torch.equal(shortcut, torch.eye(48, 56))
    prompt = torch.randint(3, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(prompt).logits
        generated = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert logits.shape == (2, 7, 61) and torch.isfinite(logits).all() and logits.std() > 0
    assert generated.shape == (2, 10)


def test_positions_count_real_tokens_and_only_the_new_ones():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert opt_positions(mask, 0, 5, mask.device).tolist() == [[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert opt_positions(mask, 3, 2, mask.device).tolist() == [[1, 2], [3, 4]]
    assert opt_positions(None, 3, 2, mask.device).tolist() == [[3, 4]]


def test_left_padding_keeps_positions_in_the_fixture():
    """A 2D mask shifts OPT's learned positions past the padding; the same visibility given as a 4D mask
    (positions then simply count from 0) changes the logits, so the check can fail."""
    reference = torch.load(OPT_FIXTURE / "reference.pt", weights_only=True)
    model = helper.fixture_model(OPT_FIXTURE, torch.float32)
    ids = reference["probe_ids"][:, :16]
    padded = torch.cat([torch.ones(2, 3, dtype=torch.long), ids], dim=1)
    mask = (torch.arange(19) >= 3).long().expand(2, 19)
    visible = torch.ones(19, 19).tril().bool() & mask[0].bool() | torch.eye(19, dtype=torch.bool)
    with torch.no_grad():
        plain = model(ids).logits
        by_mask = model(padded, attention_mask=mask).logits[:, 3:]
        unshifted = model(padded, attention_mask=visible.expand(2, 1, 19, 19)).logits[:, 3:]
    assert torch.allclose(by_mask, plain, atol=1e-5)
    assert not torch.allclose(unshifted, plain, atol=1e-2)
