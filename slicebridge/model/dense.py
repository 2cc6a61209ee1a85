"""Dense Llama models with random weights, made locally: the input that ``slicing`` slices.

``make_dense_llama`` writes a directory that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load
under transformers 4.41 (SliceGPT's pin) and 5.x alike, without any download:

- ``config.json`` / ``generation_config.json`` for a ``LlamaForCausalLM``, in the classic
  (4.x) dialect both versions read (``rope_theta``, ``rope_scaling``, ``torch_dtype``);
- ``model.safetensors`` with random weights: linear and embedding weights ~ N(0, 0.02), RMSNorm
  weights ``1 + noise * N(0, 1)`` (not 1, so SliceGPT's norm fusion has work to do). The tensor
  names and shapes are taken from the installed transformers' ``LlamaForCausalLM`` (built on the
  meta device), and each tensor is drawn directly in the target dtype and streamed to the file
  one at a time, so a 1B-parameter fp16 model never exists in memory, let alone in fp32;
- a byte-level BPE tokenizer trained in-process (``tokenizers``) on ``embedded_text()``, a few
  KB of English kept in ``sample_text``, wrapped as a ``PreTrainedTokenizerFast`` (bos ``<s>``, eos
  ``</s>``, unk ``<unk>``) and saved with ``save_pretrained``; the saved files are then put in
  the form tokenizers 0.19 / transformers 4.41 also read (merges as ``"a b"`` strings,
  ``tokenizer_class`` ``PreTrainedTokenizerFast``).

``PRESETS`` names the shapes used by the demo, tests and benchmarks ("tiny" is the shape of
the official fixture, "small" ~10M parameters, "1b" TinyLlama-like ~1.1B);
``make_dense_preset`` builds one of them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from slicebridge.dtypes import dtype_name

from .atomic import atomic_file
from .sample_text import embedded_text

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
# Token ids of the special tokens: the trainer puts them first, in this order (Llama's ids).
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

PRESETS: dict[str, dict[str, Any]] = {
    # The official fixture's shape (slicegpt-llama-tiny): ~0.98M parameters.
    "tiny": dict(
        hidden_size=128,
        intermediate_size=344,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=1000,
        rope_theta=500000.0,
        max_position_embeddings=256,
    ),
    # ~9.9M parameters.
    "small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        vocab_size=8000,
        rope_theta=500000.0,
        max_position_embeddings=512,
    ),
    # TinyLlama-1.1B's shape: ~1.1B parameters (2.2 GB in fp16).
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_layers=22,
        num_heads=32,
        num_kv_heads=4,
        vocab_size=32000,
        rope_theta=10000.0,
        max_position_embeddings=2048,
    ),
}

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float16"`` / ``"fp16"`` / ``torch.float16`` ... -> a torch floating dtype we can write."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        name = dtype_name(dtype)
        resolved = _DTYPES.get(_DTYPE_ALIASES.get(name, name))
        if resolved is None:
            raise ValueError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    if resolved not in _SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported dtype {resolved}; use one of {', '.join(_DTYPES)}")
    return resolved


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def llama_config_dict(
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    vocab_size: int,
    rope_theta: float,
    max_position_embeddings: int,
    dtype: torch.dtype,
    tie_word_embeddings: bool,
    rms_norm_eps: float,
    initializer_range: float,
) -> dict[str, Any]:
    """A LlamaConfig as a ``config.json`` dict in the 4.x dialect, which 5.x also reads.

    (A 5.x ``save_pretrained`` would write ``rope_parameters`` and ``dtype``, which 4.41 ignores:
    it would silently fall back to rope_theta 10000.)
    """
    import transformers

    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide into num_heads ({num_heads}) heads, "
            f"and num_heads into num_kv_heads ({num_kv_heads}) groups"
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": initializer_range,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": float(rope_theta),
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype_name(dtype),
        "transformers_version": transformers.__version__,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def generation_config_dict() -> dict[str, Any]:
    """What ``GenerationConfig.from_model_config`` gives for the config above."""
    import transformers

    return {
        "_from_model_config": True,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "transformers_version": transformers.__version__,
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (as ``save_pretrained`` formats it)."""
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def llama_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of the installed transformers' ``LlamaForCausalLM`` for ``config``,
    in its order (built on the meta device: no memory, no init). Tied heads are left out, as
    ``save_pretrained`` leaves them out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {key: value for key, value in config.items() if key not in ("architectures", "transformers_version")}
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**settings))
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config["tie_word_embeddings"]:
        shapes.pop("lm_head.weight", None)
    return shapes


def random_tensor(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    generator: torch.Generator,
    *,
    initializer_range: float,
    norm_weight_noise: float,
) -> torch.Tensor:
    """One random weight, drawn directly in ``dtype``: RMSNorm weights ``1 + noise * N(0, 1)``,
    everything else ``N(0, initializer_range)`` (transformers' Llama init)."""
    if name.endswith("norm.weight"):
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return (1.0 + norm_weight_noise * noise).to(dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, initializer_range, generator=generator)


