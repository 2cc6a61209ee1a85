"""Phi-2's part of SliceGPT's rotate-and-slice (``slicing``): parallel blocks, as transformers
4.41's ``PhiDecoderLayer`` computes them:

    x = layernorm(h)
    h = h + dense(attention(q/k/v_proj(x))) + fc2(gelu_new(fc1(x)))         # partial RoPE on q and k

One LayerNorm per layer feeds both halves, so a layer is one residual block with one shortcut
(``attn_shortcut_Q``); every linear, ``lm_head`` included, has a bias. A LayerNorm family: the
official fusion centres the embeddings and bakes the mean into ``dense`` and ``fc2``. The RoPE
tables (the first ``partial_rotary_factor`` of each head rotates) come from the portable
model's ``sliced_decoder.SlicedRotaryEmbedding``; its config refuses what the official adapter cannot
slice (``qk_layernorm``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.activations import ACT2FN

from .configuration_sliced_phi2 import SlicedPhi2Config
from .families import BY_KEY
from .sliced_decoder import SlicedRotaryEmbedding
from .slicing import CausalSelfAttention, FamilySlicer, Linear


class Phi2Slicer(FamilySlicer):
    """How SliceGPT slices a Phi-2."""

    family = BY_KEY["phi2"]
    first_norm = "input_layernorm"
    second_norm = None
    final_norm = "model.final_layernorm"
    layer_order = (
        "attn_shortcut_Q",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.dense",
        "mlp.fc1",
        "mlp.fc2",
    )
    layer_norm = True

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        sliced = SlicedPhi2Config.from_base_and_slicing(config, {"parallel_blocks": True})
        self.norm_eps = float(sliced.layer_norm_eps)
        self.attend = CausalSelfAttention(
            sliced.num_attention_heads,
            sliced.num_key_value_heads,
            sliced.head_dim,
            SlicedRotaryEmbedding(sliced, sliced.rotary_dim),
        )
        self.activation = ACT2FN[sliced.hidden_act]

    def attention(self, normed: torch.Tensor, readers: list[Linear], writer: Linear) -> torch.Tensor:
        q_proj, k_proj, v_proj = readers
        return writer(self.attend(q_proj(normed), k_proj(normed), v_proj(normed)))

    def mlp(self, normed: torch.Tensor, readers: list[Linear], writer: Linear) -> torch.Tensor:
        (fc1,) = readers
        return writer(self.activation(fc1(normed)))


SLICER = Phi2Slicer
