"""Check the portable sliced Phi-3 against the official SliceGPT logits, under any interpreter.

Run by the base env (transformers 5.x) and by the stand-in slicegpt env (transformers 4.41):

    python tests/helpers/family_check_phi3.py <fixture_dir> [<export_dir>]

It puts the repository root on sys.path itself (slicebridge need not be installed), builds the
model from the fixture's base config.json, SlicingConfig .json and .pt in fp32 and fp16 through
``portable.build_model``, and prints one JSON object: per precision and input, the NMSE / max
|diff| / top-1 agreement against the official model's logits; generation checks (greedy with
cache vs an argmax loop without, left padding, beam search with and without cache); a random
variant (GQA, su scaling past the original context, a 5-position sliding window, per-layer
widths, a sliced head); rotated dense Phi-3 models of this transformers version against their
sliced rebuild; under 4.41, our RoPE cos/sin against 4.41's own su / yarn rotary classes; with
``export_dir``, the exported directory loaded by ``AutoModelForCausalLM`` with remote code; and
the library versions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.phi3 import modeling_phi3  # noqa: E402

from slicebridge.model import portable  # noqa: E402
from slicebridge.model.compare import logit_metrics  # noqa: E402
from slicebridge.model.configuration_sliced_phi3 import SlicedPhi3Config  # noqa: E402
from slicebridge.model.modeling_sliced_phi3 import SlicedPhi3ForCausalLM, SlicedPhi3RotaryEmbedding  # noqa: E402

CHECKPOINT = "Phi-3-mini-4k-instruct_0.2"
INPUTS = {"probe": ("probe_ids", "logits"), "text": ("text_ids", "text_logits")}
NEW_TOKENS = 8
IS_441 = hasattr(modeling_phi3, "Phi3SuScaledRotaryEmbedding")  # 4.41's own su / yarn classes

# Phi-3 RoPE scalings for head_dim 16 (8 channels): distinct short and long per-channel factors.
SHORT_FACTORS = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8]
LONG_FACTORS = [1.0, 1.5, 2.4, 3.9, 6.2, 9.9, 15.8, 25.0]


def phi3_scaling(rope_type: str) -> dict[str, Any]:
    """A 4.41-style ``rope_scaling`` dict (exactly the three keys 4.41's Phi3Config accepts)."""
    return {"type": rope_type, "short_factor": SHORT_FACTORS, "long_factor": LONG_FACTORS}


# --------------------------------------------------------------------------------------------
# The fixture
# --------------------------------------------------------------------------------------------


def fixture_config(fixture_dir: Path) -> SlicedPhi3Config:
    """The sliced config from the fixture's dense config.json and the official SlicingConfig."""
    base = json.loads((fixture_dir / "base" / "config.json").read_text())
    slicing = json.loads((fixture_dir / "sliced" / f"{CHECKPOINT}.json").read_text())
    return SlicedPhi3Config.from_base_and_slicing(base, slicing, sparsity=0.2, round_interval=8)


def fixture_model(fixture_dir: Path, dtype: torch.dtype) -> SlicedPhi3ForCausalLM:
    """The portable model around the official checkpoint's tensors."""
    state_dict = torch.load(fixture_dir / "sliced" / f"{CHECKPOINT}.pt", weights_only=True)
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
    sequence = prompt
    for _ in range(steps):
        next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    return sequence


def generation_checks(model: torch.nn.Module, probe_ids: torch.Tensor) -> dict[str, bool]:
    """Cached greedy == uncached argmax loop; a left-padded row == the same prompt alone; beams with == without cache.

    EOS is switched off so that every call runs its full length.
    """
    model.generation_config.eos_token_id = None
    options = {"do_sample": False, "pad_token_id": 0}
    prompt = probe_ids[:, :12]
    with_cache = model.generate(prompt, max_new_tokens=NEW_TOKENS, **options)
    reference = greedy_without_cache(model, prompt, NEW_TOKENS)

    short = probe_ids[1:2, :7]
    padded = torch.zeros(2, 12, dtype=torch.long)
    padded[0] = prompt[0]
    padded[1, 12 - short.shape[1] :] = short
    mask = torch.ones_like(padded)
    mask[1, : 12 - short.shape[1]] = 0
    batched = model.generate(padded, attention_mask=mask, max_new_tokens=NEW_TOKENS, **options)
    alone = model.generate(short, max_new_tokens=NEW_TOKENS, **options)

    beams = model.generate(prompt, max_new_tokens=4, num_beams=3, **options)
    beams_no_cache = model.generate(prompt, max_new_tokens=4, num_beams=3, use_cache=False, **options)
    return {
        "greedy_cache_equals_no_cache": bool(torch.equal(with_cache, reference)),
        "left_padding_matches_unpadded": bool(torch.equal(batched[1, 12:], alone[0, short.shape[1] :])),
        "beam_search_cache_equals_no_cache": bool(torch.equal(beams, beams_no_cache)),
    }


# --------------------------------------------------------------------------------------------
# A random variant: GQA, su scaling past the original context, a short sliding window,
# per-layer widths, a sliced head
# --------------------------------------------------------------------------------------------


def variant_config(sliding_window: int | None = 5) -> SlicedPhi3Config:
    """4 heads of 16 over 2 KV heads, su scaling (original context 8, extended to 64), a window of
    ``sliding_window`` positions, widths that change in every layer and a sliced head (40 < 64)."""
    return SlicedPhi3Config(
        vocab_size=53,
        hidden_size=64,
        intermediate_size=72,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        original_max_position_embeddings=8,
        rope_scaling=phi3_scaling("su"),
        sliding_window=sliding_window,
        do_slice_head=True,
        embedding_dimension=40,
        attention_input_dimensions=[40, 48, 32],
        attention_output_dimensions=[56, 40, 48],
        mlp_input_dimensions=[56, 40, 48],
        mlp_output_dimensions=[48, 32, 40],
        lm_head_dimension=40,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )


def random_sliced_tensors(config: SlicedPhi3Config, seed: int = 4) -> dict[str, torch.Tensor]:
    """Random tensors of the shapes the config asks for (q and k rows sharpened so positions matter)."""
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in SlicedPhi3ForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: 0.1 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    query_key_rows = (config.num_attention_heads + config.num_key_value_heads) * config.head_dim
    for name, tensor in tensors.items():
        if name.endswith("qkv_proj.weight"):
            tensor[:query_key_rows] *= 10
    return tensors


def variant_checks() -> dict[str, Any]:
    """Greedy and beam generation with == without cache over 10 + 12 tokens: past the original
    context of 8 throughout (so su's long factors hold at every step) and four times the window."""
    config = variant_config()
    tensors = random_sliced_tensors(config)
    model = portable.build_model(tensors, config)
    prompt = torch.randint(3, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    options = {"max_new_tokens": 12, "do_sample": False}
    with_cache = model.generate(prompt, return_dict_in_generate=True, **options)
    without_cache = model.generate(prompt, use_cache=False, **options)
    beams = model.generate(prompt, num_beams=3, **options)
    beams_no_cache = model.generate(prompt, num_beams=3, use_cache=False, **options)
    windowless = portable.build_model(tensors, variant_config(sliding_window=None))
    cache = getattr(with_cache, "cache", None) or with_cache.past_key_values
    return {
        "greedy_cache_equals_no_cache": bool(torch.equal(with_cache.sequences, without_cache)),
        "beam_search_cache_equals_no_cache": bool(torch.equal(beams, beams_no_cache)),
        "window_changes_logits": not torch.allclose(model(without_cache).logits, windowless(without_cache).logits),
        "finite_logits": bool(torch.isfinite(model(without_cache).logits).all()),
        "cache_layers": sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])}),
    }


