"""Our SliceGPT rotate-and-slice (``slicebridge.model.slicing``) and the dense models it slices
(``slicebridge.model.dense``).

What is held: the dense models load with the Auto classes; slicing writes run_slicegpt's layout
(names, key order, shapes, SlicingConfig JSON identical to the official fixture's); at sparsity 0
the result is the dense model (an orthogonal change of basis); on a model whose residual stream
is genuinely low-rank, slicing down to that rank is lossless (which no mis-wired rotation or
shortcut survives); for random weights the slice is much closer to the dense model than a
deliberately broken one; and the stand-in official loader (transformers 4.41) loads our
checkpoint and computes what our portable model computes.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.paths import FIXTURE, HELPERS, REPO, slicegpt_env_path
from safetensors.torch import load_file, save_file

from slicebridge.model import portable
from slicebridge.model.checkpoint import read_checkpoint
from slicebridge.model.compare import nmse, top1_agreement
from slicebridge.model.dense import PRESETS, embedded_text, make_dense_llama
from slicebridge.model.families import BY_KEY
from slicebridge.model.slicing import slice_llama, sliced_file_stem

FIXTURE_SLICED = FIXTURE / "sliced"
STANDIN_LOGITS = HELPERS / "standin_logits.py"

EXACT_NMSE = 1e-10
LOW_RANK = 64  # the residual-stream rank of the low-rank model (hidden 128, so sparsity 0.5 keeps it)

logger = logging.getLogger(__name__)


def slicegpt_python() -> Path:
    env = slicegpt_env_path()
    return env / "bin" / "python"


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def load_dense(directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory)).to(torch.float32).eval()


def portable_model(save_dir: Path, dtype: torch.dtype = torch.float32, **read_args) -> torch.nn.Module:
    return read_checkpoint(save_dir, **read_args).build_model(dtype=dtype)


def with_identity_shortcuts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A deliberately broken slice: every shortcut Q replaced by a (rectangular) identity."""
    return {
        name: torch.eye(*tensor.shape, dtype=tensor.dtype) if name.endswith("_shortcut_Q") else tensor
        for name, tensor in state.items()
    }


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense_fp16(tmp_path_factory) -> Path:
    """The "tiny" preset in fp16, in a directory named like the fixture's model ("tiny")."""
    return make_dense_llama(tmp_path_factory.mktemp("dense16") / "tiny", **PRESETS["tiny"])


@pytest.fixture(scope="module")
def dense_fp32(tmp_path_factory) -> Path:
    return make_dense_llama(tmp_path_factory.mktemp("dense32") / "tiny32", dtype="float32", **PRESETS["tiny"])


@pytest.fixture(scope="module")
def dense_fp32_model(dense_fp32) -> torch.nn.Module:
    return load_dense(dense_fp32)


@pytest.fixture(scope="module")
def probes(dense_fp32) -> dict[str, torch.Tensor]:
    """Token ids [2, 48]: windows of the embedded text, and uniformly random ids."""
    from transformers import AutoTokenizer

    text_ids = AutoTokenizer.from_pretrained(str(dense_fp32))(embedded_text(), return_tensors="pt").input_ids[0]
    generator = torch.Generator().manual_seed(1234)
    return {
        "text": torch.stack([text_ids[100:148], text_ids[900:948]]),
        "random": torch.randint(0, PRESETS["tiny"]["vocab_size"], (2, 48), generator=generator),
    }


@pytest.fixture(scope="module")
def low_rank_dense(dense_fp32, tmp_path_factory) -> Path:
    """The fp32 tiny model changed so that its residual stream lives in the first LOW_RANK
    coordinates: embedding rows (zero-mean, so centering is a no-op) and every o_proj / down_proj
    output are zero beyond them. Slicing to LOW_RANK must then lose nothing."""
    directory = tmp_path_factory.mktemp("lowrank") / "lowrank"
    shutil.copytree(dense_fp32, directory)
    tensors = load_file(str(directory / "model.safetensors"))
    embeddings = tensors["model.embed_tokens.weight"]
    embeddings[:, LOW_RANK:] = 0
    embeddings[:, :LOW_RANK] -= embeddings[:, :LOW_RANK].mean(dim=-1, keepdim=True)
    for name, tensor in tensors.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            tensor[LOW_RANK:, :] = 0
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


# --------------------------------------------------------------------------------------------
# Dense models
# --------------------------------------------------------------------------------------------


