"""Test stand-in for the official ``slicegpt.adapters.opt_adapter`` (microsoft/TransformerCompression).

Reproduces, against transformers 4.41:
- ``CompressedOPTDecoderLayer``: an ``OPTDecoderLayer`` subclass whose residuals are multiplied
  by ``attn_shortcut_Q`` / ``mlp_shortcut_Q`` before being added. Like the official, the MLP
  half runs on the tokens flattened to rows (OPT's own habit) and is viewed back to
  ``(..., fc2.out_features)``, and only pre-norm OPTs are served: ``do_layer_norm_before``
  False raises ``NotImplementedError``. No instance attributes of its own, so official
  instances pickled with dill unpickle into it.
- ``OPTLayerAdapter`` / ``OPTModelAdapter``: the norms are ``LayerNorm`` (so the fusion gives
  ``lm_head`` a bias and bakes the mean into the attention and MLP outputs, see
  ``layernorm_fusion``); the embeddings are the token AND the
  learned position tables, both sliced; the compressed layer is built from the config alone
  (OPT layers take no index). Accepted only for model names starting with ``facebook/opt``;
  anything else is refused, so ``ModelAdapter.from_model`` raises NotImplementedError. The
  uninitialised model is ``OPTModelAdapter._from_uninitialized.<locals>.UninitializedOPTForCausalLM``
  (see ``model_adapter``). ``post_init`` leaves the tokenizer as it is: OPT tokenizers have a pad token.
"""

import torch
from torch import Tensor
from torch.nn.functional import dropout
from transformers.models.opt.modeling_opt import OPTDecoderLayer, OPTForCausalLM

from slicegpt.model_adapter import LayerAdapter, ModelAdapter
from slicegpt.modules import layer_outputs, shortcut


class CompressedOPTDecoderLayer(OPTDecoderLayer):
    """Pre-norm OPTDecoderLayer with residuals rotated (and sliced) by ``*_shortcut_Q``."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        layer_head_mask: Tensor | None = None,
        past_key_value: tuple[Tensor] | None = None,
        output_attentions: bool | None = False,
        use_cache: bool | None = False,
    ) -> tuple:
        if not self.do_layer_norm_before:
            raise NotImplementedError("Layer norm after attention is not implemented yet!")
        attn_out, attn_weights, present = self.self_attn(
            hidden_states=self.self_attn_layer_norm(hidden_states),
            past_key_value=past_key_value,
            attention_mask=attention_mask,
            layer_head_mask=layer_head_mask,
            output_attentions=output_attentions,
        )
        attn_out = dropout(attn_out, p=self.dropout, training=self.training)
        hidden_states = shortcut(hidden_states, self.attn_shortcut_Q) + attn_out

        out_shape = (*hidden_states.shape[:-1], self.fc2.out_features)
        rows = hidden_states.reshape(-1, hidden_states.size(-1))
        mlp_out = self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(rows))))
        mlp_out = dropout(mlp_out, p=self.dropout, training=self.training)
        hidden_states = (shortcut(rows, self.mlp_shortcut_Q) + mlp_out).view(out_shape)
        return layer_outputs(hidden_states, attn_weights, present, output_attentions, use_cache)


class OPTLayerAdapter(LayerAdapter):
    first_layernorm_path = "self_attn_layer_norm"
    second_layernorm_path = "final_layer_norm"
    attention_input_paths = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attention_output_path = "self_attn.out_proj"
    mlp_input_paths = ("fc1",)
    mlp_output_path = "fc2"


class OPTModelAdapter(ModelAdapter):
    causal_lm_type = OPTForCausalLM
    original_layer_norm_type = torch.nn.LayerNorm
    layer_adapter_type = OPTLayerAdapter
    compressed_layer_type = CompressedOPTDecoderLayer
    should_bake_mean_into_linear = True
    layers_path = "model.decoder.layers"
    embedding_paths = ("model.decoder.embed_tokens", "model.decoder.embed_positions")
    pre_head_layernorm_path = "model.decoder.final_layer_norm"

    @classmethod
    def accepts_name(cls, model_name: str) -> bool:
        return model_name.startswith("facebook/opt")

    def _new_compressed_layer(self, layer_idx: int | None) -> CompressedOPTDecoderLayer:
        return self.compressed_layer_type(self.config)  # OPT layers take no index
