"""Check the portable sliced model of a fixture's family against the official SliceGPT logits, under any interpreter.

Run in process by the tests (transformers 5.x) and as a script by the stand-in slicegpt env (transformers 4.41):

    python tests/helpers/family_check.py <fixture_dir> [--write-export DIR] [--load-export DIR ...]

It puts the repository root on sys.path itself (slicebridge need not be installed), finds the family from the
fixture's dense config.json, builds the model from that config, the official SlicingConfig .json and .pt with
``portable.build_model`` in fp32 and fp16, and prints one JSON object: per precision and input, the NMSE /
max |diff| / top-1 agreement against the official model's logits; generation checks (greedy with cache vs an
argmax loop without, left padding, beam search with and without cache, a prompt given as embeddings,
sampling); the same on a random variant of the family (per-layer widths, a sliced head and what the family
varies: GQA, RoPE scalings, tied embeddings, biases, a sliding window); for the RoPE families, rotated dense
models of this transformers version against their sliced rebuild; for Phi-3 under 4.41, our RoPE against
4.41's own classes; for each export directory (remote code + safetensors, see ``write_export``), what
``AutoModelForCausalLM`` loads from it with ``trust_remote_code``; and the library versions.
``--write-export`` first writes such a directory with this interpreter's transformers.

``reports_under_both_versions`` runs it in process and in the slicegpt env, each loading both exports, and
``assert_reports`` / ``assert_dense_equivalence`` are what every family's test asserts on them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers.models.phi3 import modeling_phi3  # noqa: E402

from slicebridge.model import families, portable  # noqa: E402
from slicebridge.model.compare import logit_metrics  # noqa: E402
from slicebridge.model.configuration_sliced import SlicedConfig  # noqa: E402
from slicebridge.model.export import SAFETENSORS_METADATA, auto_map, write_remote_code  # noqa: E402
from slicebridge.model.modeling_sliced_phi3 import SlicedPhi3RotaryEmbedding  # noqa: E402
from slicebridge.model.sliced_decoder import SlicedForCausalLM  # noqa: E402

INPUTS = {"probe": ("probe_ids", "logits"), "text": ("text_ids", "text_logits")}
NEW_TOKENS = 8
NMSE_LIMIT = 1e-8  # fp32 against the official fp32 logits
VERSIONS = ("5.x", "4.41")
IS_441 = hasattr(modeling_phi3, "Phi3SuScaledRotaryEmbedding")  # 4.41's own su / yarn classes

# Llama 3.1's RoPE scaling, with an original context of 8.
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
# Phi-3 RoPE scalings for head_dim 16 (8 channels): distinct short and long per-channel factors.
SHORT_FACTORS = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8]
LONG_FACTORS = [1.0, 1.5, 2.4, 3.9, 6.2, 9.9, 15.8, 25.0]


def phi3_scaling(rope_type: str) -> dict[str, Any]:
    """A 4.41-style ``rope_scaling`` dict (exactly the three keys 4.41's Phi3Config accepts)."""
    return {"type": rope_type, "short_factor": SHORT_FACTORS, "long_factor": LONG_FACTORS}


# --------------------------------------------------------------------------------------------
# The fixture
# --------------------------------------------------------------------------------------------


def checkpoint_path(fixture_dir: Path) -> Path:
    """The official run's ``.pt`` (its SlicingConfig is the ``.json`` of the same name)."""
    (path,) = (fixture_dir / "sliced").glob("*.pt")
    return path


def fixture_config(fixture_dir: Path) -> SlicedConfig:
    """The sliced config from the fixture's dense config.json, the official SlicingConfig and the run's
    sparsity and round interval (fixture.json)."""
    facts = json.loads((fixture_dir / "fixture.json").read_text())
    base = json.loads((fixture_dir / "base" / "config.json").read_text())
    slicing = json.loads(checkpoint_path(fixture_dir).with_suffix(".json").read_text())
    family = families.family_of_config(base)
    return portable.sliced_config(
        family, base, slicing, sparsity=facts["sparsity"], round_interval=facts["round_interval"]
    )


def fixture_model(fixture_dir: Path, dtype: torch.dtype) -> SlicedForCausalLM:
    """The portable model around the official checkpoint's tensors."""
    state_dict = torch.load(checkpoint_path(fixture_dir), weights_only=True)
    return portable.build_model(state_dict, fixture_config(fixture_dir), dtype=dtype)


def fidelity(model: torch.nn.Module, reference: dict[str, torch.Tensor], precision: str) -> dict[str, Any]:
    """Logit metrics against the official model, per input."""
    return {
        name: logit_metrics(model(reference[ids]).logits, reference[f"{logits}_{precision}"])
        for name, (ids, logits) in INPUTS.items()
    }


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def greedy_without_cache(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy tokens, each from a full forward pass of the sequence so far (no cache, no generate)."""
    sequence = prompt
    for _ in range(steps):
        next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    return sequence


def left_padded(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 1D token rows, left-padded with ``pad``, and its attention mask."""
    width = max(row.shape[0] for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for idx, row in enumerate(rows):
        ids[idx, width - row.shape[0] :] = row
        mask[idx, width - row.shape[0] :] = 1
    return ids, mask


def generation_checks(model: SlicedForCausalLM, prompt: torch.Tensor, new_tokens: int = NEW_TOKENS) -> dict[str, bool]:
    """On a [2, n] prompt: cached greedy == the argmax loop without cache; a left-padded row == its prompt
    alone; beams with == without cache; the prompt as embeddings == as ids; sampling runs.

    EOS is switched off so that every call runs its full length (position by position comparable).
    """
    model.generation_config.eos_token_id = None
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    settings = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": pad}
    reference = greedy_without_cache(model, prompt, new_tokens)
    with_cache = model.generate(prompt, **settings)

    short = prompt[1, : prompt.shape[1] // 2]
    padded, mask = left_padded([prompt[0], short], pad)
    batched = model.generate(padded, attention_mask=mask, **settings)
    alone = model.generate(short[None], **settings)

    beams = model.generate(prompt, num_beams=3, **settings)
    beams_no_cache = model.generate(prompt, num_beams=3, use_cache=False, **settings)
    embeds = model.get_input_embeddings()(prompt)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(prompt), **settings)
    torch.manual_seed(0)
    sampled = model.generate(prompt, **{**settings, "do_sample": True}, top_k=20, temperature=0.9)
    return {
        "greedy_cache_equals_no_cache": bool(torch.equal(with_cache, reference)),
        "left_padding_matches_unpadded": bool(torch.equal(batched[1, -new_tokens:], alone[0, -new_tokens:])),
        "beam_search_cache_equals_no_cache": bool(torch.equal(beams, beams_no_cache)),
        "inputs_embeds_prompt_matches": bool(torch.equal(from_embeds[:, -new_tokens:], reference[:, -new_tokens:])),
        "sampling_ran": tuple(sampled.shape) == (prompt.shape[0], prompt.shape[1] + new_tokens),
    }


# --------------------------------------------------------------------------------------------
# A random variant per family: per-layer widths, a sliced head, and what the family varies
# --------------------------------------------------------------------------------------------

# Llama's and Phi-3's variants: 64 wide, 2 KV heads, three layers of different widths and a sliced head.
SEQUENTIAL_VARIANT = dict(
    vocab_size=53,
    hidden_size=64,
    intermediate_size=72,
    num_key_value_heads=2,
    embedding_dimension=40,
    attention_input_dimensions=[40, 48, 32],
    attention_output_dimensions=[56, 40, 48],
    mlp_input_dimensions=[56, 40, 48],
    mlp_output_dimensions=[48, 32, 40],
    lm_head_dimension=40,
)
VARIANTS: dict[str, dict[str, Any]] = {
    # GQA (8 heads, 2 KV heads), Llama 3.1 RoPE scaling, tied embeddings
    "llama": dict(
        SEQUENTIAL_VARIANT,
        num_attention_heads=8,
        max_position_embeddings=32,
        rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING,
        tie_word_embeddings=True,
    ),
    # no biases in out_proj / fc2 (``enable_bias`` False), OPT's own special tokens
    "opt": dict(
        vocab_size=61,
        hidden_size=64,
        ffn_dim=96,
        num_attention_heads=4,
        max_position_embeddings=40,
        enable_bias=False,
        embedding_dimension=48,
        attention_input_dimensions=[48, 40, 56],
        attention_output_dimensions=[56, 48, 40],
        mlp_input_dimensions=[56, 48, 40],
        mlp_output_dimensions=[40, 56, 32],
        lm_head_dimension=32,
        bos_token_id=2,
        pad_token_id=1,
    ),
    # 6 heads of 16 (6 rotary channels each: partial_rotary_factor 0.4) over 2 KV heads; parallel blocks, so
    # each layer reads one width (attention and MLP inputs) and writes one (their outputs)
    "phi2": dict(
        vocab_size=53,
        hidden_size=96,
        intermediate_size=72,
        num_attention_heads=6,
        num_key_value_heads=2,
        partial_rotary_factor=0.4,
        max_position_embeddings=32,
        embedding_dimension=40,
        attention_input_dimensions=[40, 56, 32],
        attention_output_dimensions=[56, 32, 40],
        mlp_input_dimensions=[40, 56, 32],
        mlp_output_dimensions=[56, 32, 40],
        lm_head_dimension=40,
    ),
    # 4 heads of 16 over 2 KV heads, su scaling (original context 8, extended to 64), a 5-position window
    "phi3": dict(
        SEQUENTIAL_VARIANT,
        num_attention_heads=4,
        max_position_embeddings=64,
        original_max_position_embeddings=8,
        rope_scaling=phi3_scaling("su"),
        sliding_window=5,
    ),
}
# Prompt tokens, then new ones: past Phi-3's original context of 8 throughout, even in the half-length prompt of
# the left-padding check (su scaling picks its factors by length), and 6 windows long.
VARIANT_PROMPT = 18
VARIANT_NEW_TOKENS = 12


def variant_config(key: str, **changes: Any) -> SlicedConfig:
    """The family's random variant config (``VARIANTS``: three layers, a sliced head, BOS 1, no EOS, pad 0 unless
    the family says otherwise), with ``changes``."""
    common = {"num_hidden_layers": 3, "do_slice_head": True, "bos_token_id": 1, "eos_token_id": None, "pad_token_id": 0}
    fields = {**common, **VARIANTS[key], **changes}
    return portable.config_class(families.family_named(key))(**fields)


def sharpen_attention(tensors: dict[str, torch.Tensor], config: Any, factor: float) -> None:
    """Scale the query and key rows (q_proj and k_proj, or the first rows of a fused qkv_proj) in place: sharp
    attention, so that positions (RoPE, a window) visibly matter."""
    heads = config.num_attention_heads
    query_key_rows = (heads + (getattr(config, "num_key_value_heads", None) or heads)) * (config.hidden_size // heads)
    for name, tensor in tensors.items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            tensor.mul_(factor)
        elif name.endswith("qkv_proj.weight"):
            tensor[:query_key_rows].mul_(factor)


def random_sliced_tensors(config: SlicedConfig, seed: int = 4) -> dict[str, torch.Tensor]:
    """Random tensors of the shapes the config asks for (lm_head left out when tied), with sharp attention and
    OPT's learned position table large, so that positions matter."""
    with torch.device("meta"):
        model = portable.model_class(portable.family_of(config))(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: 0.1 * torch.randn(p.shape, generator=generator) for name, p in model.state_dict().items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    sharpen_attention(tensors, config, 10.0)
    for name, tensor in tensors.items():
        if name.endswith("embed_positions.weight"):
            tensor.mul_(20)
    return tensors


def variant_checks(key: str) -> tuple[dict[str, bool], list[str]]:
    """The generation checks on the family's random variant over ``VARIANT_PROMPT`` + ``VARIANT_NEW_TOKENS``
    tokens, finite logits, tying as configured and the family's own checks; and the class names of the layers
    of ``generate``'s cache (transformers 5.x: one per attention kind; 4.41: none)."""
    config = variant_config(key)
    tensors = random_sliced_tensors(config)
    model = portable.build_model(tensors, config)
    prompt = torch.randint(3, config.vocab_size, (2, VARIANT_PROMPT), generator=torch.Generator().manual_seed(5))
    checks = generation_checks(model, prompt, VARIANT_NEW_TOKENS)
    generated = model.generate(prompt, max_new_tokens=VARIANT_NEW_TOKENS, do_sample=False, return_dict_in_generate=True)
    logits = model(generated.sequences).logits
    checks["finite_logits"] = bool(torch.isfinite(logits).all())
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    checks["tied_as_configured"] = tied == config.tie_word_embeddings
    checks.update(family_variant_checks(key, tensors, generated.sequences, logits))
    cache = getattr(generated, "cache", None) or generated.past_key_values
    return checks, sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])})


def family_variant_checks(
    key: str, tensors: dict[str, torch.Tensor], sequence: torch.Tensor, logits: torch.Tensor
) -> dict[str, bool]:
    """What only one family's variant has: Phi-2's partial rotary width, Phi-3's sliding window (the same
    tensors without it give other logits over the generated sequence)."""
    if key == "phi2":
        return {"rotary_dim_is_6": variant_config(key).rotary_dim == 6}
    if key == "phi3":
        windowless = portable.build_model(tensors, variant_config(key, sliding_window=None))
        return {"window_changes_logits": not torch.allclose(logits, windowless(sequence).logits)}
    return {}


# --------------------------------------------------------------------------------------------
# Rotated dense models of this transformers version == their sliced rebuild
# --------------------------------------------------------------------------------------------

# Per RoPE family: transformers' class prefix, the dense config (two layers, 2 KV heads, ``DENSE_COMMON``), and
# how much the query/key rows are scaled.
DENSE_COMMON = dict(vocab_size=61, num_hidden_layers=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
DENSE_MODELS: dict[str, tuple[str, dict[str, Any], float]] = {
    "llama": (
        "Llama",
        dict(
            hidden_size=64, intermediate_size=80, num_attention_heads=4, max_position_embeddings=16, rms_norm_eps=1e-5
        ),
        25.0,
    ),
    "phi2": (
        "Phi",
        dict(
            hidden_size=96,
            intermediate_size=128,
            num_attention_heads=6,
            partial_rotary_factor=0.4,
            max_position_embeddings=16,
        ),
        25.0,
    ),
    # original context 16 extended to 64
    "phi3": (
        "Phi3",
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            max_position_embeddings=64,
            original_max_position_embeddings=16,
            rms_norm_eps=1e-5,
            pad_token_id=0,
        ),
        5.0,
    ),
}


def dense_cases(key: str) -> dict[str, dict[str, Any]]:
    """The dense config changes to check, per case, as far as this transformers version has them.

    Llama and Phi-2: default, linear and dynamic RoPE; Llama also tied embeddings, and llama3 RoPE under 5.x.
    Phi-3 under 4.41: a 5-position window with every RoPE it implements. 5.x renamed su to longrope and
    computes yarn as longrope too, and its window is one position shorter than 4.41's (what SliceGPT ran):
    there, default and longrope RoPE, no window.
    """
    if key == "phi3" and IS_441:
        return {
            name: {"rope_scaling": None if name == "default" else phi3_scaling(name), "sliding_window": 5}
            for name in ("default", "su", "yarn")
        }
    if key == "phi3":
        longrope = {**phi3_scaling("su"), "type": "longrope"}
        return {"default": {"sliding_window": None}, "longrope": {"rope_scaling": longrope, "sliding_window": None}}
    cases: dict[str, dict[str, Any]] = {"default": {}}
    cases.update({name: {"rope_scaling": {"type": name, "factor": 2.0}} for name in ("linear", "dynamic")})
    if key == "llama":
        cases["tied"] = {"tie_word_embeddings": True}
    if key == "llama" and not IS_441:
        cases["llama3"] = {"rope_scaling": LLAMA3_SCALING}
        cases["llama3_tied"] = {"rope_scaling": LLAMA3_SCALING, "tie_word_embeddings": True}
    return cases


def dense_model(key: str, **changes: Any) -> torch.nn.Module:
    """A random dense model of the family (``DENSE_MODELS``, with ``changes``) with non-trivial norms and
    biases and sharp attention. A tied model keeps its final norm at 1, so that its fused head stays the
    rotated embedding matrix."""
    prefix, fields, sharpness = DENSE_MODELS[key]
    torch.manual_seed(0)
    config = getattr(transformers, f"{prefix}Config")(**{**DENSE_COMMON, **fields, **changes})
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).float().eval()
    parameters = dict(model.named_parameters())
    kept = final_norm(parameters) if config.tie_word_embeddings else None
    with torch.no_grad():
        for name, param in parameters.items():
            if "norm" in name and not name.startswith(f"{kept}."):
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
        sharpen_attention(parameters, config, sharpness)
    return model


