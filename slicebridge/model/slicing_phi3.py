"""Phi-3's part of SliceGPT's rotate-and-slice (``slicing``): Llama-like blocks with fused
projections, as transformers 4.41's ``Phi3DecoderLayer`` computes them:

    q, k, v = qkv_proj(rmsnorm(h)).split(...)
    h = h + o_proj(attention(q, k, v))                                      # RoPE, sliding window
    gate, up = gate_up_proj(rmsnorm(h)).chunk(2)
    h = h + down_proj(up * silu(gate))

An RMSNorm family without biases. The RoPE tables and the sliding window come from the
portable model (``SlicedPhi3RotaryEmbedding`` and ``SlicedPhi3Config``), which reproduce what
4.41 computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.activations import ACT2FN

from .configuration_sliced_phi3 import SlicedPhi3Config
from .families import BY_KEY
from .modeling_sliced_phi3 import SlicedPhi3RotaryEmbedding
from .slicing import CausalSelfAttention, FamilySlicer, Linear


class Phi3Slicer(FamilySlicer):
    """How SliceGPT slices a Phi-3(-mini-4k)."""

    family = BY_KEY["phi3"]
    official_linear_order = ("self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj")

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        sliced = SlicedPhi3Config.from_base_and_slicing(config, {})
        self.norm_eps = float(sliced.rms_norm_eps)
        self.attend = CausalSelfAttention.of_config(sliced, SlicedPhi3RotaryEmbedding(sliced), sliced.sliding_window)
        head_dim = sliced.head_dim
        self.qkv_split = [sliced.num_attention_heads * head_dim] + 2 * [sliced.num_key_value_heads * head_dim]
        self.activation = ACT2FN[sliced.hidden_act]

    def attention(self, normed: torch.Tensor, readers: list[Linear], writer: Linear) -> torch.Tensor:
        (qkv_proj,) = readers
        return writer(self.attend(*qkv_proj(normed).split(self.qkv_split, dim=-1)))

    def mlp(self, normed: torch.Tensor, readers: list[Linear], writer: Linear) -> torch.Tensor:
        (gate_up_proj,) = readers
        gate, up = gate_up_proj(normed).chunk(2, dim=-1)
        return writer(up * self.activation(gate))


SLICER = Phi3Slicer
