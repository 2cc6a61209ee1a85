"""Check the portable sliced OPT against the official SliceGPT logits, under any interpreter.

Run by the base env (transformers 5.x, imported in-process) and by the stand-in slicegpt env
(transformers 4.41, as a script):

    python tests/helpers/family_check_opt.py <fixture_dir> [--write-export DIR] [--load-export DIR ...]

It puts the repository root on sys.path itself (slicebridge need not be installed), builds the
fixture's model with ``SlicedOPTConfig.from_base_and_slicing`` and ``portable.build_model`` in
fp32 and fp16, and prints one JSON object: per precision and input, the NMSE / max |diff| /
top-1 agreement against the official model's logits; generation checks (greedy with cache vs
an argmax loop without, left padding, beam search, a prompt given as embeddings); a random
variant (per-layer widths, sliced head, ``enable_bias`` False); and, for each export directory
(remote code + safetensors, see ``write_export``), the logits ``AutoModelForCausalLM`` loads
from it with ``trust_remote_code``. ``--write-export`` first writes such a directory with this
interpreter's transformers.
"""

from __future__ import annotations

import argparse
import json
import shutil
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
from slicebridge.model.configuration_sliced_opt import SlicedOPTConfig  # noqa: E402
from slicebridge.model.modeling_sliced_opt import SlicedOPTForCausalLM  # noqa: E402

MODEL_SOURCES = REPO / "slicebridge" / "model"
REMOTE_CODE = ("configuration_sliced.py", "sliced_decoder.py", "configuration_sliced_opt.py", "modeling_sliced_opt.py")
INPUTS = {"probe": ("probe_ids", "logits"), "text": ("text_ids", "text_logits")}
NEW_TOKENS = 8
PAD = 1  # OPT's pad token


def fixture_config(fixture_dir: Path) -> SlicedOPTConfig:
    """The sliced config of the fixture, from its base config.json and SlicingConfig json."""
    facts = json.loads((fixture_dir / "fixture.json").read_text())
    base = json.loads((fixture_dir / "base" / "config.json").read_text())
    slicing = json.loads((fixture_dir / facts["slicing_config"]).read_text())
    return SlicedOPTConfig.from_base_and_slicing(
        base, slicing, sparsity=facts["sparsity"], round_interval=facts["round_interval"]
    )


def fixture_model(fixture_dir: Path, dtype: torch.dtype) -> SlicedOPTForCausalLM:
    facts = json.loads((fixture_dir / "fixture.json").read_text())
    state_dict = torch.load(fixture_dir / facts["checkpoint"], weights_only=True)
    return portable.build_model(state_dict, fixture_config(fixture_dir), dtype=dtype)


def fixed_length(model: SlicedOPTForCausalLM) -> SlicedOPTForCausalLM:
    """Make ``generate`` run for exactly max_new_tokens (no stop at eos), so outputs compare position by position."""
    model.generation_config.eos_token_id = None
    return model


