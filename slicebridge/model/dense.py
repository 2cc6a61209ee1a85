"""Dense models with random weights, made locally: the input that ``slicing`` slices.

One model family per official SliceGPT adapter: Llama (``LlamaForCausalLM``), OPT
(``OPTForCausalLM``), Phi-2 (``PhiForCausalLM``) and Phi-3 (``Phi3ForCausalLM``).
``make_dense_model(out_dir, family, ...)`` writes a directory that ``AutoModelForCausalLM`` /
``AutoTokenizer`` load under transformers 4.41 (SliceGPT's pin) and 5.x alike, without any
download:

- ``config.json`` / ``generation_config.json`` in the classic (4.x) dialect both versions read
  (``rope_theta``, ``rope_scaling``, ``partial_rotary_factor`` and ``torch_dtype`` at the top
  level), built by ``dense_config_dict``: the fields every family shares, the architecture and
  model type from ``families``, then the family's own (``CONFIG_FIELDS``);
- ``model.safetensors`` with random weights: linear and embedding weights ~ N(0, 0.02), norm
  weights ``1 + noise * N(0, 1)`` and biases (OPT's and Phi-2's linears and LayerNorms)
  ``bias_noise * N(0, 1)``, not 1 and 0, so SliceGPT's norm fusion has work to do and a wrong
  fusion shows. The tensor names and shapes are taken from the installed transformers' model
  class (built on the meta device), and each tensor is drawn directly in the target dtype and
  streamed to the file one at a time, so a 1B-parameter fp16 model never exists in memory,
  let alone in fp32;
- a byte-level BPE tokenizer trained in-process (``tokenizers``) on ``embedded_text()``, a few
  KB of English kept in ``sample_text``, wrapped as a ``PreTrainedTokenizerFast`` (bos ``<s>``, eos
  ``</s>``, unk ``<unk>``) and saved with ``save_pretrained``; the saved files are then put in
  the form tokenizers 0.19 / transformers 4.41 also read (merges as ``"a b"`` strings,
  ``tokenizer_class`` ``PreTrainedTokenizerFast``).

``PRESETS_BY_FAMILY`` names the shapes used by the demo, tests and benchmarks: "tiny" is the
shape of the family's official fixture (``shared/fixtures/slicegpt-<family>-tiny``), "small"
~10M parameters, and for Llama "1b", TinyLlama-like ~1.1B. ``PRESETS`` are Llama's.
``make_dense_preset`` builds one of them; ``make_dense_llama`` is Llama's "tiny" with any
argument overridden.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from slicebridge.dtypes import dtype_name

from .atomic import atomic_file
from .families import BY_KEY
from .sample_text import embedded_text

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
# Token ids of the special tokens: the trainer puts them first, in this order (Llama's ids).
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

# The shape every family's "small" preset has but for its MLP width (~10M parameters).
_SMALL = dict(hidden_size=256, num_layers=8, num_heads=8, vocab_size=8000, max_position_embeddings=512)
# What the official OPT, Phi-2 and Phi-3 fixtures' shapes share (slicegpt-<family>-tiny).
_FIXTURE_TINY = dict(num_layers=2, vocab_size=900, max_position_embeddings=256)

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
    "small": dict(_SMALL, intermediate_size=688, num_kv_heads=4, rope_theta=500000.0),
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

PRESETS_BY_FAMILY: dict[str, dict[str, dict[str, Any]]] = {
    "llama": PRESETS,
    "opt": {
        # slicegpt-opt-tiny's shape (tied embeddings, ffn 384): ~0.34M parameters.
        "tiny": dict(_FIXTURE_TINY, hidden_size=96, intermediate_size=384, num_heads=4),
        # ~8.5M parameters.
        "small": dict(_SMALL, intermediate_size=1024),
    },
    "phi2": {
        # slicegpt-phi2-tiny's shape (5 heads of 32, half of each rotating): ~0.91M parameters.
        "tiny": dict(_FIXTURE_TINY, hidden_size=160, intermediate_size=640, num_heads=5, partial_rotary_factor=0.5),
        # ~10.4M parameters.
        "small": dict(_SMALL, intermediate_size=1024, partial_rotary_factor=0.5),
    },
    "phi3": {
        # slicegpt-phi3-tiny's shape (fused qkv_proj and gate_up_proj): ~0.40M parameters.
        "tiny": dict(_FIXTURE_TINY, hidden_size=96, intermediate_size=256, num_heads=4),
        # ~10.4M parameters.
        "small": dict(_SMALL, intermediate_size=688),
    },
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


def _check_heads(hidden_size: int, num_heads: int, num_kv_heads: int) -> None:
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must divide into num_heads ({num_heads}) heads, "
            f"and num_heads into num_kv_heads ({num_kv_heads}) groups"
        )


def _llama_fields(
    config: dict[str, Any],
    *,
    intermediate_size: int,
    initializer_range: float,
    num_kv_heads: int,
    rope_theta: float,
    rms_norm_eps: float = 1e-5,
) -> dict[str, Any]:
    """LlamaConfig's own fields. ``rope_theta`` stands at the top level: a 5.x ``save_pretrained``
    would write ``rope_parameters``, which 4.41 ignores (it would silently fall back to 10000)."""
    return {
        "attention_bias": False,
        "hidden_act": "silu",
        "initializer_range": initializer_range,
        "intermediate_size": intermediate_size,
        "mlp_bias": False,
        "num_key_value_heads": num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": float(rope_theta),
    }


def _opt_fields(config: dict[str, Any], *, intermediate_size: int, initializer_range: float) -> dict[str, Any]:
    """OPTConfig's own fields, pre-LayerNorm (as OPT-125m and 1.3b up: the layout SliceGPT
    slices); ``intermediate_size`` is written as OPT's ``ffn_dim``. The pad token is the bos
    token, as in the official fixture (OPT pads with id 1)."""
    return {
        "_remove_final_layer_norm": False,
        "activation_function": "relu",
        "do_layer_norm_before": True,
        "dropout": 0.0,
        "enable_bias": True,
        "ffn_dim": intermediate_size,
        "init_std": initializer_range,
        "layer_norm_elementwise_affine": True,
        "layerdrop": 0.0,
        "pad_token_id": BOS_ID,
        "word_embed_proj_dim": config["hidden_size"],
    }


def _phi2_fields(
    config: dict[str, Any],
    *,
    intermediate_size: int,
    initializer_range: float,
    partial_rotary_factor: float = 0.4,
    rope_theta: float = 10000.0,
    layer_norm_eps: float = 1e-5,
) -> dict[str, Any]:
    """PhiConfig's own fields (Phi-2: parallel attention and MLP after one LayerNorm, biases
    everywhere, partial RoPE; ``partial_rotary_factor`` 0.4 as microsoft/phi-2)."""
    return {
        "embd_pdrop": 0.0,
        "hidden_act": "gelu_new",
        "initializer_range": initializer_range,
        "intermediate_size": intermediate_size,
        "layer_norm_eps": layer_norm_eps,
        "num_key_value_heads": config["num_attention_heads"],
        "partial_rotary_factor": partial_rotary_factor,
        "qk_layernorm": False,
        "resid_pdrop": 0.0,
        "rope_scaling": None,
        "rope_theta": float(rope_theta),
    }


def _phi3_fields(
    config: dict[str, Any],
    *,
    intermediate_size: int,
    initializer_range: float,
    num_kv_heads: int | None = None,
    rope_theta: float = 10000.0,
    sliding_window: int | None = None,
    rms_norm_eps: float = 1e-5,
) -> dict[str, Any]:
    """Phi3Config's own fields (Phi-3-mini-4k: fused ``qkv_proj`` and ``gate_up_proj``, RMSNorm, no
    biases, plain RoPE). ``sliding_window`` defaults to one less than the context
    (Phi-3-mini-4k: 2047 of 4096); the pad token is the eos token, as in the fixture."""
    max_position_embeddings = config["max_position_embeddings"]
    return {
        "embd_pdrop": 0.0,
        "hidden_act": "silu",
        "initializer_range": initializer_range,
        "intermediate_size": intermediate_size,
        "num_key_value_heads": num_kv_heads or config["num_attention_heads"],
        "original_max_position_embeddings": max_position_embeddings,
        "pad_token_id": EOS_ID,
        "resid_pdrop": 0.0,
        "rms_norm_eps": rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": float(rope_theta),
        "sliding_window": sliding_window or max_position_embeddings - 1,
    }


# Each family's own config fields (keys as in ``families``), and the families whose transformers
# config ties the head to the token embeddings when it does not say (what the maker writes and
# what ``slicing`` reads a config without ``tie_word_embeddings`` as).
CONFIG_FIELDS: dict[str, Callable[..., dict[str, Any]]] = {
    "llama": _llama_fields,
    "opt": _opt_fields,
    "phi2": _phi2_fields,
    "phi3": _phi3_fields,
}
TIED_BY_DEFAULT = frozenset({"opt"})


def dense_config_dict(
    family: str,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    vocab_size: int,
    max_position_embeddings: int,
    dtype: torch.dtype,
    tie_word_embeddings: bool | None = None,
    **family_options: Any,
) -> dict[str, Any]:
    """A dense ``config.json`` dict of ``family`` in the classic (4.x) dialect, which 5.x also reads.

    The fields every family writes alike come from these arguments (the architecture and model
    type from ``families``); the family's own from ``CONFIG_FIELDS[family]``, which takes
    ``family_options``: ``intermediate_size`` and ``initializer_range`` always, then the
    family's (``num_kv_heads``, ``rope_theta``, norm epsilons ...). ``tie_word_embeddings``
    defaults to what the family's transformers config does (only OPT ties).
    """
    own_fields = CONFIG_FIELDS.get(family)
    if own_fields is None:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(CONFIG_FIELDS)}")
    import transformers

    row = BY_KEY[family]
    config: dict[str, Any] = {
        "architectures": [row.architectures[0]],
        "attention_dropout": 0.0,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "hidden_size": hidden_size,
        "max_position_embeddings": max_position_embeddings,
        "model_type": row.model_types[0],
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "tie_word_embeddings": family in TIED_BY_DEFAULT if tie_word_embeddings is None else tie_word_embeddings,
        "torch_dtype": dtype_name(dtype),
        "transformers_version": transformers.__version__,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    config.update(own_fields(config, **family_options))
    _check_heads(hidden_size, num_heads, config.get("num_key_value_heads", num_heads))
    return config


def generation_config_dict(config: dict[str, Any]) -> dict[str, Any]:
    """What ``GenerationConfig.from_model_config`` gives for ``config``."""
    import transformers

    fields = {
        "_from_model_config": True,
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "transformers_version": transformers.__version__,
    }
    if config.get("pad_token_id") is not None:
        fields["pad_token_id"] = config["pad_token_id"]
    return fields


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically (as ``save_pretrained`` formats it)."""
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def dense_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of the installed transformers' model class (``architectures``)
    for ``config``, in its order (built on the meta device: no memory, no init). Tied heads are
    left out, as ``save_pretrained`` leaves them out."""
    import transformers

    skipped = ("architectures", "transformers_version", "model_type")
    settings = {key: value for key, value in config.items() if key not in skipped}
    model_config = transformers.AutoConfig.for_model(config["model_type"], **settings)
    with torch.device("meta"):
        model = getattr(transformers, config["architectures"][0])(model_config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if model_config.tie_word_embeddings:
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
    bias_noise: float,
) -> torch.Tensor:
    """One random weight, drawn directly in ``dtype``: norm weights ``1 + noise * N(0, 1)``, biases
    ``bias_noise * N(0, 1)``, everything else ``N(0, initializer_range)`` (transformers' init)."""
    if name.endswith("norm.weight"):
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return (1.0 + norm_weight_noise * noise).to(dtype)
    if name.endswith(".bias"):
        return (bias_noise * torch.randn(shape, generator=generator, dtype=torch.float32)).to(dtype)
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


def make_dense_model(
    out_dir: str | os.PathLike[str],
    family: str = "llama",
    *,
    dtype: str | torch.dtype = "float16",
    seed: int = 0,
    norm_weight_noise: float = 0.1,
    bias_noise: float = 0.1,
    initializer_range: float = 0.02,
    **shape: Any,
) -> Path:
    """Write a random-weight dense model of ``family`` ("llama", "opt", "phi2", "phi3") and a
    trained byte-level BPE tokenizer to ``out_dir``.

    ``shape`` are ``dense_config_dict``'s arguments (see ``PRESETS_BY_FAMILY`` for complete sets).
    Deterministic for a given ``seed`` (and torch version). The norm epsilons default to 1e-5,
    the epsilon SliceGPT's fused norm uses, so that slicing at sparsity 0 can reproduce the
    dense model exactly. ``out_dir`` is created if needed; files of the same names in it are
    replaced (weights and configs each atomically). Returns ``out_dir``.
    """
    weight_dtype = resolve_dtype(dtype)
    config = dense_config_dict(family, dtype=weight_dtype, initializer_range=initializer_range, **shape)
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    shapes = dense_tensor_shapes(config)
    generator = torch.Generator().manual_seed(seed)
    noises = dict(initializer_range=initializer_range, norm_weight_noise=norm_weight_noise, bias_noise=bias_noise)
    tensors = ((name, random_tensor(name, size, weight_dtype, generator, **noises)) for name, size in shapes.items())
    written = write_safetensors_streaming(out / "model.safetensors", shapes, weight_dtype, tensors)
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", generation_config_dict(config))

    tokenizer = train_byte_level_bpe(embedded_text(), config["vocab_size"])
    save_tokenizer(tokenizer, out)
    logger.info(
        "wrote a dense %s (%d layers, hidden %d, %s, %.1f M parameters, %d-token tokenizer) to %s",
        config["architectures"][0],
        config["num_hidden_layers"],
        config["hidden_size"],
        config["torch_dtype"],
        written / weight_dtype.itemsize / 1e6,
        tokenizer.get_vocab_size(),
        out,
    )
    return out


def make_dense_preset(out_dir: str | os.PathLike[str], preset: str, family: str = "llama", **overrides: Any) -> Path:
    """``make_dense_model`` with the shape of ``PRESETS_BY_FAMILY[family][preset]``: "tiny" or "small"
    (Llama also "1b"); ``overrides`` change any of its arguments."""
    presets = PRESETS_BY_FAMILY.get(family)
    if presets is None:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(PRESETS_BY_FAMILY)}")
    if preset not in presets:
        raise ValueError(f"unknown {family} preset {preset!r}; choose one of {', '.join(presets)}")
    return make_dense_model(out_dir, family, **{**presets[preset], **overrides})


def make_dense_llama(out_dir: str | os.PathLike[str], **overrides: Any) -> Path:
    """A random-weight ``LlamaForCausalLM`` of the Llama fixture's shape but for ``overrides``
    (``make_dense_preset(out_dir, "tiny", "llama", ...)``); unlike the fixture's model (1e-6),
    its ``rms_norm_eps`` is 1e-5 unless overridden."""
    return make_dense_preset(out_dir, "tiny", "llama", **overrides)
