"""Check the portable sliced model against the official SliceGPT logits, under any interpreter.

Run by the base env (transformers 5.x) and by the stand-in slicegpt env (transformers 4.41):

    python tests/helpers/portable_check.py <fixture_dir>

It puts the repository root on sys.path itself (slicebridge need not be installed), reads the
fixture's checkpoint with ``read_checkpoint``, builds the model in fp32 and fp16, and prints one
JSON object: per precision and input, the NMSE / max |diff| / top-1 agreement against the
official model's logits, plus generation checks (greedy with cache vs an argmax loop without,
left padding, sampling), a check of a random GQA + llama3-RoPE + tied-embeddings model with
per-layer widths, and the library versions.
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
from slicebridge.model.checkpoint import read_checkpoint  # noqa: E402
from slicebridge.model.compare import logit_metrics  # noqa: E402
from slicebridge.model.configuration_sliced_llama import SlicedLlamaConfig  # noqa: E402
from slicebridge.model.modeling_sliced_llama import SlicedLlamaForCausalLM  # noqa: E402

INPUTS = {"probe": "probe_ids", "text": "text_ids"}
NEW_TOKENS = 8


def greedy_without_cache(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    sequence = prompt
    for _ in range(steps):
        next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    return sequence


def generation_checks(model: torch.nn.Module, probe_ids: torch.Tensor) -> dict[str, bool]:
    prompt = probe_ids[:, :12]
    with_cache = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    reference = greedy_without_cache(model, prompt, NEW_TOKENS)

    short = probe_ids[1:2, :7]
    padded = torch.zeros(2, 12, dtype=torch.long)
    padded[0] = prompt[0]
    padded[1, 12 - short.shape[1] :] = short
    mask = torch.ones_like(padded)
    mask[1, : 12 - short.shape[1]] = 0
    batched = model.generate(padded, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    alone = model.generate(short, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)

    beams = model.generate(prompt, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    beams_no_cache = model.generate(
        prompt, max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0, use_cache=False
    )
    from_embeds = model.generate(
        inputs_embeds=model.get_input_embeddings()(prompt),
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
    )

    torch.manual_seed(0)
    sampled = model.generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=20, temperature=0.9, pad_token_id=0
    )
    return {
        "greedy_cache_equals_no_cache": bool(torch.equal(with_cache, reference)),
        "left_padding_matches_unpadded": bool(torch.equal(batched[1, 12:], alone[0, short.shape[1] :])),
        "beam_search_cache_equals_no_cache": bool(torch.equal(beams, beams_no_cache)),
        "inputs_embeds_prompt_matches": bool(torch.equal(from_embeds[:, -NEW_TOKENS:], reference[:, -NEW_TOKENS:])),
        "sampling_ran": tuple(sampled.shape) == (prompt.shape[0], prompt.shape[1] + NEW_TOKENS),
    }


def variant_config() -> SlicedLlamaConfig:
    """GQA (8 heads, 2 KV heads), Llama 3.1 RoPE scaling, tied embeddings, a sliced head and
    different widths in every layer."""
    return SlicedLlamaConfig(
        vocab_size=53,
        hidden_size=64,
        intermediate_size=72,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=32,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
        tie_word_embeddings=True,
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


def random_sliced_tensors(config: SlicedLlamaConfig, seed: int = 4) -> dict[str, torch.Tensor]:
    """Random tensors of the shapes the config asks for (lm_head left out when tied)."""
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in SlicedLlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: 0.1 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    return tensors


def variant_checks() -> dict[str, bool]:
    config = variant_config()
    model = portable.build_model(random_sliced_tensors(config), config)
    prompt = torch.randint(3, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    with_cache = model.generate(prompt, max_new_tokens=10, do_sample=False)
    without_cache = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    return {
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "greedy_cache_equals_no_cache": bool(torch.equal(with_cache, without_cache)),
        "finite_logits": bool(torch.isfinite(model(prompt).logits).all()),
    }


def run(fixture_dir: Path) -> dict[str, Any]:
    reference = torch.load(fixture_dir / "reference.pt", weights_only=True)
    checkpoint = read_checkpoint(fixture_dir / "sliced")
    report: dict[str, Any] = {"transformers": transformers.__version__, "torch": torch.__version__}
    with torch.no_grad():
        for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            model = checkpoint.build_model(dtype=dtype)
            report[precision] = {
                name: logit_metrics(
                    model(reference[ids]).logits, reference[f"{'' if name == 'probe' else 'text_'}logits_{precision}"]
                )
                for name, ids in INPUTS.items()
            }
            if precision == "fp32":
                report["generate"] = generation_checks(model, reference["probe_ids"])
        report["variant"] = variant_checks()
    return report


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} <fixture_dir>", file=sys.stderr)
        return 2
    print(json.dumps(run(Path(argv[1])), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
