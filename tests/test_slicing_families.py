"""Our rotate-and-slice for OPT, Phi-2 and Phi-3 (``slice_model``) and the dense models it slices
(``make_dense_preset(..., family=...)``); Llama's are held in depth by test_slicing.

What is held, per family: the "tiny" preset is the official fixture's base model (the same
config.json but for the version stamp), loads with the Auto classes, and is made byte for byte
the same under transformers 4.41; at sparsity 0 (no centring asked for) the sliced checkpoint,
loaded with our portable model, computes the dense transformers model's logits -- for OPT and
Phi-2 because the official LayerNorm mean handling (centred embeddings, mean baked into the
writers) is exact, which a slice without it is not; the calibration forward pass, whose streams
the PCAs are taken of, is the dense model's layer by layer (Llama's too); at the fixture's
sparsity the save directory is the official one (files, SlicingConfig text, key order, shapes,
dtype) and the stand-in official loader (transformers 4.41) computes what our portable model
computes; at 0.25 the slice has the right widths and stays far closer to the dense model than
one whose shortcuts are broken; fp16 output, do_slice_head and both final orientations behave.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers.paths import REPO, SHARED_FIXTURES, STANDIN, slicegpt_env_path
from safetensors.torch import load_file

from slicebridge.model import portable
from slicebridge.model.checkpoint import SlicedWidths, read_checkpoint, sliced_width
from slicebridge.model.compare import nmse, top1_agreement
from slicebridge.model.dense import embedded_text, make_dense_preset
from slicebridge.model.families import BY_KEY, family_of_config
from slicebridge.model.slicing import (
    DenseCheckpoint,
    DenseLayer,
    Rotator,
    fused_embeddings,
    fused_rms_norm,
    rotate_vocab_matrix,
    slice_layer,
    slice_llama,
    slice_model,
)

FAMILIES = ("opt", "phi2", "phi3")
VOCAB = 900  # every family's tiny preset, as the fixtures
EXACT_NMSE = 1e-10

logger = logging.getLogger(__name__)

# Run by the slicegpt env's interpreter: load each save directory with the stand-in official
# loader (slicegpt.hf_utils.load_sliced_model) and save its logits, as loaded (fp16) and in fp32.
STANDIN_LOGITS = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from slicegpt import hf_utils
jobs = json.loads(sys.argv[2])
ids = torch.load(sys.argv[3], weights_only=True)
logits = {}
with torch.no_grad():
    for family, (save_dir, model_name, sparsity) in jobs.items():
        adapter, _ = hf_utils.load_sliced_model(model_name, save_dir, sparsity=sparsity, round_interval=8)
        fp16 = adapter.model(input_ids=ids).logits.float()
        logits[family] = {"fp16": fp16, "fp32": adapter.model.float()(input_ids=ids).logits}
torch.save(logits, sys.argv[4])
"""


def fixture_facts(family: str) -> dict:
    return json.loads((SHARED_FIXTURES / f"slicegpt-{family}-tiny" / "fixture.json").read_text())


def slicegpt_python() -> Path:
    python = slicegpt_env_path() / "bin" / "python"
    if not python.exists():
        pytest.fail(f"the stand-in slicegpt env is missing at {python.parent.parent}: run `make test`")
    return python


def checkpoint_files(save_dir: Path) -> tuple[Path, Path]:
    (checkpoint,) = save_dir.glob("*.pt")
    return checkpoint, checkpoint.with_suffix(".json")


