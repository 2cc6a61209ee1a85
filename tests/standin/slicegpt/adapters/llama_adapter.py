"""Test stand-in for the official ``slicegpt.adapters.llama_adapter`` (microsoft/TransformerCompression).

Reproduces, against transformers 4.41:
- ``CompressedLlamaDecoderLayer``: a ``LlamaDecoderLayer`` subclass whose residuals are
  multiplied by ``attn_shortcut_Q`` / ``mlp_shortcut_Q`` (parameters, or None for a plain
  residual) before being added, so a sliced block maps width d_in to d_out. It adds no
  instance attributes of its own, so official instances pickled with dill unpickle into it.
- ``LlamaLayerAdapter`` / ``LlamaModelAdapter``: ``LlamaRMSNorm`` norms, attention inputs
  q/k/v, MLP inputs gate/up. Accepted only for model names starting with ``meta-llama/Llama-2``
  or ``meta-llama/Meta-Llama-3`` (the official prefix test; anything else, e.g. a local path,
  is refused and ``ModelAdapter.from_model`` raises NotImplementedError). The uninitialised
  model is ``LlamaModelAdapter._from_uninitialized.<locals>.UninitializedLlamaForCausalLM``
  (see ``model_adapter``).
- ``pad_with_eos``: Llama-2 and Llama-3 tokenizers have no pad token.
"""

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaRMSNorm

from slicegpt.model_adapter import LayerAdapter, ModelAdapter
from slicegpt.modules import layer_outputs, shortcut


class CompressedLlamaDecoderLayer(LlamaDecoderLayer):
    """LlamaDecoderLayer with residuals rotated (and sliced) by ``*_shortcut_Q``."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_value=None,
        output_attentions: bool | None = False,
        use_cache: bool | None = False,
        **kwargs,
    ) -> tuple:
        attn_out, attn_weights, present = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_value=past_key_value,
            output_attentions=output_attentions,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = shortcut(hidden_states, self.attn_shortcut_Q) + attn_out
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = shortcut(hidden_states, self.mlp_shortcut_Q) + mlp_out
        return layer_outputs(hidden_states, attn_weights, present, output_attentions, use_cache)


class LlamaLayerAdapter(LayerAdapter):
    first_layernorm_path = "input_layernorm"
    second_layernorm_path = "post_attention_layernorm"
    attention_input_paths = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attention_output_path = "self_attn.o_proj"
    mlp_input_paths = ("mlp.gate_proj", "mlp.up_proj")
    mlp_output_path = "mlp.down_proj"


class LlamaModelAdapter(ModelAdapter):
    causal_lm_type = LlamaForCausalLM
    original_layer_norm_type = LlamaRMSNorm
    layer_adapter_type = LlamaLayerAdapter
    compressed_layer_type = CompressedLlamaDecoderLayer
    pad_with_eos = True
    layers_path = "model.layers"
    embedding_paths = ("model.embed_tokens",)
    pre_head_layernorm_path = "model.norm"

    @classmethod
    def accepts_name(cls, model_name: str) -> bool:
        return model_name.startswith(("meta-llama/Llama-2", "meta-llama/Meta-Llama-3"))
