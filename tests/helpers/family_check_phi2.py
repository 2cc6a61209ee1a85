"""Check the portable sliced Phi-2 against the official SliceGPT logits, under any interpreter.

Run by the base env (transformers 5.x) and by the stand-in slicegpt env (transformers 4.41):

    python tests/helpers/family_check_phi2.py <fixture_dir> [<export_dir>]

It puts the repository root on sys.path itself (slicebridge need not be installed), builds the
model from the fixture's base config.json, SlicingConfig .json and .pt in fp32 and fp16 through
``portable.build_model``, and prints one JSON object: per precision and input, the NMSE / max
|diff| / top-1 agreement against the official model's logits; generation checks (greedy with
cache vs an argmax loop without, left padding, beam search with and without cache); a random
variant (GQA, partial_rotary_factor 0.4, per-layer widths, a sliced head); rotated dense Phi
models of this transformers version against their sliced rebuild, per RoPE scaling type; with
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

from slicebridge.model import portable  # noqa: E402
from slicebridge.model.compare import logit_metrics  # noqa: E402
from slicebridge.model.configuration_sliced_phi2 import SlicedPhi2Config  # noqa: E402
from slicebridge.model.modeling_sliced_phi2 import SlicedPhi2ForCausalLM  # noqa: E402

CHECKPOINT = "phi-2_0.3"
INPUTS = {"probe": ("probe_ids", "logits"), "text": ("text_ids", "text_logits")}
NEW_TOKENS = 8
ROPE_VARIANTS = {
    "default": None,
    "linear": {"type": "linear", "factor": 2.0},
    "dynamic": {"type": "dynamic", "factor": 2.0},
}


# --------------------------------------------------------------------------------------------
# The fixture
# --------------------------------------------------------------------------------------------


def fixture_config(fixture_dir: Path) -> SlicedPhi2Config:
    """The sliced config from the fixture's dense config.json and the official SlicingConfig."""
    base = json.loads((fixture_dir / "base" / "config.json").read_text())
    slicing = json.loads((fixture_dir / "sliced" / f"{CHECKPOINT}.json").read_text())
    return SlicedPhi2Config.from_base_and_slicing(base, slicing, sparsity=0.3, round_interval=8)


def fixture_model(fixture_dir: Path, dtype: torch.dtype) -> SlicedPhi2ForCausalLM:
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
# A random variant: GQA, partial rotary 0.4, per-layer widths, a sliced head
# --------------------------------------------------------------------------------------------


def variant_config() -> SlicedPhi2Config:
    """6 heads of 16 (6 rotary channels each) over 2 KV heads, widths that change in every layer
    (parallel blocks: each layer reads one width and writes one), and a sliced head (40 < 96)."""
    return SlicedPhi2Config(
        vocab_size=53,
        hidden_size=96,
        intermediate_size=72,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        partial_rotary_factor=0.4,
        max_position_embeddings=32,
        do_slice_head=True,
        embedding_dimension=40,
        attention_input_dimensions=[40, 56, 32],
        attention_output_dimensions=[56, 32, 40],
        mlp_input_dimensions=[40, 56, 32],
        mlp_output_dimensions=[56, 32, 40],
        lm_head_dimension=40,
        bos_token_id=1,
        eos_token_id=None,
        pad_token_id=0,
    )