def greedy_without_cache(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    sequence = prompt
    for _ in range(steps):
        next_token = model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    return sequence


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 1D token rows, left-padded with PAD, and its attention mask."""
    width = max(row.shape[0] for row in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for idx, row in enumerate(rows):
        ids[idx, width - row.shape[0] :] = row
        mask[idx, width - row.shape[0] :] = 1
    return ids, mask


def generation_checks(model: SlicedOPTForCausalLM, prompt: torch.Tensor) -> dict[str, bool]:
    """Cache vs no cache, left padding, beams and an embeddings prompt, on a [2, n] prompt."""
    settings = {"do_sample": False, "pad_token_id": PAD}
    with_cache = model.generate(prompt, max_new_tokens=NEW_TOKENS, **settings)
    reference = greedy_without_cache(model, prompt, NEW_TOKENS)

    short = prompt[1, : prompt.shape[1] // 2]
    padded, mask = left_padded([prompt[0], short])
    batched = model.generate(padded, attention_mask=mask, max_new_tokens=NEW_TOKENS, **settings)
    alone = model.generate(short[None], max_new_tokens=NEW_TOKENS, **settings)

    beams = model.generate(prompt, max_new_tokens=4, num_beams=3, **settings)
    beams_no_cache = model.generate(prompt, max_new_tokens=4, num_beams=3, use_cache=False, **settings)
    from_embeds = model.generate(
        inputs_embeds=model.get_input_embeddings()(prompt),
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW_TOKENS,
        **settings,
    )
    return {
        "greedy_cache_equals_no_cache": bool(torch.equal(with_cache, reference)),
        "left_padding_matches_unpadded": bool(torch.equal(batched[1, -NEW_TOKENS:], alone[0, -NEW_TOKENS:])),
        "beam_search_cache_equals_no_cache": bool(torch.equal(beams, beams_no_cache)),
        "inputs_embeds_prompt_matches": bool(torch.equal(from_embeds[:, -NEW_TOKENS:], reference[:, -NEW_TOKENS:])),
    }


def variant_config() -> SlicedOPTConfig:
    """Different widths in every layer, a sliced head, no biases in out_proj/fc2 (``enable_bias`` False)."""
    return SlicedOPTConfig(
        vocab_size=61,
        hidden_size=64,
        num_hidden_layers=3,
        ffn_dim=96,
        num_attention_heads=4,
        max_position_embeddings=40,
        enable_bias=False,
        do_slice_head=True,
        embedding_dimension=48,
        attention_input_dimensions=[48, 40, 56],
        attention_output_dimensions=[56, 48, 40],
        mlp_input_dimensions=[56, 48, 40],
        mlp_output_dimensions=[40, 56, 32],
        lm_head_dimension=32,
        bos_token_id=2,
        eos_token_id=None,
        pad_token_id=PAD,
    )


def random_sliced_tensors(config: SlicedOPTConfig, seed: int = 4) -> dict[str, torch.Tensor]:
    """Random tensors of the shapes the config asks for (the position table large, so positions matter)."""
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in SlicedOPTForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: 0.1 * torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    tensors["model.decoder.embed_positions.weight"] *= 20
    return tensors


def variant_checks() -> dict[str, bool]:
    config = variant_config()
    model = fixed_length(portable.build_model(random_sliced_tensors(config), config))
    prompt = torch.randint(3, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(5))
    checks = generation_checks(model, prompt)
    checks["finite_logits"] = bool(torch.isfinite(model(prompt).logits).all())
    return checks


def write_export(model: SlicedOPTForCausalLM, directory: Path) -> None:
    """An export-style directory: the remote-code files, config.json with auto_map, safetensors weights
    (with the ``{"format": "pt"}`` metadata that transformers 4.41 insists on)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    for source in REMOTE_CODE:
        shutil.copy(MODEL_SOURCES / source, directory / source)
    config = model.config.to_dict()
    config["architectures"] = ["SlicedOPTForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_sliced_opt.SlicedOPTConfig",
        "AutoModelForCausalLM": "modeling_sliced_opt.SlicedOPTForCausalLM",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})  # 4.41 requires it


def export_checks(export_dir: Path, in_process: SlicedOPTForCausalLM, reference: dict) -> dict[str, Any]:
    """Load ``export_dir`` with ``AutoModelForCausalLM`` (remote code) and compare its fp32 logits."""
    remote = transformers.AutoModelForCausalLM.from_pretrained(str(export_dir), trust_remote_code=True)
    ids = reference["probe_ids"]
    logits = remote(ids).logits
    return {
        "module": type(remote).__module__,
        "class": type(remote).__name__,
        "dtype": str(remote.dtype),
        "written_by": json.loads((export_dir / "config.json").read_text()).get("transformers_version"),
        "vs_reference": logit_metrics(logits, reference["logits_fp32"]),
        "same_as_in_process": bool(torch.equal(logits, in_process(ids).logits)),
    }


def run(fixture_dir: Path, write_dir: Path | None = None, load_dirs: tuple[Path, ...] = ()) -> dict[str, Any]:
    reference = torch.load(fixture_dir / "reference.pt", weights_only=True)
    report: dict[str, Any] = {"transformers": transformers.__version__, "torch": torch.__version__}
    with torch.no_grad():
        for precision, dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
            model = fixture_model(fixture_dir, dtype)
            report[precision] = {
                name: logit_metrics(model(reference[ids]).logits, reference[f"{logits}_{precision}"])
                for name, (ids, logits) in INPUTS.items()
            }
        model = fixed_length(fixture_model(fixture_dir, torch.float32))
        report["generate"] = generation_checks(model, reference["probe_ids"][:, :12])
        report["variant"] = variant_checks()
        if write_dir is not None:
            write_export(model, write_dir)
        report["exports"] = {str(path): export_checks(path, model, reference) for path in load_dirs}
    return report


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