def _safetensors_header(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> bytes:
    """The length-prefixed, 8-byte-aligned JSON header of a safetensors file holding ``shapes``."""
    element_size = torch.empty((), dtype=dtype).element_size()
    entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * element_size
        entries[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header


def write_safetensors_streaming(
    path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, tensors: Iterator[tuple[str, torch.Tensor]]
) -> int:
    """Write a safetensors file tensor by tensor (only one tensor in memory at a time).

    ``tensors`` must yield exactly ``shapes``' names, in order, with those shapes and ``dtype``.
    Returns the number of bytes of tensor data written.
    """
    written = 0
    with atomic_file(path, overwrite=True) as tmp, open(tmp, "wb") as handle:
        handle.write(_safetensors_header(shapes, dtype))
        for (name, tensor), (expected_name, shape) in zip(tensors, shapes.items(), strict=True):
            if name != expected_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(
                    f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not follow the plan "
                    f"({expected_name} {shape})"
                )
            raw = tensor.contiguous().view(torch.uint8).numpy()
            handle.write(memoryview(raw))
            written += raw.nbytes
    return written


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_byte_level_bpe(text: str, vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``text`` (at most ``vocab_size`` tokens;
    a few KB of text supports ~1.4k). ``<unk>``, ``<s>``, ``</s>`` get ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS["unk_token"], SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """Wrap as ``PreTrainedTokenizerFast``, ``save_pretrained``, then make the files 4.41-readable."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
        **SPECIAL_TOKENS,
    )
    wrapped.save_pretrained(str(out_dir))
    make_tokenizer_files_portable(out_dir)


def make_tokenizer_files_portable(out_dir: Path) -> None:
    """Rewrite what a newer transformers/tokenizers saved so that transformers 4.41 (tokenizers
    0.19) loads it too: BPE merges as ``"a b"`` strings (0.20+ writes pairs, which 0.19 cannot
    parse; byte-level tokens never contain a space), ``tokenizer_class`` PreTrainedTokenizerFast
    (5.x writes ``TokenizersBackend``, unknown to 4.x), and a ``special_tokens_map.json``. A
    post-processor that adds no special tokens (5.x adds one) is dropped, so that either version
    writes the same ``tokenizer.json``."""
    tokenizer_path = out_dir / "tokenizer.json"
    spec = json.loads(tokenizer_path.read_text(encoding="utf-8"))
    merges = spec["model"].get("merges", [])
    spec["model"]["merges"] = [merge if isinstance(merge, str) else " ".join(merge) for merge in merges]
    post_processor = spec.get("post_processor") or {}
    if post_processor.get("type") == "TemplateProcessing" and not post_processor.get("special_tokens"):
        spec["post_processor"] = None
    with atomic_file(tokenizer_path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(spec, ensure_ascii=False, indent=2), encoding="utf-8")

    config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.pop("backend", None)
    write_json(config_path, tokenizer_config)
    write_json(out_dir / "special_tokens_map.json", dict(SPECIAL_TOKENS))


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def make_dense_llama(
    out_dir: str | os.PathLike[str],
    *,
    hidden_size: int = 128,
    intermediate_size: int = 344,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 1000,
    rope_theta: float = 500000.0,
    max_position_embeddings: int = 256,
    dtype: str | torch.dtype = "float16",
    seed: int = 0,
    tie_word_embeddings: bool = False,
    norm_weight_noise: float = 0.1,
    rms_norm_eps: float = 1e-5,
    initializer_range: float = 0.02,
) -> Path:
    """Write a random-weight ``LlamaForCausalLM`` and a trained byte-level BPE tokenizer to ``out_dir``.

    Deterministic for a given ``seed`` (and torch version). ``rms_norm_eps`` defaults to 1e-5,
    the epsilon SliceGPT's fused norm uses (the fixture's model has 1e-6), so that slicing at
    sparsity 0 can reproduce the dense model exactly. ``out_dir`` is created if needed; files of
    the same names in it are replaced (weights and configs each atomically). Returns ``out_dir``.
    """
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    weight_dtype = resolve_dtype(dtype)
    config = llama_config_dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vocab_size=vocab_size,
        rope_theta=rope_theta,
        max_position_embeddings=max_position_embeddings,
        dtype=weight_dtype,
        tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=rms_norm_eps,
        initializer_range=initializer_range,
    )
    shapes = llama_tensor_shapes(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = (
        (
            name,
            random_tensor(
                name,
                shape,
                weight_dtype,
                generator,
                initializer_range=initializer_range,
                norm_weight_noise=norm_weight_noise,
            ),
        )
        for name, shape in shapes.items()
    )
    size = write_safetensors_streaming(out / "model.safetensors", shapes, weight_dtype, tensors)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", generation_config_dict())

    tokenizer = train_byte_level_bpe(embedded_text(), vocab_size)
    save_tokenizer(tokenizer, out)
    logger.info(
        "wrote a dense Llama (%d layers, hidden %d, %s, %.1f M parameters, %d-token tokenizer) to %s",
        num_layers,
        hidden_size,
        config["torch_dtype"],
        size / weight_dtype.itemsize / 1e6,
        tokenizer.get_vocab_size(),
        out,
    )
    return out


def make_dense_preset(out_dir: str | os.PathLike[str], preset: str, **overrides: Any) -> Path:
    """``make_dense_llama`` with the shape of ``PRESETS[preset]`` ("tiny", "small", "1b")."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return make_dense_llama(out_dir, **{**PRESETS[preset], **overrides})
