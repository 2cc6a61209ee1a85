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

from transformers.activations import ACT2FN

from .configuration_sliced_phi2 import SlicedPhi2Config
from .families import BY_KEY
from .sliced_decoder import SlicedRotaryEmbedding
from .slicing import CausalSelfAttention, FamilySlicer


class Phi2Slicer(FamilySlicer):
    """How SliceGPT slices a Phi-2."""

    family = BY_KEY["phi2"]
    second_norm = None
    final_norm = "model.final_layernorm"
    layer_norm = True

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        sliced = SlicedPhi2Config.from_base_and_slicing(config, {"parallel_blocks": True})
        self.norm_eps = float(sliced.layer_norm_eps)
        self.attend = CausalSelfAttention.of_config(sliced, SlicedRotaryEmbedding(sliced, sliced.rotary_dim))
        self.activation = ACT2FN[sliced.hidden_act]


SLICER = Phi2Slicer