def final_norm(weights: dict[str, torch.Tensor]) -> str:
    """The name of the dense model's final norm (Llama and Phi-3: ``model.norm``; Phi-2: a LayerNorm)."""
    return "model.norm" if "model.norm.weight" in weights else "model.final_layernorm"


def fuse_and_rotate(dense: torch.nn.Module, shared_rotation: bool = False) -> dict[str, torch.Tensor]:
    """SliceGPT's transformation without slicing: centre the stream (LayerNorm families), fuse the norms into
    the linears that read them and rotate each stretch of the stream (one per layer with parallel blocks, two
    otherwise); with ``shared_rotation`` the same rotation everywhere, as tied embeddings need."""
    family = families.family_of_config(dense.config.to_dict())
    weights = {name: tensor.detach().double() for name, tensor in dense.state_dict().items()}
    hidden, layers = dense.config.hidden_size, dense.config.num_hidden_layers
    stride = 1 if family.parallel_blocks else 2
    generator = torch.Generator().manual_seed(1)
    drawn = [
        torch.linalg.qr(torch.randn(hidden, hidden, generator=generator, dtype=torch.float64))[0]
        for _ in range(1 if shared_rotation else stride * layers + 1)
    ]
    rotations = drawn * (stride * layers + 1) if shared_rotation else drawn
    last_norm = final_norm(weights)
    mean = 1.0 / hidden if f"{last_norm}.bias" in weights else 0.0  # LayerNorm subtracts the mean, RMSNorm does not
    centre = torch.eye(hidden, dtype=torch.float64) - mean
    sliced = {family.token_embedding: weights[family.token_embedding] @ centre @ rotations[0]}

    def read(linear: str, norm: str, rotation: torch.Tensor) -> None:  # a linear reading norm(stream)
        weight = weights[f"{linear}.weight"]
        sliced[f"{linear}.weight"] = weight * weights[f"{norm}.weight"] @ rotation
        if f"{norm}.bias" in weights:
            sliced[f"{linear}.bias"] = weights[f"{linear}.bias"] + weight @ weights[f"{norm}.bias"]

    def write(linear: str, rotation: torch.Tensor) -> None:  # a linear adding to the stream
        for kind in ("weight", "bias"):
            if f"{linear}.{kind}" in weights:
                sliced[f"{linear}.{kind}"] = rotation.T @ centre @ weights[f"{linear}.{kind}"]

    for idx in range(layers):
        layer = family.layer(idx)
        before, middle, after = (rotations[stride * idx + step] for step in (0, 1, stride))
        inputs = (*family.attention_inputs, *family.mlp_inputs) if family.parallel_blocks else family.attention_inputs
        for linear in inputs:
            read(layer + linear, layer + "input_layernorm", before)
        write(layer + family.attention_output, middle)
        sliced[layer + "attn_shortcut_Q"] = before.T @ middle
        if not family.parallel_blocks:
            for linear in family.mlp_inputs:
                read(layer + linear, layer + "post_attention_layernorm", middle)
            sliced[layer + "mlp_shortcut_Q"] = middle.T @ after
        write(layer + family.mlp_output, after)
    read("lm_head", last_norm, rotations[-1])
    return {name: tensor.float() for name, tensor in sliced.items()}


