"""A SliceGPT-sliced OPT as a plain transformers causal LM (``model_type = "sliced_opt"``).

Read ``sliced_decoder`` first for what SliceGPT leaves of any decoder, and for the blocks and
portability this module shares with the other families. A sliced OPT block (pre-LayerNorm OPT:
125m, 1.3b and up):

    h = h @ attn_shortcut_Q + out_proj(attention(q/k/v_proj(rmsn(h))))
    h = h @ mlp_shortcut_Q + fc2(relu(fc1(rmsn(h))))

OPT's LayerNorms became RMSN: their weights and biases are fused into q/k/v_proj and fc1
(which therefore have biases even when the base had ``enable_bias`` False: the official
``fuse_ln_linear`` creates them), and their mean subtraction is baked into both embeddings and
into out_proj and fc2. The final LayerNorm is fused into ``lm_head``, which gains its bias.
Positions are OPT's learned embeddings (a table offset by 2 rows), indexed by counting the
non-padding tokens of the attention mask; there is no rotary embedding.

The layout matches the official checkpoint's names: ``model.decoder.embed_tokens``,
``model.decoder.embed_positions``, ``model.decoder.layers.N.{self_attn.*_proj, fc1, fc2,
attn_shortcut_Q, mlp_shortcut_Q}`` and ``lm_head.{weight,bias}``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPast

from .configuration_sliced_opt import SlicedOPTConfig
from .sliced_decoder import (
    SlicedAttention,
    SlicedDecoderLayer,
    SlicedDecoderModel,
    SlicedForCausalLM,
    SlicedPreTrainedModel,
    tied_weights_keys,
)

# OPT's learned position table starts 2 rows in (a fairseq leftover): position p is row p + 2.
OPT_POSITION_OFFSET = 2


def opt_positions(
    attention_mask: torch.Tensor | None, past_len: int, seq_len: int, device: torch.device
) -> torch.Tensor:
    """Positions of the new tokens, as OPT counts them: over the non-padding tokens of a 2D mask
    (``cumsum(mask) * mask - 1``, so padding gets -1), else ``past_len .. past_len + seq_len - 1``."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.arange(past_len, past_len + seq_len, device=device).unsqueeze(0)
    mask = attention_mask.long().to(device)
    return (mask.cumsum(-1) * mask - 1)[:, -seq_len:]


class SlicedOPTAttention(SlicedAttention):
    """OPT's attention: ``q/k/v_proj`` carry the fused norm's bias, ``out_proj`` a bias only when ``enable_bias``.

    OPT scales ``q_proj``'s output by ``head_dim ** -0.5``; SDPA's ``scale=`` is the same product.
    """

    output_projection = "out_proj"

    def __init__(self, config: SlicedOPTConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx, input_bias=True, output_bias=config.enable_bias)


class SlicedOPTDecoderLayer(SlicedDecoderLayer):
    """An OPT block whose residual connections go through the shortcut matrices.

    The MLP is inline, as in OPT (``fc1`` / ``fc2`` are the layer's own modules); ``fc1``
    carries the fused norm's bias, ``fc2`` a bias only when ``enable_bias``. The two weightless
    norms take the shared layer's names (``input_layernorm``, ``post_attention_layernorm``), not
    OPT's: they hold no tensor, so no checkpoint names them.
    """

    attention_class = SlicedOPTAttention

    def add_mlp(self, config: SlicedOPTConfig, layer_idx: int) -> None:
        self.fc1 = nn.Linear(config.mlp_input_dimensions[layer_idx], config.ffn_dim, bias=True)
        self.activation_fn = ACT2FN[config.activation_function]
        self.fc2 = nn.Linear(config.ffn_dim, config.mlp_output_dimensions[layer_idx], bias=config.enable_bias)

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class SlicedOPTDecoder(SlicedDecoderModel):
    """Token and learned position embeddings, decoder layers and the final (weightless) norm."""

    config_class = SlicedOPTConfig
    layer_class = SlicedOPTDecoderLayer

    def make_position_embeddings(self, config: SlicedOPTConfig) -> nn.Embedding:
        return nn.Embedding(config.max_position_embeddings + OPT_POSITION_OFFSET, config.embedding_dimension)

    def add_positions(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, past_len: int
    ) -> torch.Tensor:
        """Add the learned position embeddings (positions from the mask, so left padding does not shift them).

        Explicit ``position_ids`` are not used: OPT derives positions from the attention mask,
        and transformers 5.x's ``generate`` passes ids computed from that same mask.
        """
        positions = opt_positions(attention_mask, past_len, hidden_states.shape[1], hidden_states.device)
        return hidden_states + self.embed_positions(positions + OPT_POSITION_OFFSET)


class SlicedOPTModel(SlicedPreTrainedModel):
    """OPT's wrapper around the decoder (so the tensor names start ``model.decoder.``); no LM head."""

    config_class = SlicedOPTConfig

    def __init__(self, config: SlicedOPTConfig) -> None:
        super().__init__(config)
        self.decoder = SlicedOPTDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.decoder.embed_tokens = value

    def get_decoder(self) -> SlicedOPTDecoder:
        return self.decoder

    def forward(self, *args: Any, **kwargs: Any) -> BaseModelOutputWithPast | tuple:
        """The decoder's forward (same arguments, same outputs)."""
        return self.decoder(*args, **kwargs)


class SlicedOPTForCausalLM(SlicedForCausalLM):
    """The sliced OPT with its LM head (into which SliceGPT fused the final LayerNorm: weight and bias)."""

    config_class = SlicedOPTConfig
    _tied_weights_keys = tied_weights_keys("model.decoder.embed_tokens.weight")
    model_class = SlicedOPTModel

    def get_decoder(self) -> SlicedOPTDecoder:
        return self.model.decoder

    def set_decoder(self, decoder: SlicedOPTDecoder) -> None:
        self.model.decoder = decoder
