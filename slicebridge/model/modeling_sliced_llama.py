"""A SliceGPT-sliced Llama (Llama-2, Llama-3) as a plain transformers causal LM (``model_type = "sliced_llama"``).

Read ``sliced_decoder`` first for what SliceGPT leaves of any decoder, and for the blocks and
portability this module shares with the other families. A sliced Llama block:

    h = h @ attn_shortcut_Q + o_proj(attention(q/k/v_proj(rmsn(h))))      # RoPE on q and k
    h = h @ mlp_shortcut_Q + down_proj(silu(gate_proj(rmsn(h))) * up_proj(rmsn(h)))

with grouped-query attention and the RoPE variants of Llama-2/3 (default, linear, dynamic and
llama3 scaling). The RMSNorm weights are fused into q/k/v and gate/up; ``lm_head`` has no bias.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from .configuration_sliced_llama import SlicedLlamaConfig
from .sliced_decoder import (
    SlicedAttention,
    SlicedDecoderLayer,
    SlicedDecoderModel,
    SlicedForCausalLM,
    SlicedRotaryEmbedding,
)


class SlicedLlamaMLP(nn.Module):
    """SwiGLU MLP reading ``mlp_input_dimensions[i]`` and writing ``mlp_output_dimensions[i]``."""

    def __init__(self, config: SlicedLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        in_width = config.mlp_input_dimensions[layer_idx]
        out_width = config.mlp_output_dimensions[layer_idx]
        self.gate_proj = nn.Linear(in_width, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(in_width, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, out_width, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class SlicedLlamaAttention(SlicedAttention):
    """Llama's attention: ``q/k/v_proj`` and ``o_proj``, with biases when ``attention_bias`` says so."""

    def __init__(self, config: SlicedLlamaConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx, input_bias=config.attention_bias, output_bias=config.attention_bias)


class SlicedLlamaDecoderLayer(SlicedDecoderLayer):
    """A Llama block whose residual connections go through the shortcut matrices."""

    attention_class = SlicedLlamaAttention
    mlp_class = SlicedLlamaMLP


class SlicedLlamaModel(SlicedDecoderModel):
    """Embeddings, decoder layers and the final (weightless) norm; no LM head."""

    config_class = SlicedLlamaConfig
    layer_class = SlicedLlamaDecoderLayer

    def make_rotary(self, config: SlicedLlamaConfig) -> nn.Module:
        return SlicedRotaryEmbedding(config, config.head_dim)


class SlicedLlamaForCausalLM(SlicedForCausalLM):
    """The sliced Llama with its LM head (into which SliceGPT fused the final norm's weight)."""

    config_class = SlicedLlamaConfig
    model_class = SlicedLlamaModel