def dense_equivalence(key: str) -> dict[str, dict[str, Any]]:
    """Per case of ``dense_cases``: max |logit difference| between the rotated dense model and its sliced
    rebuild on 12 and on 24 tokens (past the dense context of 16: dynamic RoPE, Phi-3's long factors), and
    whether greedy generation with the cache gives the same tokens; for a tied model, whether the rebuild ties
    its head to the rotated embeddings; with a window, the difference a window one position shorter makes."""
    report: dict[str, dict[str, Any]] = {}
    short_ids, long_ids = (torch.randint(3, 61, (2, n), generator=torch.Generator().manual_seed(2)) for n in (12, 24))
    for name, changes in dense_cases(key).items():
        dense = dense_model(key, **changes)
        tied = dense.config.tie_word_embeddings
        tensors = fuse_and_rotate(dense, shared_rotation=tied)
        head = tensors.pop("lm_head.weight") if tied else None
        config = portable.sliced_config(
            families.family_named(key), dense.config.to_dict(), {}, tie_word_embeddings=tied
        )
        sliced = portable.build_model(tensors, config)
        report[name] = {
            "short": float((sliced(short_ids).logits - dense(short_ids).logits).abs().max()),
            "long": float((sliced(long_ids).logits - dense(long_ids).logits).abs().max()),
            "generate_equal": bool(
                torch.equal(
                    sliced.generate(long_ids, max_new_tokens=6, do_sample=False, pad_token_id=0),
                    dense.generate(long_ids, max_new_tokens=6, do_sample=False, pad_token_id=0),
                )
            ),
        }
        if tied:
            embedding = sliced.get_input_embeddings().weight
            report[name]["tied"] = sliced.lm_head.weight is embedding and torch.allclose(head, embedding)
        if changes.get("sliding_window") is not None:
            narrower = portable.build_model(
                tensors, portable.config_from_dict({**config.to_dict(), "sliding_window": changes["sliding_window"]})
            )
            report[name]["window_one_shorter"] = float((narrower(long_ids).logits - dense(long_ids).logits).abs().max())
    return report