def sliced_model(
    save_dir: Path, dense_dir: Path, dtype: torch.dtype = torch.float32, broken: bool = False
) -> torch.nn.Module:
    """Our portable model of the checkpoint in ``save_dir``; ``broken``: every shortcut Q replaced
    by a (rectangular) identity, a deliberately mis-wired slice."""
    checkpoint, slicing = checkpoint_files(save_dir)
    base_config = json.loads((dense_dir / "config.json").read_text())
    config = portable.config_class(family_of_config(base_config)).from_base_and_slicing(
        base_config, json.loads(slicing.read_text())
    )
    state = torch.load(checkpoint, weights_only=True)
    if broken:
        state = {
            name: torch.eye(*tensor.shape, dtype=tensor.dtype) if name.endswith("_shortcut_Q") else tensor
            for name, tensor in state.items()
        }
    return portable.build_model(state, config, dtype=dtype)


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def load_dense(directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory)).to(torch.float32).eval()


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Callable[[str, str], Path]:
    """``dense(family, dtype)``: the family's tiny preset, made once per module, in a directory
    named like the fixtures' models ("tiny")."""
    root = tmp_path_factory.mktemp("dense")
    made: dict[tuple[str, str], Path] = {}

    def get(family: str, dtype: str = "float32") -> Path:
        if (family, dtype) not in made:
            made[family, dtype] = make_dense_preset(root / f"{family}-{dtype}" / "tiny", "tiny", family, dtype=dtype)
        return made[family, dtype]

    return get


@pytest.fixture(scope="module")
def probes(dense) -> dict[str, torch.Tensor]:
    """Token ids [2, 48]: windows of the embedded text, and uniformly random ids (every family's
    tiny preset has the same tokenizer)."""
    from transformers import AutoTokenizer

    text_ids = AutoTokenizer.from_pretrained(str(dense("opt")))(embedded_text(), return_tensors="pt").input_ids[0]
    generator = torch.Generator().manual_seed(1234)
    return {
        "text": torch.stack([text_ids[100:148], text_ids[900:948]]),
        "random": torch.randint(0, VOCAB, (2, 48), generator=generator),
    }


@pytest.fixture(scope="module")
def official_like_runs(dense, tmp_path_factory) -> dict[str, Path]:
    """Each family's fp16 tiny model sliced as its fixture was (sparsity, round_interval 8)."""
    root = tmp_path_factory.mktemp("official_like")
    return {
        family: slice_model(dense(family, "float16"), root / family, sparsity=fixture_facts(family)["sparsity"])
        for family in FAMILIES
    }


@pytest.fixture(scope="module")
def quarter_runs(dense, tmp_path_factory) -> dict[str, Path]:
    """Each family's fp32 tiny model sliced at 0.25 (random final orientation, the default)."""
    root = tmp_path_factory.mktemp("quarter")
    return {family: slice_model(dense(family), root / family, sparsity=0.25) for family in FAMILIES}


# --------------------------------------------------------------------------------------------
# Dense models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_preset_is_the_fixture_base_model(dense, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = dense(family, "float16")
    ours = json.loads((directory / "config.json").read_text())
    official = json.loads((SHARED_FIXTURES / f"slicegpt-{family}-tiny" / "base" / "config.json").read_text())
    differing = {key for key in ours.keys() | official.keys() if ours.get(key) != official.get(key)}
    # OPTConfig's tie_word_embeddings defaults to True: the fixture leaves it out, we write it.
    assert differing <= {"transformers_version", "tie_word_embeddings"}, differing
    assert ours["tie_word_embeddings"] is (family == "opt")

    model, info = AutoModelForCausalLM.from_pretrained(str(directory), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    count = sum(p.numel() for p in model.parameters())
    assert count == BY_KEY[family].dense_parameters(ours) == fixture_facts(family)["dense_param_count"]
    tensors = load_file(str(directory / "model.safetensors"))
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float16}
    norms = [t.float() for name, t in tensors.items() if name.endswith("norm.weight")]
    biases = [t.float() for name, t in tensors.items() if name.endswith(".bias")]
    assert norms and all((norm - 1).abs().max() > 0.05 for norm in norms), "norm weights must differ from 1"
    assert bool(biases) is (family != "phi3"), "OPT and Phi-2 have biases, Phi-3 none"
    assert all(bias.std() > 0.05 for bias in biases), "biases must differ from 0 so that their fusion shows"

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    assert len(tokenizer) == VOCAB and tokenizer.decode(tokenizer(embedded_text())["input_ids"]) == embedded_text()


