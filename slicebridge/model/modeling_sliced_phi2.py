"""A SliceGPT-sliced Phi-2 as a plain transformers causal LM (``model_type = "sliced_phi2"``).

Read ``sliced_decoder`` first for what SliceGPT leaves of any decoder, and for the blocks and
portability this module shares with the other families. Phi-2 runs attention and MLP in
parallel on one normalised stream, so a sliced Phi-2 block has one norm and one shortcut:

    x = rmsn(h)
    h = dense(attention(q/k/v_proj(x))) + fc2(gelu_new(fc1(x))) + h @ attn_shortcut_Q

with partial RoPE (only the first ``partial_rotary_factor * head_dim`` channels of each query
and key head rotate; default, linear and dynamic scaling, as transformers 4.41's Phi) and
grouped-query attention. Every linear has a bias. The LayerNorm weights and biases are fused
into q/k/v and fc1, the mean subtraction is baked into the embeddings, ``dense`` and ``fc2``,
and the final LayerNorm is fused into ``lm_head``, which therefore has a bias.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache

from .configuration_sliced_phi2 import SlicedPhi2Config
from .sliced_decoder import (
    CosSin,
    KeyValues,
    SlicedAttention,
    SlicedDecoderModel,
    SlicedForCausalLM,
    SlicedRMSNorm,
    SlicedRotaryEmbedding,
    shortcut,
)


class SlicedPhi2MLP(nn.Module):
    """fc1 -> gelu_new -> fc2, reading and writing the layer's sliced widths."""

    def __init__(self, config: SlicedPhi2Config, layer_idx: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.mlp_input_dimensions[layer_idx], config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.mlp_output_dimensions[layer_idx])
        self.activation_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class SlicedPhi2Attention(SlicedAttention):
    """Phi's attention: ``q/k/v_proj`` and ``dense``, all with biases; RoPE on the first ``rotary_dim`` channels."""

    output_projection = "dense"

    def __init__(self, config: SlicedPhi2Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx, input_bias=True, output_bias=True)


class SlicedPhi2DecoderLayer(nn.Module):
    """A parallel Phi-2 block: attention and MLP read one normalised stream; one shortcut matrix."""

    def __init__(self, config: SlicedPhi2Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = SlicedRMSNorm(config.hidden_size, config.fused_norm_eps)
        self.self_attn = SlicedPhi2Attention(config, layer_idx)
        self.mlp = SlicedPhi2MLP(config, layer_idx)
        self.attn_shortcut_Q = shortcut(
            config.attention_input_dimensions[layer_idx], config.mlp_output_dimensions[layer_idx]
        )

    def forward(
        self, hidden_states: torch.Tensor, rotary: CosSin, attention_mask: torch.Tensor | None, cache: Cache | None
    ) -> tuple[torch.Tensor, KeyValues]:
        normed = self.input_layernorm(hidden_states)
        attn_output, key_values = self.self_attn(normed, rotary, attention_mask, cache)
        mlp_output = self.mlp(normed)
        # Summed in the official CompressedPhiDecoderLayer's order (rounding matches in fp16).
        hidden_states = attn_output + mlp_output + torch.matmul(hidden_states, self.attn_shortcut_Q)
        return hidden_states, key_values


class SlicedPhi2Model(SlicedDecoderModel):
    """Embeddings, decoder layers and the final (weightless) norm, Phi's ``final_layernorm``; no LM head."""

    config_class = SlicedPhi2Config
    layer_class = SlicedPhi2DecoderLayer

    def make_rotary(self, config: SlicedPhi2Config) -> nn.Module:
        return SlicedRotaryEmbedding(config, config.rotary_dim)


class SlicedPhi2ForCausalLM(SlicedForCausalLM):
    """The sliced Phi-2 with its LM head (into which SliceGPT fused the final LayerNorm: it has a bias)."""

    config_class = SlicedPhi2Config
    model_class = SlicedPhi2Model
