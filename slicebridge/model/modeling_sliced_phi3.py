"""A SliceGPT-sliced Phi-3 as a plain transformers causal LM (``model_type = "sliced_phi3"``).

Read ``sliced_decoder`` first for what SliceGPT leaves of any decoder, and for the blocks and
portability this module shares with the other families. A sliced Phi-3 block:

    h = h @ attn_shortcut_Q + o_proj(attention(qkv_proj(rmsn(h))))      # RoPE on q and k
    h = h @ mlp_shortcut_Q + down_proj(up * silu(gate))                 # gate, up = gate_up_proj(rmsn(h))

``qkv_proj`` holds the query rows, then the key rows, then the value rows (grouped-query
attention through ``num_key_value_heads``); ``gate_up_proj`` the gate rows, then the up rows.
The RMSNorm weights are fused into those two; ``lm_head`` has no bias.

What transformers 4.41's Phi-3 (the one SliceGPT runs) computes, and this module matches:

- Sliding window: its eager and SDPA paths build the causal mask with the window, letting a
  query see ``sliding_window`` predecessors and itself (the config stores that count; see
  ``configuration_sliced_phi3``). Under transformers 5.x ``generate`` gives a sliding-window
  cache that keeps only the keys inside the window, so the attention reads the mask's last
  columns, those of the keys it holds.
- RoPE scaling ("su", its later name "longrope", and "yarn"): per-channel ``short_factor`` or
  ``long_factor`` divide the frequencies, the long ones once the forward pass reaches a
  position past ``original_max_position_embeddings``; cos and sin are multiplied by an
  attention factor that grows with ``max_position_embeddings / original_max_position_embeddings``.
  As in 4.41 the choice is made per forward pass, from the largest position in it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from .configuration_sliced_phi3 import SlicedPhi3Config
from .sliced_decoder import (
    CosSin,
    SlicedAttention,
    SlicedDecoderLayer,
    SlicedDecoderModel,
    SlicedForCausalLM,
    rotary_cos_sin,
)


def phi3_attention_factor(scaling: Mapping[str, Any], max_positions: int, original_max_positions: int) -> float:
    """The factor scaled Phi-3 RoPE multiplies cos and sin by (1.0 once the context is not extended).

    "su" and "yarn" as transformers 4.41 computes them from the context extension ratio;
    "longrope" as "su", except that an explicit ``attention_factor`` or ``factor`` wins (as in 5.x).
    """
    if scaling["rope_type"] == "longrope" and scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    ratio = max_positions / original_max_positions
    if scaling["rope_type"] == "longrope" and scaling.get("factor") is not None:
        ratio = float(scaling["factor"])
    if ratio <= 1.0:
        return 1.0
    if scaling["rope_type"] == "yarn":
        return 0.1 * math.log(ratio) + 1.0
    return math.sqrt(1 + math.log(ratio) / math.log(original_max_positions))


class SlicedPhi3RotaryEmbedding(nn.Module):
    """Computes RoPE cos/sin for given positions, with Phi-3's su / longrope / yarn scaling; holds
    no buffers (so meta-device construction and every transformers version's loading path need no
    special care)."""

    def __init__(self, config: SlicedPhi3Config) -> None:
        super().__init__()
        self.config = config
        scaling = config.rotary_scaling
        self.attention_factor = (
            1.0
            if scaling is None
            else phi3_attention_factor(scaling, config.max_position_embeddings, config.original_max_position_embeddings)
        )

    def inverse_frequencies(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """``1 / (factor * theta ** (2i / head_dim))``, with the short or long per-channel factors
        (by ``seq_len``) when the RoPE is scaled, in the order of operations 4.41 uses."""
        config = self.config
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64, device=device).to(torch.float32)
        wavelengths = config.rope_theta ** (exponents / config.head_dim)
        scaling = config.rotary_scaling
        if scaling is not None:
            long = seq_len > config.original_max_position_embeddings
            factors = scaling["long_factor"] if long else scaling["short_factor"]
            wavelengths = torch.tensor(factors, dtype=torch.float32, device=device) * wavelengths
        return 1.0 / wavelengths

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> CosSin:
        inv_freq = self.inverse_frequencies(int(position_ids.max()) + 1, hidden_states.device)
        return rotary_cos_sin(inv_freq, position_ids, hidden_states, scale=self.attention_factor)


class SlicedPhi3MLP(nn.Module):
    """Gated MLP with a fused ``gate_up_proj`` reading ``mlp_input_dimensions[i]`` and a ``down_proj``
    writing ``mlp_output_dimensions[i]``."""

    def __init__(self, config: SlicedPhi3Config, layer_idx: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.mlp_input_dimensions[layer_idx], 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.mlp_output_dimensions[layer_idx], bias=False)
        self.activation_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))


class SlicedPhi3Attention(SlicedAttention):
    """Phi-3's attention: one fused ``qkv_proj`` (query rows, then key rows, then value rows) and ``o_proj``,
    without biases."""

    def __init__(self, config: SlicedPhi3Config, layer_idx: int) -> None:
        super().__init__(config, layer_idx, input_bias=False, output_bias=False)

    def make_input_projections(self, in_width: int, bias: bool) -> None:
        self.qkv_proj = nn.Linear(in_width, sum(self.split_sizes), bias=bias)

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.qkv_proj(hidden_states).split(self.split_sizes, dim=-1)


class SlicedPhi3DecoderLayer(SlicedDecoderLayer):
    """A Phi-3 block whose residual connections go through the shortcut matrices."""

    attention_class = SlicedPhi3Attention
    mlp_class = SlicedPhi3MLP


class SlicedPhi3Model(SlicedDecoderModel):
    """Embeddings, decoder layers and the final (weightless) norm; no LM head."""

    config_class = SlicedPhi3Config
    layer_class = SlicedPhi3DecoderLayer

    def make_rotary(self, config: SlicedPhi3Config) -> nn.Module:
        return SlicedPhi3RotaryEmbedding(config)


class SlicedPhi3ForCausalLM(SlicedForCausalLM):
    """The sliced Phi-3 with its LM head (into which SliceGPT fused the final norm's weight)."""

    config_class = SlicedPhi3Config
    model_class = SlicedPhi3Model
