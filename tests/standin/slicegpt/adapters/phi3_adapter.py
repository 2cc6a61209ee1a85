"""Test stand-in for the official ``slicegpt.adapters.phi3_adapter`` (microsoft/TransformerCompression).

Reproduces, against transformers 4.41:
- ``CompressedPhi3DecoderLayer``: a ``Phi3DecoderLayer`` subclass (sequential block) whose
  residuals are multiplied by ``attn_shortcut_Q`` / ``mlp_shortcut_Q`` before being added.
  Like the official it takes ``**kwargs`` and warns about a ``padding_mask`` among them. No
  instance attributes of its own, so official instances pickled with dill unpickle into it.
- ``Phi3LayerAdapter`` / ``Phi3ModelAdapter``: ``Phi3RMSNorm`` norms, the FUSED ``qkv_proj``
  as the one attention input and ``gate_up_proj`` as the one MLP input. Accepted only for
  model names starting with ``microsoft/Phi-3-mini-4k-instruct``; anything else is refused,
  so ``ModelAdapter.from_model`` raises NotImplementedError. The uninitialised model is
  ``Phi3ModelAdapter._from_uninitialized.<locals>.UninitializedPhi3ForCausalLM`` (see
  ``model_adapter``). ``post_init`` leaves the tokenizer's pad token as it is.
"""

import warnings

import torch
from torch import Tensor
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3ForCausalLM, Phi3RMSNorm

from slicegpt.model_adapter import LayerAdapter, ModelAdapter
from slicegpt.modules import layer_outputs, shortcut


class CompressedPhi3DecoderLayer(Phi3DecoderLayer):
    """Phi3DecoderLayer with residuals rotated (and sliced) by ``*_shortcut_Q``."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_value: tuple[Tensor] | None = None,
        output_attentions: bool | None = False,
        use_cache: bool | None = False,
        **kwargs,
    ) -> tuple:
        if "padding_mask" in kwargs:
            warnings.warn("`padding_mask` is deprecated: use `attention_mask`", stacklevel=2)
        attn_out, attn_weights, present = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_value=past_key_value,
            output_attentions=output_attentions,
            use_cache=use_cache,
        )
        hidden_states = shortcut(hidden_states, self.attn_shortcut_Q) + self.resid_attn_dropout(attn_out)
        mlp_out = self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = shortcut(hidden_states, self.mlp_shortcut_Q) + self.resid_mlp_dropout(mlp_out)
        return layer_outputs(hidden_states, attn_weights, present, output_attentions, use_cache)


class Phi3LayerAdapter(LayerAdapter):
    first_layernorm_path = "input_layernorm"
    second_layernorm_path = "post_attention_layernorm"
    attention_input_paths = ("self_attn.qkv_proj",)
    attention_output_path = "self_attn.o_proj"
    mlp_input_paths = ("mlp.gate_up_proj",)
    mlp_output_path = "mlp.down_proj"


class Phi3ModelAdapter(ModelAdapter):
    causal_lm_type = Phi3ForCausalLM
    original_layer_norm_type = Phi3RMSNorm
    layer_adapter_type = Phi3LayerAdapter
    compressed_layer_type = CompressedPhi3DecoderLayer
    layers_path = "model.layers"
    embedding_paths = ("model.embed_tokens",)
    pre_head_layernorm_path = "model.norm"

    @classmethod
    def accepts_name(cls, model_name: str) -> bool:
        return model_name.startswith("microsoft/Phi-3-mini-4k-instruct")
