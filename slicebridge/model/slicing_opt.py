"""OPT's part of SliceGPT's rotate-and-slice (``slicing``): pre-LayerNorm blocks with biases and
learned positions, as transformers 4.41's ``OPTDecoderLayer`` computes them:

    h = embed_tokens(ids) + embed_positions(2 + position)
    h = h + out_proj(attention(q/k/v_proj(layernorm(h))))                   # no RoPE
    h = h + fc2(relu(fc1(layernorm(h))))

A LayerNorm family: the official fusion centres both embedding matrices and bakes the mean
into ``out_proj`` and ``fc2``; the final LayerNorm goes into ``lm_head`` (tied to the token
embeddings by default, so it is untied, and it gains a bias). OPT-350m's layout (LayerNorms
after the blocks, ``project_in`` / ``project_out``) is refused, as the official adapter cannot
slice it (``configuration_sliced_opt.opt_layout_refusal``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.activations import ACT2FN

from .configuration_sliced_opt import opt_layout_refusal
from .families import BY_KEY
from .modeling_sliced_opt import OPT_POSITION_OFFSET
from .slicing import CausalSelfAttention, FamilySlicer

# OPT's LayerNorms are torch's defaults: the config has no epsilon.
OPT_LAYER_NORM_EPS = 1e-5


class OPTSlicer(FamilySlicer):
    """How SliceGPT slices a (pre-LayerNorm) OPT."""

    family = BY_KEY["opt"]
    first_norm = "self_attn_layer_norm"
    second_norm = "final_layer_norm"
    final_norm = "model.decoder.final_layer_norm"
    official_linear_order = (
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.q_proj",
        "self_attn.out_proj",
        "fc1",
        "fc2",
    )
    layer_norm = True

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__(config)
        refusal = opt_layout_refusal(config)
        if refusal is not None:
            raise ValueError(refusal)
        self.norm_eps = OPT_LAYER_NORM_EPS
        heads = int(config["num_attention_heads"])
        self.attend = CausalSelfAttention(heads, heads, int(config["hidden_size"]) // heads)
        self.activation = ACT2FN[config.get("activation_function", "relu")]

    def layer_input(self, embeddings: list[torch.Tensor], token_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings plus the learned positions of a full (unpadded) sequence."""
        tokens, positions = embeddings
        return tokens[token_ids] + positions[OPT_POSITION_OFFSET + torch.arange(token_ids.shape[1])]


SLICER = OPTSlicer