def test_dense_models_are_the_same_when_made_under_transformers_441(dense, tmp_path):
    """make_dense_preset also runs in the slicegpt env (transformers 4.41, tokenizers 0.19) and
    writes the same weights, tokenizer and (but for the version stamp) config there."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from slicebridge.model.dense import make_dense_preset;"
        f"[make_dense_preset(f'{{sys.argv[2]}}/{{f}}/tiny', 'tiny', f, dtype='float16') for f in {FAMILIES!r}]"
    )
    done = subprocess.run(
        [str(slicegpt_python()), "-c", code, str(REPO), str(tmp_path)], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for family in FAMILIES:
        made, ours = tmp_path / family / "tiny", dense(family, "float16")
        for name in ("model.safetensors", "tokenizer.json", "special_tokens_map.json"):
            assert (made / name).read_bytes() == (ours / name).read_bytes(), (family, name)
        for name in ("config.json", "generation_config.json"):
            theirs, mine = (json.loads((directory / name).read_text()) for directory in (made, ours))
            assert theirs.pop("transformers_version").startswith("4.41")
            mine.pop("transformers_version")
            assert theirs == mine, (family, name)


# --------------------------------------------------------------------------------------------
# Exactness at sparsity 0
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsity_zero_reproduces_the_dense_model(dense, probes, tmp_path, family):
    save_dir = slice_model(dense(family), tmp_path, sparsity=0)
    model, reference = sliced_model(save_dir, dense(family)), load_dense(dense(family))
    for name, ids in probes.items():
        ours, wanted = logits_of(model, ids), logits_of(reference, ids)
        logger.info("%s sparsity 0, %s ids: NMSE %.3g", family, name, nmse(ours, wanted))
        assert nmse(ours, wanted) <= EXACT_NMSE, name
        assert top1_agreement(ours, wanted) == 1.0, name


@pytest.mark.parametrize("family", ("llama", *FAMILIES))
@torch.no_grad()
def test_calibration_forward_is_the_dense_model(dense, probes, family):
    """The streams whose PCAs choose the kept directions are the dense model's hidden states
    (centred, in a LayerNorm family): rotating by identities, each family's calibration forward
    (embeddings, attention, MLP, parallel blocks) follows transformers' layer by layer, and the
    fused head on the last stream gives its logits. At sparsity 0 a wrong calibration forward
    would go unnoticed (any orthogonal basis is exact); at 0.25 it would only slice worse."""
    directory = dense(family)
    checkpoint = DenseCheckpoint(directory)
    slicer, hidden, num_layers = checkpoint.slicer, checkpoint.hidden_size, checkpoint.num_layers
    rotator = Rotator(compute_dtype=torch.float64, out_dtype=torch.float32)
    identity = torch.eye(hidden, dtype=torch.float64)
    widths = SlicedWidths.constant(num_layers, hidden, hidden, parallel_blocks=checkpoint.family.parallel_blocks)

    ids = probes["text"]
    expected = load_dense(directory)(input_ids=ids, output_hidden_states=True)
    embeddings = fused_embeddings(checkpoint, slicer.layer_norm, torch.float64)
    stream = slicer.layer_input(embeddings, ids).to(torch.float32)
    for idx in range(num_layers):
        wanted = expected.hidden_states[idx]
        wanted = wanted - wanted.mean(dim=-1, keepdim=True) if slicer.layer_norm else wanted
        assert nmse(stream, wanted) <= EXACT_NMSE, f"stream entering layer {idx}"
        layer = DenseLayer.read(checkpoint, idx, rotator)
        stream = slice_layer(idx, layer, stream, identity, widths, rotator, lambda basis, kept: identity).output
    head = rotate_vocab_matrix(checkpoint.linear("lm_head"), identity, rotator, checkpoint.norm(slicer.final_norm))
    assert nmse(head(fused_rms_norm(stream, hidden)), expected.logits) <= EXACT_NMSE


# --------------------------------------------------------------------------------------------
# Layout: what run_slicegpt --save-dir writes, and what the official loader reads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_settings_give_the_official_save_directory(dense, official_like_runs, family):
    facts = fixture_facts(family)
    official_dir = SHARED_FIXTURES / f"slicegpt-{family}-tiny" / "sliced"
    save_dir = official_like_runs[family]
    assert {p.name for p in save_dir.iterdir()} == {p.name for p in official_dir.iterdir()}
    checkpoint, slicing = checkpoint_files(save_dir)
    assert checkpoint.name == Path(facts["checkpoint"]).name
    assert slicing.read_text() == (official_dir / slicing.name).read_text()
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (save_dir / name).read_bytes() == (dense(family, "float16") / name).read_bytes(), name

    ours = torch.load(checkpoint, weights_only=True)
    official = torch.load(official_dir / checkpoint.name, weights_only=True)
    assert list(ours) == list(official)
    for name, tensor in ours.items():
        assert tensor.shape == official[name].shape, name
        assert tensor.dtype == torch.float16 and tensor.is_contiguous(), name

    read = read_checkpoint(save_dir)
    assert read.family.key == family and read.sparsity == facts["sparsity"]
    assert read.widths.embedding == facts["sliced_dim"] and read.round_interval == 8


def test_standin_official_loader_agrees_with_the_portable_model(dense, official_like_runs, probes, tmp_path):
    ids = torch.cat([probes["text"], probes["random"]])
    torch.save(ids, tmp_path / "ids.pt")
    jobs = {
        family: [str(save_dir), fixture_facts(family)["model_name"], fixture_facts(family)["sparsity"]]
        for family, save_dir in official_like_runs.items()
    }
    done = subprocess.run(
        [str(slicegpt_python()), "-c", STANDIN_LOGITS, str(STANDIN), json.dumps(jobs), str(tmp_path / "ids.pt")]
        + [str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    official = torch.load(tmp_path / "logits.pt", weights_only=True)
    for family, save_dir in official_like_runs.items():
        fp32 = nmse(logits_of(sliced_model(save_dir, dense(family, "float16")), ids), official[family]["fp32"])
        fp16_model = sliced_model(save_dir, dense(family, "float16"), dtype=torch.float16)
        fp16 = nmse(logits_of(fp16_model, ids), official[family]["fp16"])
        logger.info("%s: stand-in official loader vs portable model: NMSE fp32 %.3g, fp16 %.3g", family, fp32, fp16)
        assert fp32 <= 1e-8, family
        assert fp16 <= 1e-4, family


# --------------------------------------------------------------------------------------------
# Sparsity 0.25 and the options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_quarter_sparsity_has_the_right_widths_and_stays_close(dense, quarter_runs, probes, family, record_property):
    """Random weights lose a lot (Phi-3 like Llama; OPT and Phi-2 keep more, their logits being
    largely the head's fused bias); the slice must still be far closer to the dense model than
    one whose shortcut Qs are broken, and agree on top-1 far more often than chance."""
    config = json.loads((dense(family) / "config.json").read_text())
    hidden, width = config["hidden_size"], sliced_width(config["hidden_size"], 0.25, 8)
    state = torch.load(checkpoint_files(quarter_runs[family])[0], weights_only=True)
    row = BY_KEY[family]
    last = row.layer(config["num_hidden_layers"] - 1)
    for name in row.embeddings:
        assert state[name].shape[1] == width, name
    assert state[row.layer(0) + "attn_shortcut_Q"].shape == (width, width)
    assert state[f"{last}{row.mlp_output}.weight"].shape[0] == hidden  # the head is not sliced
    assert state[f"{last}{row.attention_inputs[0]}.weight"].shape[1] == width
    assert state["lm_head.weight"].shape == (VOCAB, hidden)

    sliced = sliced_model(quarter_runs[family], dense(family))
    broken = sliced_model(quarter_runs[family], dense(family), broken=True)
    reference = load_dense(dense(family))
    agreeing = []
    for name, ids in probes.items():
        wanted, ours, bad = logits_of(reference, ids), logits_of(sliced, ids), logits_of(broken, ids)
        figures = {
            "nmse": nmse(ours, wanted),
            "top1": top1_agreement(ours, wanted),
            "broken_nmse": nmse(bad, wanted),
            "broken_top1": top1_agreement(bad, wanted),
        }
        record_property(f"{family}_{name}", figures)
        logger.info("%s sparsity 0.25, %s ids: %s", family, name, figures)
        assert figures["nmse"] < 0.5 * figures["broken_nmse"] and figures["nmse"] < 1.0, figures
        agreeing.append(figures["top1"])
    assert sum(agreeing) / len(agreeing) > 10 / VOCAB  # ten times chance


@pytest.mark.parametrize("family", FAMILIES)
def test_pca_and_random_orientations_compute_the_same_function(dense, quarter_runs, probes, tmp_path, family):
    pca = slice_model(dense(family), tmp_path, sparsity=0.25, final_orientation="pca")
    pca_state = torch.load(checkpoint_files(pca)[0], weights_only=True)
    random_state = torch.load(checkpoint_files(quarter_runs[family])[0], weights_only=True)
    token_embedding = BY_KEY[family].token_embedding
    assert not torch.allclose(pca_state[token_embedding], random_state[token_embedding], atol=1e-3)
    ids = probes["text"]
    same = nmse(
        logits_of(sliced_model(pca, dense(family)), ids),
        logits_of(sliced_model(quarter_runs[family], dense(family)), ids),
    )
    assert same <= EXACT_NMSE


@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_output_and_head_slicing(dense, quarter_runs, probes, tmp_path, family):
    halves = slice_model(dense(family), tmp_path / "fp16", sparsity=0.25, dtype="float16")
    assert {t.dtype for t in torch.load(checkpoint_files(halves)[0], weights_only=True).values()} == {torch.float16}
    ids = probes["text"]
    full = logits_of(sliced_model(quarter_runs[family], dense(family)), ids)
    assert nmse(logits_of(sliced_model(halves, dense(family)), ids), full) <= 1e-5  # fp16 rounding only

    config = json.loads((dense(family) / "config.json").read_text())
    width = sliced_width(config["hidden_size"], 0.25, 8)
    headless = slice_model(dense(family), tmp_path / "head", sparsity=0.25, do_slice_head=True)
    checkpoint, slicing = checkpoint_files(headless)
    slicing_config = json.loads(slicing.read_text())
    assert slicing_config["do_slice_head"] is True and slicing_config["head_dimension"] == width
    assert set(slicing_config["mlp_output_dimensions"].values()) == {width}
    state = torch.load(checkpoint, weights_only=True)
    assert state["lm_head.weight"].shape == (VOCAB, width)
    logits = logits_of(sliced_model(headless, dense(family)), ids)
    assert torch.isfinite(logits).all() and 0 < nmse(logits, full) < 1.0


# --------------------------------------------------------------------------------------------
# Names and refusals
# --------------------------------------------------------------------------------------------


def test_model_names_and_what_is_refused(dense, tmp_path):
    run = slice_model(dense("opt"), tmp_path / "named", sparsity=0.2, model_name="facebook/opt-mine")
    assert checkpoint_files(run)[0].name == "opt-mine_0.2.pt"
    with pytest.raises(ValueError, match="not a llama one"):
        slice_llama(dense("phi3"), tmp_path / "llama", sparsity=0.25)
    with pytest.raises(ValueError, match="unknown model family"):
        make_dense_preset(tmp_path / "gpt", "tiny", "gpt2")
    with pytest.raises(ValueError, match="unknown opt preset"):
        make_dense_preset(tmp_path / "huge", "1b", "opt")

    for family, change, message in (
        ("opt", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "SliceGPT slices"),
        ("opt", {"do_layer_norm_before": False}, "OPT-350m"),
        ("phi2", {"qk_layernorm": True}, "qk_layernorm"),
    ):
        changed = tmp_path / f"{family}-{next(iter(change))}"
        changed.mkdir()
        (changed / "model.safetensors").symlink_to(dense(family) / "model.safetensors")
        config = json.loads((dense(family) / "config.json").read_text())
        (changed / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            slice_model(changed, tmp_path / "refused", sparsity=0.25)
