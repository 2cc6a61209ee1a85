"""The SliceGPT checkpoint reader: the official fixture in its accepted layouts, and every bad
input a user can hand it, each raising its own error type with a message to act on."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURE, SHARED_FIXTURES

from slicebridge.model import checkpoint as checkpoint_module
from slicebridge.model import errors
from slicebridge.model.checkpoint import SlicedWidths, explain_width, read_checkpoint, sliced_width
from slicebridge.model.families import FAMILIES

SLICED = FIXTURE / "sliced"
CHECKPOINT = SLICED / "Meta-Llama-3-tiny_0.25.pt"
SLICING_JSON = SLICED / "Meta-Llama-3-tiny_0.25.json"

FIXTURE_WIDTHS = SlicedWidths(
    embedding=96,
    attention_input=(96, 96, 96, 96),
    attention_output=(96, 96, 96, 96),
    mlp_input=(96, 96, 96, 96),
    mlp_output=(96, 96, 96, 128),
    lm_head=128,
)


def _copy(source: Path, directory: Path, name: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / (name or source.name)
    shutil.copyfile(source, target)
    return target


def _base_dir_with(tmp_path: Path, **changes) -> Path:
    config = json.loads((FIXTURE / "base" / "config.json").read_text())
    config.update(changes)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config))
    return base


# --------------------------------------------------------------------------------------------
# Accepted layouts
# --------------------------------------------------------------------------------------------


def test_reads_run_slicegpt_save_dir():
    checkpoint = read_checkpoint(SLICED)
    assert checkpoint.checkpoint_path == CHECKPOINT
    assert checkpoint.base_dir == SLICED
    assert checkpoint.slicing_config_path == SLICING_JSON
    assert checkpoint.model_stem == "Meta-Llama-3-tiny"
    assert checkpoint.sparsity == 0.25
    assert checkpoint.round_interval == 8
    assert checkpoint.widths == FIXTURE_WIDTHS
    assert checkpoint.widths.constant_width() == 96
    assert checkpoint.dtype == "float16"
    assert checkpoint.hidden_size == 128 and checkpoint.num_layers == 4
    assert checkpoint.base_config["num_key_value_heads"] == 2
    assert checkpoint.slicing_config["head_dimension"] == 128
    described = json.loads(json.dumps(checkpoint.to_dict()))
    assert described["checkpoint_path"] == str(CHECKPOINT)
    assert described["widths"]["mlp_output"] == [96, 96, 96, 128]


def test_reads_bare_pt_with_base_dir(tmp_path):
    pt = _copy(CHECKPOINT, tmp_path / "elsewhere")
    checkpoint = read_checkpoint(pt, base_dir=FIXTURE / "base", round_interval=8)
    assert checkpoint.base_dir == FIXTURE / "base"
    assert checkpoint.slicing_config is None and checkpoint.slicing_config_path is None
    assert checkpoint.widths == FIXTURE_WIDTHS
    assert checkpoint.sparsity == 0.25 and checkpoint.round_interval == 8


def test_infers_widths_without_slicing_json(tmp_path):
    run_dir = tmp_path / "run"
    _copy(CHECKPOINT, run_dir)
    _copy(SLICED / "config.json", run_dir)
    checkpoint = read_checkpoint(run_dir)
    assert checkpoint.slicing_config is None
    assert checkpoint.widths == FIXTURE_WIDTHS
    recorded = json.loads(SLICING_JSON.read_text())
    inferred = checkpoint.widths.as_slicing_config(checkpoint.hidden_size)
    for key in (
        "embedding_dimensions",
        "attention_input_dimensions",
        "attention_output_dimensions",
        "mlp_input_dimensions",
        "mlp_output_dimensions",
        "head_dimension",
        "do_slice_head",
    ):
        assert inferred[key] == recorded[key], key


def test_picks_checkpoint_by_sparsity_and_refuses_to_guess(tmp_path):
    run_dir = tmp_path / "run"
    _copy(CHECKPOINT, run_dir)
    _copy(CHECKPOINT, run_dir, "Meta-Llama-3-tiny_0.2.pt")  # int(0.8 * 128) = 102 -> 96 too
    _copy(SLICED / "config.json", run_dir)
    assert read_checkpoint(run_dir, sparsity=0.25).checkpoint_path.name == "Meta-Llama-3-tiny_0.25.pt"
    assert read_checkpoint(run_dir, sparsity=0.2).sparsity == 0.2
    with pytest.raises(errors.AmbiguousCheckpoint, match="several checkpoints"):
        read_checkpoint(run_dir)
    with pytest.raises(errors.SparsityMismatch, match="no checkpoint for sparsity 0.3"):
        read_checkpoint(run_dir, sparsity=0.3)


def test_builds_the_model_it_describes():
    model = read_checkpoint(SLICED).build_model(dtype=torch.float32)
    assert model.config.embedding_dimension == 96 and model.config.sparsity == 0.25
    assert model.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# SliceGPT's width arithmetic and its explanations
# --------------------------------------------------------------------------------------------


def test_sliced_width_follows_run_slicegpt():
    assert sliced_width(4096, 0.25, 8) == 3072
    assert sliced_width(4096, 0.2, 8) == 3272  # int(3276.8) = 3276 -> 3272
    assert sliced_width(4096, 0.3, 1) == 2867
    assert sliced_width(128, 0.25, 8) == 96


def test_explains_width_in_user_terms():
    message = explain_width(3272, 4096, 8)
    assert message.startswith("that is sparsity 0.2 with round_interval 8 (hidden 4096")
    assert "multiple of round_interval 64" in explain_width(3272, 4096, 64)


def _llama3_8b_shaped_checkpoint(directory: Path, name: str, width: int) -> Path:
    """A one-layer checkpoint with Llama-3-8B's shapes, tiny on disk: every tensor is an expanded
    zero (stride 0), which torch.save stores as a single element."""
    hidden, vocab, heads, kv_heads, intermediate = 4096, 128256, 32, 8, 14336
    shapes = {
        "model.embed_tokens.weight": (vocab, width),
        "model.layers.0.self_attn.q_proj.weight": (hidden, width),
        "model.layers.0.self_attn.k_proj.weight": (kv_heads * 128, width),
        "model.layers.0.self_attn.v_proj.weight": (kv_heads * 128, width),
        "model.layers.0.self_attn.o_proj.weight": (width, hidden),
        "model.layers.0.attn_shortcut_Q": (width, width),
        "model.layers.0.mlp.gate_proj.weight": (intermediate, width),
        "model.layers.0.mlp.up_proj.weight": (intermediate, width),
        "model.layers.0.mlp.down_proj.weight": (hidden, intermediate),
        "model.layers.0.mlp_shortcut_Q": (width, hidden),
        "lm_head.weight": (vocab, hidden),
    }
    directory.mkdir(parents=True, exist_ok=True)
    zero = torch.zeros(1, 1, dtype=torch.float16)
    torch.save({key: zero.expand(*shape) for key, shape in shapes.items()}, directory / name)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "vocab_size": vocab,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "intermediate_size": intermediate,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory / name


def test_llama3_8b_sparsity_mistakes_are_explained(tmp_path, monkeypatch):
    # The stand-in's tensors claim gigabytes of one stored element, which the reader refuses as a
    # crafted file would be (tests/test_hostile_files.py); here only their shapes matter.
    monkeypatch.setattr(checkpoint_module, "tensor_bytes_problem", lambda tensors: None)
    run_dir = tmp_path / "run"
    named = _llama3_8b_shaped_checkpoint(run_dir, "Meta-Llama-3-8B_0.2.pt", width=3272)
    assert read_checkpoint(run_dir).widths.embedding == 3272
    with pytest.raises(errors.SparsityMismatch) as raised:
        read_checkpoint(named, sparsity=0.25)
    assert str(raised.value).startswith(
        "Meta-Llama-3-8B_0.2.pt is named for sparsity 0.2, not the 0.25 you passed; the checkpoint's embedding "
        "is [128256, 3272], which is what sparsity 0.2 gives (round_interval 8, hidden 4096)"
    )
    renamed = named.rename(run_dir / "sliced.pt")
    with pytest.raises(errors.SparsityMismatch) as raised:
        read_checkpoint(renamed, sparsity=0.25, round_interval=8)
    assert str(raised.value).startswith(
        "the checkpoint's embedding is [128256, 3272]: that is sparsity 0.2 with round_interval 8 (hidden 4096"
    )
    assert str(raised.value).endswith("not the 0.25 you passed (which gives 3072)")


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(errors.CheckpointNotFound, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")


def test_directory_without_checkpoint(tmp_path):
    with pytest.raises(errors.CheckpointNotFound, match="holds no .pt file"):
        read_checkpoint(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    pt = _copy(CHECKPOINT, tmp_path)
    real_open = Path.open

    def refusing_open(self, *args, **kwargs):
        if self == pt:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refusing_open)  # chmod 0 does not stop root
    with pytest.raises(errors.CheckpointNotFound, match="cannot be read \\(Permission denied\\)"):
        read_checkpoint(pt, base_dir=FIXTURE / "base")


def test_random_bytes(tmp_path):
    pt = tmp_path / "Meta-Llama-3-tiny_0.25.pt"
    pt.write_bytes(os.urandom(4096))
    with pytest.raises(errors.NotASliceGPTCheckpoint, match="not a file written by torch.save"):
        read_checkpoint(pt, base_dir=FIXTURE / "base")


def test_truncated_copy(tmp_path):
    pt = tmp_path / "Meta-Llama-3-tiny_0.25.pt"
    data = CHECKPOINT.read_bytes()
    pt.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(errors.TruncatedCheckpoint, match="cut short") as raised:
        read_checkpoint(pt, base_dir=FIXTURE / "base")
    assert "interrupted copy or download" in str(raised.value)


def test_empty_file(tmp_path):
    pt = tmp_path / "Meta-Llama-3-tiny_0.25.pt"
    pt.write_bytes(b"")
    with pytest.raises(errors.TruncatedCheckpoint, match="empty"):
        read_checkpoint(pt, base_dir=FIXTURE / "base")


def test_plain_unsliced_state_dict(tmp_path):
    from safetensors.torch import load_file

    pt = tmp_path / "Meta-Llama-3-tiny_0.25.pt"
    torch.save(load_file(str(FIXTURE / "base" / "model.safetensors")), pt)
    with pytest.raises(errors.NotASliceGPTCheckpoint, match="plain, unsliced Llama"):
        read_checkpoint(pt, base_dir=FIXTURE / "base")


def test_non_llama_state_dict(tmp_path):
    pt = tmp_path / "model_0.25.pt"
    torch.save({"transformer.wte.weight": torch.zeros(4, 4)}, pt)
    with pytest.raises(errors.NotASliceGPTCheckpoint, match="not of a sliced Llama"):
        read_checkpoint(pt, base_dir=FIXTURE / "base")


def test_pickled_model_object_is_refused_without_unpickling():
    with pytest.raises(errors.NotASliceGPTCheckpoint, match="pickled Python objects"):
        read_checkpoint(FIXTURE / "seed_pruned_model.bin", base_dir=FIXTURE / "base")


def test_base_dir_without_config(tmp_path):
    pt = _copy(CHECKPOINT, tmp_path / "run")
    with pytest.raises(errors.BaseConfigMissing, match="--model-path"):
        read_checkpoint(pt)
    (tmp_path / "empty_base").mkdir()
    with pytest.raises(errors.BaseConfigMissing, match="no config.json"):
        read_checkpoint(pt, base_dir=tmp_path / "empty_base")


def test_base_config_of_another_model(tmp_path):
    base = _base_dir_with(tmp_path, num_hidden_layers=6, intermediate_size=512)
    with pytest.raises(errors.BaseConfigMismatch) as raised:
        read_checkpoint(CHECKPOINT, base_dir=base)
    message = str(raised.value)
    assert "4 layers, the base config 6" in message and "intermediate_size" in message


def test_wrong_sparsity_passed():
    with pytest.raises(errors.SparsityMismatch, match="named for sparsity 0.25, not the 0.3 you passed; the check"):
        read_checkpoint(CHECKPOINT, sparsity=0.3)


def test_renamed_file_with_wrong_sparsity_is_explained(tmp_path):
    run_dir = tmp_path / "run"
    _copy(CHECKPOINT, run_dir, "Meta-Llama-3-tiny_0.5.pt")
    _copy(SLICED / "config.json", run_dir)
    with pytest.raises(errors.SparsityMismatch) as raised:
        read_checkpoint(run_dir)
    message = str(raised.value)
    assert message.startswith(
        "the checkpoint's embedding is [1000, 96]: that is sparsity 0.2 with round_interval 8 (hidden 128"
    )
    assert "not the 0.5 its file name says (which gives 64" in message


def test_wrong_round_interval():
    with pytest.raises(errors.SparsityMismatch) as raised:
        read_checkpoint(CHECKPOINT, round_interval=64)
    message = str(raised.value)
    assert "sparsity 0.25 gives that with round_interval 8, not the 64 you passed" in message


def test_slicing_json_from_another_run(tmp_path):
    run_dir = tmp_path / "run"
    pt = _copy(CHECKPOINT, run_dir)
    _copy(SLICED / "config.json", run_dir)
    recorded = json.loads(SLICING_JSON.read_text())
    recorded["attention_input_dimensions"]["2"] = 88
    pt.with_suffix(".json").write_text(json.dumps(recorded))
    with pytest.raises(errors.SlicingConfigMismatch, match=r"attention_input_dimensions\[2\] 88 vs 96"):
        read_checkpoint(run_dir)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "MistralForCausalLM"),
        ({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
        ({"architectures": None, "model_type": "gpt2"}, "gpt2"),
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "Qwen2ForCausalLM"),
    ],
)
def test_unsupported_architecture(tmp_path, changes, named):
    base = _base_dir_with(tmp_path, **changes)
    with pytest.raises(errors.UnsupportedArchitecture) as raised:
        read_checkpoint(CHECKPOINT, base_dir=base)
    message = str(raised.value)
    assert named in message
    for family in FAMILIES:  # one sentence naming every family SliceGPT slices
        assert family.releases in message and family.architectures[0] in message


def test_errors_share_a_base_class():
    for name in (
        "CheckpointNotFound",
        "AmbiguousCheckpoint",
        "NotASliceGPTCheckpoint",
        "TruncatedCheckpoint",
        "BaseConfigMissing",
        "BaseConfigMismatch",
        "SlicingConfigMismatch",
        "SparsityMismatch",
        "UnsupportedArchitecture",
    ):
        assert issubclass(getattr(errors, name), errors.CheckpointError)


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.key)
def test_every_family_is_read_with_its_widths_and_counts(family):
    fixture = SHARED_FIXTURES / f"slicegpt-{family.key}-tiny"
    facts = json.loads((fixture / "fixture.json").read_text())
    checkpoint = read_checkpoint(fixture / "sliced")
    assert checkpoint.family is family and checkpoint.sparsity == facts["sparsity"]
    assert checkpoint.widths.constant_width() == facts.get("sliced_dim", 96)
    assert checkpoint.round_interval == 8 and checkpoint.parameter_count == sum(
        tensor.numel() for tensor in checkpoint.load_tensors().values()
    )
    recorded = json.loads(checkpoint.slicing_config_path.read_text())
    assert checkpoint.widths.as_slicing_config(checkpoint.hidden_size) == recorded


def test_tensors_of_another_family_than_the_config_says(tmp_path):
    opt = SHARED_FIXTURES / "slicegpt-opt-tiny" / "sliced" / "opt-tiny_0.2.pt"
    pt = _copy(opt, tmp_path / "run", "model_0.2.pt")
    with pytest.raises(errors.NotASliceGPTCheckpoint, match="laid out as a sliced OPT's"):
        read_checkpoint(pt, base_dir=FIXTURE / "base")


@pytest.mark.parametrize(
    ("key", "changes", "said"),
    [
        ("opt", {"do_layer_norm_before": False}, "OPT-350m-style"),
        ("opt", {"word_embed_proj_dim": 48}, "OPT-350m-style"),
        ("phi2", {"qk_layernorm": True}, "qk_layernorm"),
        ("phi3", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling"),
    ],
)
def test_a_layout_the_official_code_cannot_slice_is_refused_in_a_sentence(tmp_path, key, changes, said):
    sliced = SHARED_FIXTURES / f"slicegpt-{key}-tiny" / "sliced"
    run = tmp_path / "run"
    shutil.copytree(sliced, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, **changes}))
    checkpoint = read_checkpoint(run)  # described as it is (info works) ...
    with pytest.raises(errors.BaseConfigMismatch, match=said) as raised:
        checkpoint.sliced_config()  # ... but not rebuilt
    assert str(run / "config.json") in str(raised.value) and "\n" not in str(raised.value)
