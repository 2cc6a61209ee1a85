"""Configuration of a SliceGPT-sliced Llama (``model_type = "sliced_llama"``).

The ORIGINAL Llama fields (``hidden_size`` is the dense width: the fused RMS norms still
divide by it) plus the per-layer sliced widths; what the sliced families share, RoPE
included, is in ``configuration_sliced`` (``SlicedConfig`` and ``SlicedRotaryConfig``).

Portable by design: this file imports only the stdlib, transformers and its sibling
``configuration_sliced``, and is copied verbatim into exported model directories as remote
code. It works with transformers 4.41 (SliceGPT's pin) and with transformers 5.x.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .configuration_sliced import SlicedRotaryConfig


class SlicedLlamaConfig(SlicedRotaryConfig):
    """Llama hyper-parameters plus SliceGPT's per-layer sliced widths (see ``SlicedConfig``)."""

    model_type = "sliced_llama"
    family_name = "Llama"
    dense_defaults = {  # LlamaConfig's
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
    }
    supported_rope_types = ("default", "linear", "dynamic", "llama3")

    def __init__(
        self,
        rms_norm_eps: float = 1e-6,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        **kwargs: Any,
    ) -> None:
        """The Llama fields; ``kwargs`` are the shared ones (``SlicedRotaryConfig``, ``SlicedConfig``)."""
        self.rms_norm_eps = rms_norm_eps
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        shared = {**self.dense_defaults, **kwargs}
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **shared)

    @classmethod
    def fields_from_base(cls, base_config: Mapping[str, Any]) -> dict[str, Any]:
        """The shared fields of a dense LlamaConfig dict plus the Llama ones."""
        return {
            **super().fields_from_base(base_config),
            "head_dim": base_config.get("head_dim"),
            "rms_norm_eps": base_config.get("rms_norm_eps", 1e-6),
            "attention_bias": base_config.get("attention_bias", False),
            "mlp_bias": base_config.get("mlp_bias", False),
        }