# --------------------------------------------------------------------------------------------
# Rotated dense Phi-3 models of this transformers version == their sliced rebuild
# --------------------------------------------------------------------------------------------


def dense_phi3(rope_scaling: dict[str, Any] | None, sliding_window: int | None) -> torch.nn.Module:
    """A random dense Phi3ForCausalLM (4 heads of 16 over 2 KV heads, original context 16 extended
    to 64) with non-trivial RMSNorm weights and sharp attention."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        vocab_size=61,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        original_max_position_embeddings=16,
        rope_scaling=rope_scaling,
        sliding_window=sliding_window,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.Phi3ForCausalLM(config).float().eval()
    query_key_rows = (config.num_attention_heads + config.num_key_value_heads) * 16
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif name.endswith("qkv_proj.weight"):
                param[:query_key_rows] *= 5  # sharp attention, so that positions (RoPE, window) visibly matter
    return model


def fuse_and_rotate(dense: torch.nn.Module) -> dict[str, torch.Tensor]:
    """SliceGPT's transformation without slicing: fuse the RMSNorm weights, rotate each stretch of the stream."""
    weights = {name: tensor.detach().double() for name, tensor in dense.state_dict().items()}
    hidden, layers = dense.config.hidden_size, dense.config.num_hidden_layers
    generator = torch.Generator().manual_seed(1)
    rotations = [
        torch.linalg.qr(torch.randn(hidden, hidden, generator=generator, dtype=torch.float64))[0]
        for _ in range(2 * layers + 1)
    ]
    sliced = {"model.embed_tokens.weight": weights["model.embed_tokens.weight"] @ rotations[0]}

    def read(linear: str, norm: str, rotation: torch.Tensor) -> None:  # a linear reading RMSNorm(stream)
        sliced[f"{linear}.weight"] = weights[f"{linear}.weight"] * weights[f"{norm}.weight"] @ rotation

    def write(linear: str, rotation: torch.Tensor) -> None:  # a linear adding to the stream
        sliced[f"{linear}.weight"] = rotation.T @ weights[f"{linear}.weight"]

    for idx in range(layers):
        prefix = f"model.layers.{idx}."
        before, middle, after = rotations[2 * idx], rotations[2 * idx + 1], rotations[2 * idx + 2]
        read(prefix + "self_attn.qkv_proj", prefix + "input_layernorm", before)
        write(prefix + "self_attn.o_proj", middle)
        sliced[prefix + "attn_shortcut_Q"] = before.T @ middle
        read(prefix + "mlp.gate_up_proj", prefix + "post_attention_layernorm", middle)
        write(prefix + "mlp.down_proj", after)
        sliced[prefix + "mlp_shortcut_Q"] = middle.T @ after
    read("lm_head", "model.norm", rotations[-1])
    return {name: tensor.float() for name, tensor in sliced.items()}