def rope_against_441() -> dict[str, dict[str, float]]:
    """max |cos/sin difference| between our Phi-3 rotary embedding and 4.41's Phi-3 classes, for positions
    0..15 (short factors, up to the original context of 16) and 0..16 (one past it: long), on a config
    extending that context to 64."""
    classes = {
        "default": modeling_phi3.Phi3RotaryEmbedding,
        "su": modeling_phi3.Phi3SuScaledRotaryEmbedding,
        "yarn": modeling_phi3.Phi3YarnScaledRotaryEmbedding,
    }
    report = {}
    for name, rope_class in classes.items():
        dense_config = dense_model("phi3", rope_scaling=None if name == "default" else phi3_scaling(name)).config
        theirs = (
            rope_class(16, max_position_embeddings=64, base=dense_config.rope_theta)
            if name == "default"
            else rope_class(16, dense_config)
        )
        sliced_config = portable.sliced_config(families.family_named("phi3"), dense_config.to_dict(), {})
        ours = SlicedPhi3RotaryEmbedding(sliced_config)
        like = torch.zeros(1, dtype=torch.float32)
        report[name] = {}
        for regime, length in (("short", 16), ("long", 17)):
            positions = torch.arange(length)[None]
            differences = [
                (a - b).abs().max() for a, b in zip(ours(like, positions), theirs(like, positions), strict=True)
            ]
            report[name][regime] = float(max(differences))
        report[name]["attention_factor"] = ours.attention_factor
    return report


