"""The portable sliced Llama: fidelity to the official SliceGPT logits, generation, a random GQA + llama3-RoPE
+ tied variant, rotated dense Llamas and exports with remote code, under transformers 5.x (this interpreter) and
4.41 (the slicegpt env), through ``helpers/family_check.py``; transformers features and the config in this one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import family_check as helper
from helpers.paths import FIXTURE

from slicebridge.model import portable
from slicebridge.model.checkpoint import read_checkpoint
from slicebridge.model.configuration_sliced_llama import SlicedLlamaConfig
from slicebridge.model.export import auto_map, write_remote_code
from slicebridge.model.families import BY_KEY
from slicebridge.model.modeling_sliced_llama import SlicedLlamaForCausalLM
from slicebridge.model.sliced_decoder import CACHE_OUTPUT_FIELD, count_sliced_parameters, rope_inverse_frequencies

FP16_NMSE_LIMIT = 1e-5  # measured: 7.7e-7 (probe) and 8.2e-7 (text) under both versions
DENSE_LIMIT = 2e-4  # max |logit diff| of a rotated dense Llama vs its rebuild; measured <= 5.1e-6
DENSE_CASES = {
    "5.x": {"default", "linear", "dynamic", "tied", "llama3", "llama3_tied"},
    "4.41": {"default", "linear", "dynamic", "tied"},
}


@pytest.fixture(scope="module")
def reports(slicegpt_env, tmp_path_factory) -> dict[str, dict]:
    return helper.reports_under_both_versions(FIXTURE, tmp_path_factory.mktemp("llama-reports"), slicegpt_env)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def fixture_checkpoint():
    return read_checkpoint(FIXTURE / "sliced")


@pytest.fixture(scope="module")
def model_fp32(fixture_checkpoint) -> SlicedLlamaForCausalLM:
    return fixture_checkpoint.build_model(dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Under both transformers versions
# --------------------------------------------------------------------------------------------


def test_matches_official_model_under_both_versions(reports):
    helper.assert_reports(reports, FP16_NMSE_LIMIT)


def test_rotated_dense_llamas_equal_their_sliced_rebuild(reports):
    """Transformers' own LlamaForCausalLM of each version, rotated as SliceGPT does (without slicing), per RoPE
    scaling and with tied embeddings, against the sliced model rebuilt from the rotated tensors."""
    helper.assert_dense_equivalence(reports, DENSE_CASES, DENSE_LIMIT)
    config = SlicedLlamaConfig.from_base_and_slicing(helper.dense_model("llama").config.to_dict(), {})
    assert config.num_key_value_heads == 2 and config.mlp_output_dimensions == [64, 64]


# --------------------------------------------------------------------------------------------
# transformers features
# --------------------------------------------------------------------------------------------


def test_loss_is_shifted_cross_entropy(model_fp32, reference):
    ids = reference["probe_ids"][:, :20]
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        output = model_fp32(ids, labels=labels)
    manual = F.cross_entropy(output.logits[:, :-1].reshape(-1, output.logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert torch.allclose(output.loss, manual, atol=1e-6)


def test_left_and_right_padding_match_unpadded(model_fp32, reference):
    short = reference["probe_ids"][1:2, :9]
    pad = 5
    left = torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)
    right = torch.cat([short, torch.zeros(1, pad, dtype=torch.long)], dim=1)
    left_mask = (torch.arange(left.shape[1]) >= pad).long()[None]
    right_mask = (torch.arange(right.shape[1]) < short.shape[1]).long()[None]
    with torch.no_grad():
        alone = model_fp32(short).logits
        left_logits = model_fp32(left, attention_mask=left_mask).logits
        right_logits = model_fp32(right, attention_mask=right_mask).logits
    assert torch.allclose(left_logits[:, -1], alone[:, -1], atol=1e-5)
    assert torch.allclose(right_logits[:, : short.shape[1]], alone, atol=1e-5)
    assert torch.isfinite(left_logits).all()


def test_legacy_tuple_cache_continues_decoding(model_fp32, reference):
    ids = reference["probe_ids"][:, :16]
    with torch.no_grad():
        full = model_fp32(ids, use_cache=False).logits
        first = model_fp32(ids[:, :10], use_cache=True)
        cache = getattr(first, CACHE_OUTPUT_FIELD)
        legacy = tuple((layer_keys, layer_values) for layer_keys, layer_values in _cache_tensors(cache))
        rest = model_fp32(ids[:, 10:], past_key_values=legacy, use_cache=True)
    assert isinstance(getattr(rest, CACHE_OUTPUT_FIELD), tuple)
    assert torch.allclose(rest.logits, full[:, 10:], atol=1e-5)


def _cache_tensors(cache):
    if hasattr(cache, "layers"):  # transformers 5.x
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def test_dtype_and_device_moves(fixture_checkpoint, reference):
    model = fixture_checkpoint.build_model()
    assert model.dtype == torch.float16
    ids = reference["probe_ids"][:, :8]
    with torch.no_grad():
        assert model.float()(ids).logits.dtype == torch.float32
        assert model.half()(ids).logits.dtype == torch.float16
        assert model.to("cpu", torch.float32)(ids).logits.dtype == torch.float32
    assert model.config.model_type == "sliced_llama"


def test_build_uses_given_tensors_without_init(fixture_checkpoint):
    compact = {name: tensor.clone() for name, tensor in fixture_checkpoint.load_tensors().items()}
    model = portable.build_model(compact, fixture_checkpoint.sliced_config())
    assert model.lm_head.weight.data_ptr() == compact["lm_head.weight"].data_ptr()
    assert not any(param.is_meta for param in model.parameters())
    assert not model.training


def test_build_names_misfitting_tensors(fixture_checkpoint):
    tensors = dict(fixture_checkpoint.load_tensors())
    tensors["model.layers.1.attn_shortcut_Q"] = torch.zeros(96, 88, dtype=torch.float16)
    del tensors["model.layers.2.mlp_shortcut_Q"]
    with pytest.raises(ValueError) as raised:
        portable.build_model(tensors, fixture_checkpoint.sliced_config())
    message = str(raised.value)
    assert "model.layers.1.attn_shortcut_Q is (96, 88), expected (96, 96)" in message
    assert "missing model.layers.2.mlp_shortcut_Q" in message


def test_save_and_reload_with_remote_code(model_fp32, reference, tmp_path):
    from transformers import AutoModelForCausalLM

    model_fp32.save_pretrained(tmp_path)
    write_remote_code(tmp_path, BY_KEY["llama"])
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = auto_map(BY_KEY["llama"])
    (tmp_path / "config.json").write_text(json.dumps(config))

    direct = SlicedLlamaForCausalLM.from_pretrained(tmp_path)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    ids = reference["probe_ids"][:, :12]
    with torch.no_grad():
        expected = model_fp32(ids).logits
        assert torch.equal(direct(ids).logits, expected)
        assert torch.equal(remote(ids).logits, expected)
    assert remote.config.attention_input_dimensions == [96, 96, 96, 96]
    assert remote.config.mlp_output_dimensions == [96, 96, 96, 128]


def test_parameter_counts_on_fixture(fixture_checkpoint, model_fp32):
    from safetensors.torch import load_file

    dense_actual = sum(tensor.numel() for tensor in load_file(str(FIXTURE / "base" / "model.safetensors")).values())
    dense = BY_KEY["llama"].dense_parameters(fixture_checkpoint.base_config)
    assert dense == dense_actual == 982_144

    counts = count_sliced_parameters(model_fp32)
    assert counts.total == fixture_checkpoint.parameter_count == 855_552
    assert counts.shortcut == fixture_checkpoint.shortcut_parameter_count == 3 * 2 * 96 * 96 + 96 * 96 + 96 * 128
    assert count_sliced_parameters(fixture_checkpoint.load_tensors()) == counts
    assert fixture_checkpoint.actual_ratio() == pytest.approx(1 - 855_552 / 982_144)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_config_from_base_and_slicing_and_json_round_trip(fixture_checkpoint, tmp_path):
    config = SlicedLlamaConfig.from_base_and_slicing(
        fixture_checkpoint.base_config, fixture_checkpoint.slicing_config, sparsity=0.25, round_interval=8
    )
    assert config.hidden_size == 128 and config.embedding_dimension == 96 and config.lm_head_dimension == 128
    assert config.num_key_value_heads == 2 and config.head_dim == 32 and config.rope_theta == 500000.0
    assert config.fused_norm_eps == 1e-5 and config.tie_word_embeddings is False
    assert config.residual_width_errors() == []
    config.save_pretrained(tmp_path)
    reloaded = SlicedLlamaConfig.from_pretrained(tmp_path)
    for field in ("mlp_output_dimensions", "attention_input_dimensions", "rope_theta", "rotary_scaling", "sparsity"):
        assert getattr(reloaded, field) == getattr(config, field)


def test_config_accepts_transformers_5_rope_parameters():
    base = {
        "vocab_size": 50,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    }
    config = SlicedLlamaConfig.from_base_and_slicing(base, {"const_dimension": 48})
    assert config.rope_theta == 500000.0 and config.rotary_scaling["rope_type"] == "llama3"
    assert config.embedding_dimension == 48 and config.mlp_output_dimensions == [48, 64]
    bad = SlicedLlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, attention_input_dimensions=[48, 40]
    )
    assert any("attention_input_dimensions[0]" in error for error in bad.residual_width_errors())
    with pytest.raises(ValueError, match="yarn"):
        SlicedLlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 2.0})


# --------------------------------------------------------------------------------------------
# Llama RoPE and the random variant, in this interpreter
# --------------------------------------------------------------------------------------------


ROPE_SCALINGS = {"linear": {"rope_type": "linear", "factor": 2.0}, "llama3": helper.LLAMA3_SCALING}


def test_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for rope_name, scaling in ROPE_SCALINGS.items():
        hf_config = LlamaConfig(
            hidden_size=64,
            num_attention_heads=4,
            max_position_embeddings=16,
            rope_parameters={"rope_theta": 10000.0, **scaling},
        )
        expected, _ = ROPE_INIT_FUNCTIONS[rope_name](hf_config, "cpu")
        config = SlicedLlamaConfig(
            hidden_size=64, num_attention_heads=4, max_position_embeddings=16, rope_scaling=scaling
        )
        ours = rope_inverse_frequencies(
            config.head_dim, config.rope_theta, config.rotary_scaling, config.max_position_embeddings
        )
        assert torch.allclose(ours, expected.float(), rtol=1e-6), rope_name


def test_random_sliced_gqa_llama3_tied_model_generates():
    config = helper.variant_config("llama")
    model = portable.build_model(helper.random_sliced_tensors(config), config)
    assert model.model.layers[0].attn_shortcut_Q.shape == (40, 56)
    assert model.model.layers[2].mlp_shortcut_Q.shape == (48, 40)
    with torch.no_grad():  # its generation checks are in the reports (test_matches_official_model_...)
        prompt = torch.randint(3, 53, (2, 6), generator=torch.Generator().manual_seed(5))
        sampled = model.generate(prompt, max_new_tokens=5, do_sample=True, top_p=0.9)
    assert sampled.shape == (2, 11)
