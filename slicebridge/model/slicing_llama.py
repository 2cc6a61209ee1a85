"""Llama's part of SliceGPT's rotate-and-slice (``slicing``): RMSNorms, grouped-query attention
with RoPE, and the gated MLP, as transformers 4.41's ``LlamaDecoderLayer`` computes them:

    h = h + o_proj(attention(q/k/v_proj(rmsnorm(h))))                       # RoPE on q and k
    h = h + down_proj(silu(gate_proj(rmsnorm(h))) * up_proj(rmsnorm(h)))

The RoPE tables come from the portable model's ``sliced_decoder.SlicedRotaryEmbedding`` (default, linear,
dynamic and llama3 scaling). Llamas with biases (``attention_bias`` / ``mlp_bias``) are refused:
the official adapter's fusion never meets them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.activations import ACT2FN

from .configuration_sliced_llama import SlicedLlamaConfig
from .families import BY_KEY
from .sliced_decoder import SlicedRotaryEmbedding
from .slicing import CausalSelfAttention, FamilySlicer, Linear


class LlamaSlicer(FamilySlicer):
    """How SliceGPT slices a Llama-2 / Llama-3."""

    family = BY_KEY["llama"]

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ValueError("slice_llama supports Llamas without biases (attention_bias/mlp_bias false) only")
        sliced = SlicedLlamaConfig.from_base_and_slicing(config, {})
        self.norm_eps = float(config.get("rms_norm_eps", 1e-6))
        self.attend = CausalSelfAttention.of_config(sliced, SlicedRotaryEmbedding(sliced, sliced.head_dim))
        self.activation = ACT2FN[sliced.hidden_act]

    def default_model_name(self, directory_name: str) -> str:
        """``meta-llama/Meta-Llama-3-<directory_name>`` (the official Llama adapter accepts it)."""
        return f"meta-llama/Meta-Llama-3-{directory_name}"

    def mlp(self, normed: torch.Tensor, readers: list[Linear], writer: Linear) -> torch.Tensor:
        gate_proj, up_proj = readers
        return writer(self.activation(gate_proj(normed)) * up_proj(normed))


SLICER = LlamaSlicer
