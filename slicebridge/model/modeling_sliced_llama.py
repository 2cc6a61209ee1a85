"""A SliceGPT-sliced Llama (Llama-2, Llama-3) as a plain transformers causal LM (``model_type = "sliced_llama"``).

Read ``sliced_decoder`` first for what SliceGPT leaves of any decoder. A sliced Llama block:

    h = h @ attn_shortcut_Q + o_proj(attention(q/k/v_proj(rmsn(h))))      # RoPE on q and k
    h = h @ mlp_shortcut_Q + down_proj(silu(gate_proj(rmsn(h))) * up_proj(rmsn(h)))

with grouped-query attention and the RoPE variants of Llama-2/3 (default, linear, dynamic and
llama3 scaling). The RMSNorm weights are fused into q/k/v and gate/up; ``lm_head`` has no bias.

Portable by design: imports only torch, transformers and its siblings ``sliced_decoder`` and
``configuration_sliced*``, and is copied verbatim into exported model directories as remote
code; runs under transformers 4.41 (SliceGPT's pin) and 5.x.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache

from .configuration_sliced_llama import SlicedLlamaConfig
from .sliced_decoder import (
    SlicedDecoderModel,
    SlicedForCausalLM,
    SlicedRMSNorm,
    SlicedRotaryEmbedding,
    apply_rotary_pos_emb,
    attend,
    shortcut,
    split_heads,
    tied_weights_keys,
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


class SlicedLlamaAttention(nn.Module):
    """Multi-head / grouped-query self-attention with sliced input and output widths."""

    def __init__(self, config: SlicedLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        in_width = config.attention_input_dimensions[layer_idx]
        out_width = config.attention_output_dimensions[layer_idx]
        bias = config.attention_bias
        self.q_proj = nn.Linear(in_width, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(in_width, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(in_width, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, out_width, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Returns the attention output and this layer's full (cached + new) keys and values."""
        query = split_heads(self.q_proj(hidden_states), self.num_heads, self.head_dim)
        key = split_heads(self.k_proj(hidden_states), self.num_key_value_heads, self.head_dim)
        value = split_heads(self.v_proj(hidden_states), self.num_key_value_heads, self.head_dim)
        query, key = apply_rotary_pos_emb(query, key, *rotary)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        return self.o_proj(attend(query, key, value, attention_mask, self.scaling)), (key, value)


class SlicedLlamaDecoderLayer(nn.Module):
    """A Llama block whose residual connections go through the shortcut matrices."""

    def __init__(self, config: SlicedLlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = SlicedRMSNorm(config.hidden_size, config.fused_norm_eps)
        self.self_attn = SlicedLlamaAttention(config, layer_idx)
        self.attn_shortcut_Q = shortcut(
            config.attention_input_dimensions[layer_idx], config.attention_output_dimensions[layer_idx]
        )
        self.post_attention_layernorm = SlicedRMSNorm(config.hidden_size, config.fused_norm_eps)
        self.mlp = SlicedLlamaMLP(config, layer_idx)
        self.mlp_shortcut_Q = shortcut(config.mlp_input_dimensions[layer_idx], config.mlp_output_dimensions[layer_idx])

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        attn_output, key_values = self.self_attn(self.input_layernorm(hidden_states), rotary, attention_mask, cache)
        hidden_states = torch.matmul(hidden_states, self.attn_shortcut_Q) + attn_output

        mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = torch.matmul(hidden_states, self.mlp_shortcut_Q) + mlp_output
        return hidden_states, key_values


class SlicedLlamaModel(SlicedDecoderModel):
    """Embeddings, decoder layers and the final (weightless) norm; no LM head."""

    config_class = SlicedLlamaConfig
    _no_split_modules = ["SlicedLlamaDecoderLayer"]
    layer_class = SlicedLlamaDecoderLayer

    def __init__(self, config: SlicedLlamaConfig) -> None:
        super().__init__(config)
        self.post_init()

    def make_rotary(self, config: SlicedLlamaConfig) -> nn.Module:
        return SlicedRotaryEmbedding(config, config.head_dim)


class SlicedLlamaForCausalLM(SlicedForCausalLM):
    """The sliced Llama with its LM head (into which SliceGPT fused the final norm's weight)."""

    config_class = SlicedLlamaConfig
    _no_split_modules = ["SlicedLlamaDecoderLayer"]
    _tied_weights_keys = tied_weights_keys("model.embed_tokens.weight")
    model_class = SlicedLlamaModel