def random_sliced_tensors(config: SlicedPhi2Config, seed: int = 4) -> dict[str, torch.Tensor]:
    """Random tensors of the shapes the config asks for."""
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in SlicedPhi2ForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.1 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def variant_checks() -> dict[str, bool]:
    config = variant_config()
    model = portable.build_model(random_sliced_tensors(config), config)
    prompt = torch.randint(3, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    with_cache = model.generate(prompt, max_new_tokens=10, do_sample=False)
    without_cache = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    return {
        "rotary_dim_is_6": config.rotary_dim == 6,
        "greedy_cache_equals_no_cache": bool(torch.equal(with_cache, without_cache)),
        "finite_logits": bool(torch.isfinite(model(prompt).logits).all()),
    }


# --------------------------------------------------------------------------------------------
# Rotated dense Phi models of this transformers version == their sliced rebuild
# --------------------------------------------------------------------------------------------


def dense_phi(rope_scaling: dict[str, Any] | None) -> torch.nn.Module:
    """A random dense PhiForCausalLM (GQA, partial rotary 0.4) with non-trivial LayerNorms and sharp attention."""
    torch.manual_seed(0)
    config = transformers.PhiConfig(
        vocab_size=61,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        partial_rotary_factor=0.4,
        max_position_embeddings=16,
        rope_scaling=rope_scaling,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.PhiForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(param))
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(25)  # sharp attention, so that positions (RoPE) visibly matter
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model


def fuse_and_rotate(dense: torch.nn.Module) -> dict[str, torch.Tensor]:
    """SliceGPT's transformation without slicing: centre the stream, fuse the LayerNorms, rotate each layer's stream."""
    weights = {name: tensor.detach().double() for name, tensor in dense.state_dict().items()}
    hidden, layers = dense.config.hidden_size, dense.config.num_hidden_layers
    generator = torch.Generator().manual_seed(1)
    rotations = [
        torch.linalg.qr(torch.randn(hidden, hidden, generator=generator, dtype=torch.float64))[0]
        for _ in range(layers + 1)
    ]
    centre = torch.eye(hidden, dtype=torch.float64) - 1.0 / hidden  # LayerNorm's mean subtraction
    sliced = {"model.embed_tokens.weight": weights["model.embed_tokens.weight"] @ centre @ rotations[0]}

    def read(linear: str, norm: str, rotation: torch.Tensor) -> None:  # a linear reading LayerNorm(stream)
        weight, bias = weights[f"{linear}.weight"], weights[f"{linear}.bias"]
        sliced[f"{linear}.weight"] = weight * weights[f"{norm}.weight"] @ rotation
        sliced[f"{linear}.bias"] = bias + weight @ weights[f"{norm}.bias"]

    def write(linear: str, rotation: torch.Tensor) -> None:  # a linear adding to the stream
        sliced[f"{linear}.weight"] = rotation.T @ centre @ weights[f"{linear}.weight"]
        sliced[f"{linear}.bias"] = rotation.T @ centre @ weights[f"{linear}.bias"]

    for idx in range(layers):
        prefix, before, after = f"model.layers.{idx}.", rotations[idx], rotations[idx + 1]
        for linear in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"):
            read(prefix + linear, prefix + "input_layernorm", before)
        for linear in ("self_attn.dense", "mlp.fc2"):
            write(prefix + linear, after)
        sliced[prefix + "attn_shortcut_Q"] = before.T @ after
    read("lm_head", "model.final_layernorm", rotations[layers])
    return {name: tensor.float() for name, tensor in sliced.items()}


def dense_equivalence() -> dict[str, float]:
    """max |logit diff| of each rotated dense Phi vs its sliced rebuild (on 24 tokens: dynamic RoPE kicks in)."""
    differences = {}
    for name, rope_scaling in ROPE_VARIANTS.items():
        dense = dense_phi(rope_scaling)
        config = SlicedPhi2Config.from_base_and_slicing(dense.config.to_dict(), {"const_dimension": 96})
        sliced = portable.build_model(fuse_and_rotate(dense), config)
        ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(2))
        differences[name] = float((sliced(ids).logits - dense(ids).logits).abs().max())
    return differences


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def export_check(export_dir: Path, model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The exported directory, loaded with remote code, against the official logits and ``model``."""
    loaded = transformers.AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)
    probe = reference["probe_ids"]
    return {
        "class": type(loaded).__name__,
        "remote_code": type(loaded).__module__.startswith("transformers_modules."),
        "dtype": str(loaded.dtype),
        "fp32": fidelity(loaded, reference, "fp32"),
        "equals_in_process": bool(torch.equal(loaded(probe).logits, model(probe).logits)),
    }


def run(fixture_dir: Path, export_dir: Path | None = None) -> dict[str, Any]:
    reference = torch.load(fixture_dir / "reference.pt", weights_only=True)
    report: dict[str, Any] = {"transformers": transformers.__version__, "torch": torch.__version__}
    with torch.no_grad():
        for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            model = fixture_model(fixture_dir, dtype)
            report[precision] = fidelity(model, reference, precision)
        report["generate"] = generation_checks(fixture_model(fixture_dir, torch.float32), reference["probe_ids"])
        report["variant"] = variant_checks()
        report["dense_equivalence"] = dense_equivalence()
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