# --------------------------------------------------------------------------------------------
# Exports with remote code
# --------------------------------------------------------------------------------------------


def write_export(model: SlicedForCausalLM, directory: Path) -> None:
    """An export-style directory: the family's remote-code files, config.json with auto_map, safetensors
    weights (with the ``{"format": "pt"}`` metadata that transformers 4.41 insists on)."""
    family = portable.family_of(model.config)
    directory.mkdir(parents=True, exist_ok=True)
    write_remote_code(directory, family)
    config = {**model.config.to_dict(), "architectures": [family.model_class], "auto_map": auto_map(family)}
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata=SAFETENSORS_METADATA)


def export_check(export_dir: Path, in_process: SlicedForCausalLM, reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Load ``export_dir`` with ``AutoModelForCausalLM`` (remote code): what it loaded, which transformers wrote
    it, its fp32 logits against the official ones and whether they equal ``in_process``'s."""
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(export_dir), trust_remote_code=True)
    probe = reference["probe_ids"]
    return {
        "module": type(loaded).__module__,
        "class": type(loaded).__name__,
        "dtype": str(loaded.dtype),
        "written_by": json.loads((export_dir / "config.json").read_text()).get("transformers_version"),
        "fp32": fidelity(loaded, reference, "fp32"),
        "equals_in_process": bool(torch.equal(loaded(probe).logits, in_process(probe).logits)),
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def run(fixture_dir: Path, write_dir: Path | None = None, load_dirs: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The report the module docstring describes; ``write_dir`` gets this interpreter's export of the fixture's
    model before the exports in ``load_dirs`` are checked."""
    reference = torch.load(fixture_dir / "reference.pt", weights_only=True)
    key = portable.family_of(fixture_config(fixture_dir)).key
    report: dict[str, Any] = {"transformers": transformers.__version__, "torch": torch.__version__, "family": key}
    with torch.no_grad():
        for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            report[precision] = fidelity(fixture_model(fixture_dir, dtype), reference, precision)
        model = fixture_model(fixture_dir, torch.float32)
        report["generate"] = generation_checks(model, reference["probe_ids"][:, :12])
        report["variant"], report["variant_cache_layers"] = variant_checks(key)
        if key in DENSE_MODELS:
            report["dense_equivalence"] = dense_equivalence(key)
        if key == "phi3" and IS_441:
            report["rope_against_441"] = rope_against_441()
        if write_dir is not None:
            write_export(model, write_dir)
        report["exports"] = {str(path): export_check(path, model, reference) for path in load_dirs}
    return report


# --------------------------------------------------------------------------------------------
# For the tests: the reports of both transformers versions, and what every family asserts on them
# --------------------------------------------------------------------------------------------


def reports_under_both_versions(fixture_dir: Path, workdir: Path, slicegpt_env: Path) -> dict[str, dict[str, Any]]:
    """``run``'s report in this interpreter (transformers 5.x) and in ``slicegpt_env``'s (4.41), keyed by
    ``VERSIONS``; each loads the export this interpreter wrote and the one 4.41 wrote, and reports them under
    ``exports`` by the version that wrote them."""
    # folder names unique (transformers caches remote code by folder name) and without dots (4.41 makes a module
    # name of them)
    tag = uuid.uuid4().hex[:12]
    exports = {version: workdir / f"sliced-{tag}-{version.replace('.', '')}" for version in VERSIONS}
    with torch.no_grad():
        write_export(fixture_model(fixture_dir, torch.float32), exports["5.x"])
    python = slicegpt_env / "bin" / "python"
    command = [str(python), __file__, str(fixture_dir), "--write-export", str(exports["4.41"])]
    command += [argument for path in exports.values() for argument in ("--load-export", str(path))]
    env = {**os.environ, "HF_MODULES_CACHE": str(workdir / "hf-modules"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd="/", env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"{Path(__file__).name} failed under {python}:\n{completed.stderr[-3000:]}")
    reports = {"5.x": run(fixture_dir, load_dirs=tuple(exports.values())), "4.41": json.loads(completed.stdout)}
    for report in reports.values():
        report["exports"] = {version: report["exports"][str(path)] for version, path in exports.items()}
    return reports


def assert_reports(reports: dict[str, dict[str, Any]], fp16_nmse_limit: float) -> None:
    """Both versions: fp32 logits within ``NMSE_LIMIT`` and the same top-1 as the official model's, fp16
    within ``fp16_nmse_limit``, every generation and variant check, and both exports loaded with their own
    (remote) code, written by the version that wrote them, giving the official logits and the in-process ones."""
    assert reports["5.x"]["transformers"].startswith("5."), reports["5.x"]["transformers"]
    assert reports["4.41"]["transformers"] == "4.41.0", reports["4.41"]["transformers"]
    model_class = families.family_named(reports["5.x"]["family"]).model_class
    for version, report in reports.items():
        for name in INPUTS:
            fp32, fp16 = report["fp32"][name], report["fp16"][name]
            assert fp32["nmse"] <= NMSE_LIMIT and fp32["top1"] == 1.0, (version, name, fp32)
            assert fp16["nmse"] < fp16_nmse_limit, (version, name, fp16)
        assert all(report["generate"].values()), (version, report["generate"])
        assert all(report["variant"].values()), (version, report["variant"])
        for writer, export in report["exports"].items():
            assert export["module"].startswith("transformers_modules."), (version, export)  # not slicebridge's
            assert export["class"] == model_class and export["dtype"] == "torch.float32", (version, export)
            assert export["written_by"] == reports[writer]["transformers"], (version, export)
            assert export["equals_in_process"], (version, export)
            for name, metrics in export["fp32"].items():
                assert metrics["nmse"] <= NMSE_LIMIT and metrics["top1"] == 1.0, (version, name, metrics)


def assert_dense_equivalence(reports: dict[str, dict[str, Any]], cases: dict[str, set[str]], limit: float) -> None:
    """Both versions ran the dense ``cases`` expected of them; each rebuild is within ``limit`` of its dense
    model on short and long inputs, generates the same tokens, ties its head where the dense model did, and
    (4.41's window) a window one position shorter would have made a visible difference."""
    for version, report in reports.items():
        results = report["dense_equivalence"]
        assert set(results) == cases[version], (version, set(results))
        for name, case in results.items():
            assert case["short"] <= limit and case["long"] <= limit, (version, name, case)
            assert case["generate_equal"] and case.get("tied", True), (version, name, case)
            assert case.get("window_one_shorter", 1.0) > 1e-2, (version, name, case)  # sees `window` + itself


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fixture_dir", type=Path)
    parser.add_argument("--write-export", type=Path, default=None)
    parser.add_argument("--load-export", type=Path, action="append", default=[])
    args = parser.parse_args(argv[1:])
    print(json.dumps(run(args.fixture_dir, args.write_export, tuple(args.load_export)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
