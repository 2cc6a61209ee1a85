"""Configuration of a SliceGPT-sliced Llama (``model_type = "sliced_llama"``).

The ORIGINAL Llama fields (``hidden_size`` is the dense width: the fused RMS norms still
divide by it) plus the per-layer sliced widths of ``configuration_sliced.SlicedConfig``.

Portable by design: this file imports only the stdlib, transformers and its sibling
``configuration_sliced``, and is copied verbatim into exported model directories as remote
code. It works with transformers 4.41 (SliceGPT's pin) and with transformers 5.x.

Note on RoPE fields: transformers 5.x turned ``config.rope_scaling`` into a deprecated alias of
``rope_parameters``. To behave the same under both versions this config stores the scaling
dict under ``rotary_scaling`` (and ``rope_theta`` on its own); ``rope_scaling=`` and
``rope_parameters=`` are still accepted as constructor arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .configuration_sliced import (
    SLICEGPT_FUSED_NORM_EPS,
    SlicedConfig,
    normalize_rope_scaling,
    rope_theta_of,
    widths_from_slicing,
)

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class SlicedLlamaConfig(SlicedConfig):
    """Llama hyper-parameters plus SliceGPT's per-layer sliced widths (see ``SlicedConfig``)."""

    model_type = "sliced_llama"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        fused_norm_eps: float = SLICEGPT_FUSED_NORM_EPS,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,
        rotary_scaling: Mapping[str, Any] | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
        embedding_dimension: int | None = None,
        attention_input_dimensions: list[int] | Mapping[Any, int] | None = None,
        attention_output_dimensions: list[int] | Mapping[Any, int] | None = None,
        mlp_input_dimensions: list[int] | Mapping[Any, int] | None = None,
        mlp_output_dimensions: list[int] | Mapping[Any, int] | None = None,
        lm_head_dimension: int | None = None,
        do_slice_head: bool = False,
        sparsity: float | None = None,
        round_interval: int | None = None,
        **kwargs: Any,
    ) -> None:
        # Legacy / 5.x spellings of the RoPE settings (see the module docstring).
        legacy_rope_scaling = kwargs.pop("rope_scaling", None)
        rope_parameters = kwargs.pop("rope_parameters", None)
        self.rope_theta = rope_theta_of({"rope_theta": rope_theta, "rope_parameters": rope_parameters})
        self.rotary_scaling = normalize_rope_scaling(
            rotary_scaling or legacy_rope_scaling or rope_parameters, SUPPORTED_ROPE_TYPES, "Llama"
        )

        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.num_key_value_heads = int(num_key_value_heads or num_attention_heads)
        self.head_dim = int(head_dim or hidden_size // num_attention_heads)
        self.hidden_act = hidden_act
        self.max_position_embeddings = int(max_position_embeddings)
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.fused_norm_eps = fused_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias

        self.init_widths(
            hidden_size=self.hidden_size,
            num_layers=self.num_hidden_layers,
            embedding_dimension=embedding_dimension,
            attention_input_dimensions=attention_input_dimensions,
            attention_output_dimensions=attention_output_dimensions,
            mlp_input_dimensions=mlp_input_dimensions,
            mlp_output_dimensions=mlp_output_dimensions,
            lm_head_dimension=lm_head_dimension,
            do_slice_head=do_slice_head,
            sparsity=sparsity,
            round_interval=round_interval,
        )

        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @classmethod
    def from_base_and_slicing(
        cls,
        base_config: Mapping[str, Any],
        slicing_config: Mapping[str, Any],
        **overrides: Any,
    ) -> SlicedLlamaConfig:
        """Build the config from a base LlamaConfig dict (its config.json) and a SliceGPT SlicingConfig dict.

        The sliced model never ties its embeddings: SliceGPT fuses the final norm into a copy of
        ``lm_head`` and slices both matrices independently, so ``tie_word_embeddings`` is False
        whatever the base model said (the base value is kept in ``base_tie_word_embeddings``).
        ``overrides`` (e.g. ``sparsity=0.25, round_interval=8``) win over both dicts.
        """
        num_layers = int(base_config["num_hidden_layers"])
        hidden = int(base_config["hidden_size"])
        if slicing_config.get("parallel_blocks"):
            raise ValueError("parallel-block slicing (Phi-2 style) is not a Llama layout")
        fields: dict[str, Any] = {
            "vocab_size": base_config["vocab_size"],
            "hidden_size": hidden,
            "intermediate_size": base_config["intermediate_size"],
            "num_hidden_layers": num_layers,
            "num_attention_heads": base_config["num_attention_heads"],
            "num_key_value_heads": base_config.get("num_key_value_heads"),
            "head_dim": base_config.get("head_dim"),
            "hidden_act": base_config.get("hidden_act", "silu"),
            "max_position_embeddings": base_config.get("max_position_embeddings", 2048),
            "initializer_range": base_config.get("initializer_range", 0.02),
            "rms_norm_eps": base_config.get("rms_norm_eps", 1e-6),
            "rope_theta": rope_theta_of(base_config),
            "rotary_scaling": base_config.get("rope_scaling") or base_config.get("rope_parameters"),
            "attention_bias": base_config.get("attention_bias", False),
            "mlp_bias": base_config.get("mlp_bias", False),
            "bos_token_id": base_config.get("bos_token_id"),
            "eos_token_id": base_config.get("eos_token_id"),
            "pad_token_id": base_config.get("pad_token_id"),
            "tie_word_embeddings": False,
            "base_tie_word_embeddings": bool(base_config.get("tie_word_embeddings", False)),
            **widths_from_slicing(slicing_config, num_layers, hidden, parallel_blocks=False),
            "do_slice_head": bool(slicing_config.get("do_slice_head", False)),
        }
        fields.update(overrides)
        return cls(**fields)