def test_dense_tiny_preset_loads_with_auto_classes(dense_fp16):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(str(dense_fp16), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    config = model.config
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (128, 344, 4)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (4, 2, 1000)
    assert json.loads((dense_fp16 / "config.json").read_text())["rope_theta"] == 500000.0
    assert load_file(str(dense_fp16 / "model.safetensors"))["model.embed_tokens.weight"].dtype == torch.float16
    norm = model.model.layers[0].input_layernorm.weight.float()
    assert (norm - 1).abs().max() > 0.05, "RMSNorm weights must differ from 1 so that fusion is exercised"

    tokenizer = AutoTokenizer.from_pretrained(str(dense_fp16))
    assert len(tokenizer) == 1000
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = embedded_text()
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2  # a trained BPE, not bytes

    logits = logits_of(model, torch.tensor([ids[:32]]))
    assert logits.shape == (1, 32, 1000) and torch.isfinite(logits).all()


def test_dense_model_is_the_same_when_made_under_transformers_441(dense_fp16, tmp_path):
    """make_dense_llama also runs in the slicegpt env (transformers 4.41, tokenizers 0.19) and
    writes the same weights and tokenizer there."""
    python = slicegpt_python()
    if not python.exists():
        pytest.fail(f"the stand-in slicegpt env is missing at {python.parent.parent}: run `make test`")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from slicebridge.model.dense import PRESETS, make_dense_llama;"
        "make_dense_llama(sys.argv[2], **PRESETS['tiny'])"
    )
    made = tmp_path / "tiny441"
    result = subprocess.run(
        [str(python), "-c", code, str(REPO), str(made)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("model.safetensors", "tokenizer.json", "special_tokens_map.json"):
        assert (made / name).read_bytes() == (dense_fp16 / name).read_bytes(), name
    assert json.loads((made / "config.json").read_text())["transformers_version"].startswith("4.41")


def test_dense_weights_depend_only_on_the_seed(tmp_path):
    small = dict(PRESETS["tiny"], num_layers=1)
    first = load_file(str(make_dense_llama(tmp_path / "a", seed=7, **small) / "model.safetensors"))
    again = load_file(str(make_dense_llama(tmp_path / "b", seed=7, **small) / "model.safetensors"))
    other = load_file(str(make_dense_llama(tmp_path / "c", seed=8, **small) / "model.safetensors"))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


@pytest.mark.parametrize(
    ("preset", "low", "high"), [("tiny", 0.9e6, 1.1e6), ("small", 9e6, 11e6), ("1b", 1.0e9, 1.2e9)]
)
def test_presets_have_their_advertised_sizes(preset, low, high):
    shape = PRESETS[preset]
    count = BY_KEY["llama"].dense_parameters(
        {
            "hidden_size": shape["hidden_size"],
            "intermediate_size": shape["intermediate_size"],
            "num_hidden_layers": shape["num_layers"],
            "num_attention_heads": shape["num_heads"],
            "num_key_value_heads": shape["num_kv_heads"],
            "vocab_size": shape["vocab_size"],
        }
    )
    assert low <= count <= high


# --------------------------------------------------------------------------------------------
# Exactness: sparsity 0, and slicing a low-rank stream down to its rank
# --------------------------------------------------------------------------------------------


def test_sparsity_zero_reproduces_the_dense_model(dense_fp32, dense_fp32_model, probes, tmp_path):
    save_dir = slice_llama(dense_fp32, tmp_path, sparsity=0)  # the default keeps the rotation exact
    model = portable_model(save_dir)
    for name, ids in probes.items():
        dense_logits, sliced_logits = logits_of(dense_fp32_model, ids), logits_of(model, ids)
        assert nmse(sliced_logits, dense_logits) <= EXACT_NMSE, name
        assert top1_agreement(sliced_logits, dense_logits) == 1.0, name


def test_sparsity_zero_with_official_centering_is_the_dense_model_with_centered_embeddings(
    dense_fp32, dense_fp32_model, probes, tmp_path
):
    """The official fusion subtracts each embedding row's mean even for Llama (center_embeddings=True):
    the result is exactly the dense model with centered embeddings, not the dense model."""
    model = portable_model(slice_llama(dense_fp32, tmp_path, sparsity=0, center_embeddings=True))
    centered = load_dense(dense_fp32)
    embeddings = centered.model.embed_tokens.weight.data
    embeddings -= embeddings.mean(dim=-1, keepdim=True)
    ids = probes["text"]
    assert nmse(logits_of(model, ids), logits_of(centered, ids)) <= EXACT_NMSE
    assert nmse(logits_of(model, ids), logits_of(dense_fp32_model, ids)) > 1e-6


def test_sparsity_zero_with_fewer_calibration_tokens_than_hidden(dense_fp32, dense_fp32_model, probes, tmp_path):
    """32 calibration tokens for hidden 128: the eigenbasis comes from the Gram matrix and an
    orthonormal completion, and must still be an exact rotation."""
    calibration = probes["random"][:1, :32]
    model = portable_model(
        slice_llama(dense_fp32, tmp_path, sparsity=0, center_embeddings=False, calibration_ids=calibration)
    )
    ids = probes["text"]
    assert nmse(logits_of(model, ids), logits_of(dense_fp32_model, ids)) <= EXACT_NMSE


def test_tied_embeddings_are_untied_and_still_exact(tmp_path, probes):
    """A tied head is copied before the embeddings are centered and both are rotated separately."""
    dense_dir = make_dense_llama(
        tmp_path / "tied", dtype="float32", tie_word_embeddings=True, **dict(PRESETS["tiny"], num_layers=2)
    )
    assert "lm_head.weight" not in load_file(str(dense_dir / "model.safetensors"))
    save_dir = slice_llama(dense_dir, tmp_path / "out", sparsity=0, center_embeddings=False)
    state = read_checkpoint(save_dir).load_tensors()
    assert state["lm_head.weight"].shape == state["model.embed_tokens.weight"].shape == (1000, 128)
    ids = probes["text"]
    assert nmse(logits_of(portable_model(save_dir), ids), logits_of(load_dense(dense_dir), ids)) <= EXACT_NMSE


@pytest.mark.parametrize(
    ("sparsity", "options"),
    [
        (0.5, {}),
        (0.25, {}),
        (0.5, {"do_slice_head": True}),
        (0.5, {"final_orientation": "pca"}),
        (0.5, {"calibration_ids": "few"}),
    ],
    ids=["0.5", "0.25", "0.5-slice-head", "0.5-pca-orientation", "0.5-few-calibration-tokens"],
)
def test_a_low_rank_stream_is_sliced_without_loss(low_rank_dense, probes, tmp_path, sparsity, options):
    if options.get("calibration_ids") == "few":
        generator = torch.Generator().manual_seed(5)
        options = {**options, "calibration_ids": torch.randint(0, 1000, (2, 50), generator=generator)}
    save_dir = slice_llama(low_rank_dense, tmp_path, sparsity=sparsity, **options)
    checkpoint = read_checkpoint(save_dir)
    width = int((1 - sparsity) * 128)
    assert checkpoint.widths.embedding == width
    assert checkpoint.widths.lm_head == (width if options.get("do_slice_head") else 128)

    dense = load_dense(low_rank_dense)
    sliced = checkpoint.build_model(dtype=torch.float32)
    broken = portable.build_model(
        with_identity_shortcuts(checkpoint.load_tensors()), checkpoint.sliced_config(), dtype=torch.float32
    )
    for name, ids in probes.items():
        dense_logits = logits_of(dense, ids)
        assert nmse(logits_of(sliced, ids), dense_logits) <= EXACT_NMSE, name
        assert nmse(logits_of(broken, ids), dense_logits) > 0.1, name


# --------------------------------------------------------------------------------------------
# Layout: exactly what run_slicegpt --save-dir writes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sparsity", "width"), [(0.25, 96), (0.5, 64)])
def test_layout_is_run_slicegpt_s(dense_fp16, tmp_path, sparsity, width):
    save_dir = slice_llama(dense_fp16, tmp_path / "out", sparsity=sparsity, round_interval=8)
    stem = f"Meta-Llama-3-tiny_{sparsity}"
    copied = {
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert {p.name for p in save_dir.iterdir()} == {f"{stem}.pt", f"{stem}.json"} | copied
    for name in copied:
        assert (save_dir / name).read_bytes() == (dense_fp16 / name).read_bytes()

    official_json = (FIXTURE_SLICED / "Meta-Llama-3-tiny_0.25.json").read_text()
    ours_json = (save_dir / f"{stem}.json").read_text()
    assert list(json.loads(ours_json)) == list(json.loads(official_json))
    if sparsity == 0.25:  # same shape, sparsity and interval as the fixture: the very same text
        assert ours_json == official_json
    config = json.loads(ours_json)
    assert config["embedding_dimensions"] == {"0": width}
    assert set(config["attention_input_dimensions"].values()) == {width}
    assert config["mlp_output_dimensions"] == {"0": width, "1": width, "2": width, "3": 128}
    assert config["head_dimension"] == 128 and config["do_slice_head"] is False

    ours = torch.load(save_dir / f"{stem}.pt", weights_only=True)
    official = torch.load(FIXTURE_SLICED / "Meta-Llama-3-tiny_0.25.pt", weights_only=True)
    assert list(ours) == list(official)
    for name, tensor in ours.items():
        expected = tuple(min(size, width) if size == 96 else size for size in official[name].shape)
        assert tuple(tensor.shape) == expected, name
        assert tensor.dtype == torch.float16 and tensor.is_contiguous(), name

    checkpoint = read_checkpoint(save_dir, sparsity=sparsity, round_interval=8)
    assert checkpoint.widths.embedding == width and checkpoint.round_interval == 8
    logits = logits_of(checkpoint.build_model(), torch.arange(3, 40).unsqueeze(0))
    assert logits.shape == (1, 37, 1000) and torch.isfinite(logits).all()


def test_file_names_progress_and_argument_checks(dense_fp16, tmp_path):
    stages: list[tuple[str, int, int]] = []
    save_dir = slice_llama(
        dense_fp16,
        tmp_path,
        sparsity=0,
        model_name="meta-llama/Llama-2-mine",
        progress=lambda stage, done, total: stages.append((stage, done, total)),
    )
    assert (save_dir / "Llama-2-mine_0.0.pt").is_file() and (save_dir / "Llama-2-mine_0.0.json").is_file()
    assert sliced_file_stem("meta-llama/Meta-Llama-3-8B", 0.25) == "Meta-Llama-3-8B_0.25"
    total = 4 + 2
    assert stages[0] == ("embeddings", 1, total) and stages[-1] == ("saved", total, total)
    assert [done for _, done, _ in stages] == list(range(1, total + 1))
    for bad in (
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"sparsity": 0.25, "final_orientation": "sideways"},
        {"sparsity": 0.25, "calibration_ids": torch.tensor([[5, 1000]])},
    ):
        with pytest.raises(ValueError):
            slice_llama(dense_fp16, tmp_path / "bad", **bad)


# --------------------------------------------------------------------------------------------
# Random weights: how close the slice stays to the dense model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_random_weights_slice_stays_close_to_dense(
    dense_fp32, dense_fp32_model, probes, tmp_path, sparsity, record_property
):
    """Random weights leave the stream nearly isotropic, so slicing costs a lot (the official
    slice of the fixture's random model has NMSE 0.2-0.36 vs its dense model at 0.25); still, the
    slice must be far closer to the dense model than one whose shortcut Qs are broken, and on
    text like the calibration's closer than predicting all zeros (NMSE 1)."""
    checkpoint = read_checkpoint(slice_llama(dense_fp32, tmp_path, sparsity=sparsity))
    sliced = checkpoint.build_model(dtype=torch.float32)
    broken = portable.build_model(
        with_identity_shortcuts(checkpoint.load_tensors()), checkpoint.sliced_config(), dtype=torch.float32
    )
    agreeing = []
    for name, ids in probes.items():
        dense_logits = logits_of(dense_fp32_model, ids)
        ours, bad = logits_of(sliced, ids), logits_of(broken, ids)
        figures = {
            "nmse": nmse(ours, dense_logits),
            "top1": top1_agreement(ours, dense_logits),
            "broken_nmse": nmse(bad, dense_logits),
            "broken_top1": top1_agreement(bad, dense_logits),
        }
        record_property(f"sparsity_{sparsity}_{name}", figures)
        logger.info("sparsity %s, %s ids: %s", sparsity, name, figures)
        assert figures["nmse"] < 0.75 * figures["broken_nmse"], figures
        if name == "text":
            assert figures["nmse"] < 1.0, figures
        agreeing.append(figures["top1"])
    assert sum(agreeing) / len(agreeing) > 10 / PRESETS["tiny"]["vocab_size"]  # ten times chance


# --------------------------------------------------------------------------------------------
# The stand-in official loader (transformers 4.41) reads our checkpoint
# --------------------------------------------------------------------------------------------


def test_standin_official_loader_agrees_with_the_portable_model(dense_fp16, probes, tmp_path):
    python = slicegpt_python()
    if not python.exists():
        pytest.fail(f"the stand-in slicegpt env is missing at {python.parent.parent}: run `make test`")
    save_dir = slice_llama(dense_fp16, tmp_path / "save", sparsity=0.25, round_interval=8)
    ids = torch.cat([probes["text"], probes["random"]])
    torch.save(ids, tmp_path / "ids.pt")
    result = subprocess.run(
        [
            str(python),
            str(STANDIN_LOGITS),
            str(save_dir),
            "meta-llama/Meta-Llama-3-tiny",
            "0.25",
            "8",
            str(tmp_path / "ids.pt"),
            str(tmp_path / "logits.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["transformers"].startswith("4.41")
    assert report["rope_theta"] == 500000.0
    assert report["embedding_shape"] == [1000, 96] and report["lm_head_shape"] == [1000, 128]
    assert report["attn_shortcut_shape"] == [96, 96] and report["last_mlp_shortcut_shape"] == [96, 128]

    official = torch.load(tmp_path / "logits.pt", weights_only=True)
    fp32 = nmse(logits_of(portable_model(save_dir, torch.float32), ids), official["logits_fp32"])
    fp16 = nmse(logits_of(portable_model(save_dir, torch.float16), ids), official["logits_fp16"])
    logger.info("stand-in official loader vs portable model: NMSE fp32 %.3g, fp16 %.3g", fp32, fp16)
    assert fp32 <= 1e-8
    assert fp16 <= 1e-5
