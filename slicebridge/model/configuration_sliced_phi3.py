"""Configuration of a SliceGPT-sliced Phi-3 (``model_type = "sliced_phi3"``).

The ORIGINAL Phi-3 fields (``hidden_size`` is the dense width: the fused RMS norms still
divide by it) plus the per-layer sliced widths of ``configuration_sliced.SlicedConfig``.

Portable by design: this file imports only the stdlib, transformers and its sibling
``configuration_sliced``, and is copied verbatim into exported model directories as remote
code. It works with transformers 4.41 (SliceGPT's pin) and with transformers 5.x.

Two fields are stored differently from a Phi3Config, so that they mean the same under both
transformers versions:

- RoPE: the scaling dict lives under ``rotary_scaling`` (5.x turned ``rope_scaling`` into an
  alias of ``rope_parameters``) and ``rope_theta`` on its own; ``rope_scaling=`` and
  ``rope_parameters=`` are accepted as constructor arguments. Phi-3's scaled variants are
  "su" and "yarn" (what transformers 4.41 implements) and "longrope", the later name of "su"
  (same maths; an explicit ``factor`` / ``attention_factor`` is honoured as 5.x does).
- ``sliding_window`` counts the positions a query sees, itself included (what the shared mask
  and 5.x's sliding-window cache read). transformers 4.41's Phi-3, which SliceGPT runs, lets a
  query see its ``sliding_window`` predecessors as well as itself, so ``from_base_and_slicing``
  stores the base value plus one; the base value is kept in ``base_sliding_window``.
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

SUPPORTED_ROPE_TYPES = ("default", "su", "yarn", "longrope")


def check_rope_factors(scaling: Mapping[str, Any] | None, head_dim: int) -> None:
    """Refuse a scaled RoPE dict without per-channel ``short_factor`` / ``long_factor`` lists of ``head_dim // 2``."""
    if scaling is None:
        return
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if not isinstance(factors, (list, tuple)) or len(factors) != head_dim // 2:
            raise ValueError(
                f"Phi-3 RoPE scaling {scaling['rope_type']!r} needs {key} as a list of {head_dim // 2} numbers "
                f"(head_dim {head_dim} / 2), got {factors!r}"
            )


class SlicedPhi3Config(SlicedConfig):
    """Phi-3 hyper-parameters plus SliceGPT's per-layer sliced widths (see ``SlicedConfig``)."""

    model_type = "sliced_phi3"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32064,
        hidden_size: int = 3072,
        intermediate_size: int = 8192,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        original_max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        fused_norm_eps: float = SLICEGPT_FUSED_NORM_EPS,
        use_cache: bool = True,
        pad_token_id: int | None = 32000,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 32000,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,
        rotary_scaling: Mapping[str, Any] | None = None,
        sliding_window: int | None = None,
        attention_dropout: float = 0.0,
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
            rotary_scaling or legacy_rope_scaling or rope_parameters, SUPPORTED_ROPE_TYPES, "Phi-3"
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
        self.original_max_position_embeddings = int(original_max_position_embeddings)
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.fused_norm_eps = fused_norm_eps
        self.use_cache = use_cache
        self.sliding_window = int(sliding_window) if sliding_window is not None else None
        self.attention_dropout = attention_dropout
        check_rope_factors(self.rotary_scaling, self.head_dim)

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
    ) -> SlicedPhi3Config:
        """Build the config from a base Phi3Config dict (its config.json) and a SliceGPT SlicingConfig dict.

        ``tie_word_embeddings`` is False whatever the base model said (SliceGPT fuses the final
        norm into ``lm_head`` and slices it apart from the embeddings; the base value is kept in
        ``base_tie_word_embeddings``). ``sliding_window`` becomes the base value plus one (see the
        module docstring). ``overrides`` (e.g. ``sparsity=0.2, round_interval=8``) win over both dicts.
        """
        num_layers = int(base_config["num_hidden_layers"])
        hidden = int(base_config["hidden_size"])
        if slicing_config.get("parallel_blocks"):
            raise ValueError("parallel-block slicing (Phi-2 style) is not a Phi-3 layout")
        rope_scaling = base_config.get("rope_scaling") or base_config.get("rope_parameters") or {}
        base_window = base_config.get("sliding_window")
        fields: dict[str, Any] = {
            "vocab_size": base_config["vocab_size"],
            "hidden_size": hidden,
            "intermediate_size": base_config["intermediate_size"],
            "num_hidden_layers": num_layers,
            "num_attention_heads": base_config["num_attention_heads"],
            "num_key_value_heads": base_config.get("num_key_value_heads"),
            "hidden_act": base_config.get("hidden_act", "silu"),
            "max_position_embeddings": base_config.get("max_position_embeddings", 4096),
            "original_max_position_embeddings": base_config.get("original_max_position_embeddings")
            or rope_scaling.get("original_max_position_embeddings")
            or 4096,
            "initializer_range": base_config.get("initializer_range", 0.02),
            "rms_norm_eps": base_config.get("rms_norm_eps", 1e-5),
            "rope_theta": rope_theta_of(base_config),
            "rotary_scaling": rope_scaling or None,
            "sliding_window": int(base_window) + 1 if base_window is not None else None,
            "base_sliding_window": base_window,
            "attention_dropout": base_config.get("attention_dropout", 0.0),
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