def dense_variants() -> dict[str, tuple[dict[str, Any] | None, int | None]]:
    """(rope_scaling, sliding_window) per case. 4.41: window 5 with every RoPE it implements.
    5.x renamed su to longrope and computes yarn as longrope too, and its window is one position
    shorter than 4.41's (what SliceGPT ran): there, default and longrope RoPE, no window."""
    if IS_441:
        return {"default": (None, 5), "su": (phi3_scaling("su"), 5), "yarn": (phi3_scaling("yarn"), 5)}
    return {"default": (None, None), "longrope": ({**phi3_scaling("su"), "type": "longrope"}, None)}


def dense_equivalence() -> dict[str, Any]:
    """max |logit difference| between each rotated dense Phi-3 and its sliced rebuild, for 12 tokens
    (short factors) and 24 (past the original context of 16: long factors), plus greedy generation
    with the cache on both; under 4.41 also the difference a window one position shorter would make."""
    report: dict[str, Any] = {}
    short_ids, long_ids = (torch.randint(3, 61, (2, n), generator=torch.Generator().manual_seed(2)) for n in (12, 24))
    for name, (rope_scaling, window) in dense_variants().items():
        dense = dense_phi3(rope_scaling, window)
        config = SlicedPhi3Config.from_base_and_slicing(dense.config.to_dict(), {})
        sliced = portable.build_model(fuse_and_rotate(dense), config)
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
        if window is not None:
            narrower_config = portable.config_from_dict({**config.to_dict(), "sliding_window": window})
            narrower = portable.build_model(fuse_and_rotate(dense), narrower_config)
            report[name]["window_one_shorter"] = float((narrower(long_ids).logits - dense(long_ids).logits).abs().max())
    return report


def rope_against_441() -> dict[str, dict[str, float]]:
    """max |cos/sin difference| between our rotary embedding and 4.41's Phi-3 classes, for positions
    0..15 (short factors, up to the original context of 16) and 0..16 (one past it: long), on a
    config extending that context to 64."""
    classes = {
        "default": modeling_phi3.Phi3RotaryEmbedding,
        "su": modeling_phi3.Phi3SuScaledRotaryEmbedding,
        "yarn": modeling_phi3.Phi3YarnScaledRotaryEmbedding,
    }
    report = {}
    for name, rope_class in classes.items():
        dense_config = dense_phi3(None if name == "default" else phi3_scaling(name), None).config
        theirs = (
            rope_class(16, max_position_embeddings=64, base=dense_config.rope_theta)
            if name == "default"
            else rope_class(16, dense_config)
        )
        ours = SlicedPhi3RotaryEmbedding(SlicedPhi3Config.from_base_and_slicing(dense_config.to_dict(), {}))
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
# Report
# --------------------------------------------------------------------------------------------


def export_check(export_dir: Path, model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The exported directory, loaded with remote code, against the official logits and ``model``."""
    loaded = transformers.AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)
    probe = reference["probe_ids"]
    return {
        "class": type(loaded).__name__,
        "dtype": str(loaded.dtype),
        "fp32": fidelity(loaded, reference, "fp32"),
        "equals_in_process": bool(torch.equal(loaded(probe).logits, model(probe).logits)),
    }


def run(fixture_dir: Path, export_dir: Path | None = None) -> dict[str, Any]:
    reference = torch.load(fixture_dir / "reference.pt", weights_only=True)
    report: dict[str, Any] = {"transformers": transformers.__version__, "torch": torch.__version__}
    with torch.no_grad():
        for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            report[precision] = fidelity(fixture_model(fixture_dir, dtype), reference, precision)
        report["generate"] = generation_checks(fixture_model(fixture_dir, torch.float32), reference["probe_ids"])
        report["variant"] = variant_checks()
        report["dense_equivalence"] = dense_equivalence()
        if IS_441:
            report["rope_against_441"] = rope_against_441()
        if export_dir is not None:
            report["export"] = export_check(export_dir, fixture_model(fixture_dir, torch.float32), reference)
    return report


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(f"usage: {argv[0]} <fixture_dir> [<export_dir>]", file=sys.stderr)
        return 2
    export_dir = Path(argv[2]) if len(argv) == 3 else None
    print(json.dumps(run(Path(argv[1]), export_dir), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
