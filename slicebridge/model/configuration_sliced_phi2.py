"""Configuration of a SliceGPT-sliced Phi-2 (``model_type = "sliced_phi2"``).

The ORIGINAL Phi fields (``hidden_size`` is the dense width: the fused norms still divide by it)
plus the per-layer sliced widths of ``configuration_sliced.SlicedConfig``. Phi-2 runs attention
and MLP in parallel on one normalised stream (``parallel_blocks``), so per layer the MLP reads
what the attention reads and the attention writes what the MLP writes. Its LayerNorms had
biases, so the sliced ``lm_head`` has one too (``lm_head_bias``).

Portable by design: this file imports only the stdlib, transformers and its sibling
``configuration_sliced``, and is copied verbatim into exported model directories as remote
code. It works with transformers 4.41 (SliceGPT's pin) and with transformers 5.x.

Note on RoPE fields: as in the Llama config, the scaling dict is stored under
``rotary_scaling`` and ``rope_theta`` / ``partial_rotary_factor`` on their own, so the config
reads the same under both versions; ``rope_scaling=`` (4.x) and ``rope_parameters=`` (5.x,
which also carries ``rope_theta`` and ``partial_rotary_factor``) are accepted as arguments.
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

# The RoPE variants transformers 4.41's Phi implements.
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic")
DEFAULT_PARTIAL_ROTARY_FACTOR = 0.5  # PhiConfig's default; Phi-2 itself uses 0.4


def _partial_rotary_factor(value: float | None, rope_parameters: Mapping[str, Any] | None) -> float:
    """The fraction of each head that rotates: given, else inside 5.x ``rope_parameters``, else Phi's default."""
    if value is None and isinstance(rope_parameters, Mapping):
        value = rope_parameters.get("partial_rotary_factor")
    return float(value if value is not None else DEFAULT_PARTIAL_ROTARY_FACTOR)


class SlicedPhi2Config(SlicedConfig):
    """Phi-2 hyper-parameters plus SliceGPT's per-layer sliced widths (see ``SlicedConfig``)."""

    model_type = "sliced_phi2"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    parallel_blocks = True

    def __init__(
        self,
        vocab_size: int = 51200,
        hidden_size: int = 2560,
        intermediate_size: int = 10240,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "gelu_new",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        fused_norm_eps: float = SLICEGPT_FUSED_NORM_EPS,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,
        rotary_scaling: Mapping[str, Any] | None = None,
        partial_rotary_factor: float | None = None,
        qk_layernorm: bool = False,
        attention_dropout: float = 0.0,
        lm_head_bias: bool = True,
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
        if qk_layernorm:
            raise ValueError(
                "qk_layernorm=True is not supported: SliceGPT's fusion would also replace the per-head q/k "
                "LayerNorms by its RMS norm, so the sliced model would not compute what the dense model did"
            )
        # Legacy / 5.x spellings of the RoPE settings (see the module docstring).
        legacy_rope_scaling = kwargs.pop("rope_scaling", None)
        rope_parameters = kwargs.pop("rope_parameters", None)
        self.rope_theta = rope_theta_of({"rope_theta": rope_theta, "rope_parameters": rope_parameters})
        self.partial_rotary_factor = _partial_rotary_factor(partial_rotary_factor, rope_parameters)
        scaling = rotary_scaling or legacy_rope_scaling or rope_parameters
        if scaling:
            scaling = {key: value for key, value in dict(scaling).items() if key != "partial_rotary_factor"}
        self.rotary_scaling = normalize_rope_scaling(scaling, SUPPORTED_ROPE_TYPES, "Phi-2")

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
        self.layer_norm_eps = layer_norm_eps
        self.fused_norm_eps = fused_norm_eps
        self.use_cache = use_cache
        self.qk_layernorm = False
        self.attention_dropout = attention_dropout
        self.lm_head_bias = bool(lm_head_bias)

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

    @property
    def rotary_dim(self) -> int:
        """Channels of each query/key head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.partial_rotary_factor * self.head_dim)

    @classmethod
    def from_base_and_slicing(
        cls,
        base_config: Mapping[str, Any],
        slicing_config: Mapping[str, Any],
        **overrides: Any,
    ) -> SlicedPhi2Config:
        """Build the config from a base PhiConfig dict (its config.json) and a SliceGPT SlicingConfig dict.

        The sliced model never ties its embeddings (SliceGPT fuses the final LayerNorm into a copy
        of ``lm_head``, which gains a bias); the base value is kept in ``base_tie_word_embeddings``.
        The official Phi-2 adapter sets ``pad_token_id`` to the EOS id (Phi-2 has no pad token), and
        so does this config; the other token ids are the base's. ``overrides`` (e.g.
        ``sparsity=0.3, round_interval=8``) win over both dicts.
        """
        num_layers = int(base_config["num_hidden_layers"])
        hidden = int(base_config["hidden_size"])
        eos_token_id = base_config.get("eos_token_id")
        pad_token_id = eos_token_id[0] if isinstance(eos_token_id, list) and eos_token_id else eos_token_id
        if pad_token_id is None:
            pad_token_id = base_config.get("pad_token_id")
        rope_parameters = base_config.get("rope_parameters")
        fields: dict[str, Any] = {
            "vocab_size": base_config["vocab_size"],
            "hidden_size": hidden,
            "intermediate_size": base_config["intermediate_size"],
            "num_hidden_layers": num_layers,
            "num_attention_heads": base_config["num_attention_heads"],
            "num_key_value_heads": base_config.get("num_key_value_heads"),
            "head_dim": base_config.get("head_dim"),
            "hidden_act": base_config.get("hidden_act", "gelu_new"),
            "max_position_embeddings": base_config.get("max_position_embeddings", 2048),
            "initializer_range": base_config.get("initializer_range", 0.02),
            "layer_norm_eps": base_config.get("layer_norm_eps", 1e-5),
            "rope_theta": rope_theta_of(base_config),
            "rotary_scaling": base_config.get("rope_scaling") or rope_parameters,
            "partial_rotary_factor": _partial_rotary_factor(base_config.get("partial_rotary_factor"), rope_parameters),
            "qk_layernorm": bool(base_config.get("qk_layernorm", False)),
            "bos_token_id": base_config.get("bos_token_id"),
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "tie_word_embeddings": False,
            "base_tie_word_embeddings": bool(base_config.get("tie_word_embeddings", False)),
            **widths_from_slicing(slicing_config, num_layers, hidden, parallel_blocks=True),
            "do_slice_head": bool(slicing_config.get("do_slice_head", False)),
        }
        fields.update(overrides)
        return cls(**fields)
