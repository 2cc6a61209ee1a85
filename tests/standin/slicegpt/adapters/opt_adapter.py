"""Test stand-in for the official ``slicegpt.adapters.opt_adapter`` (microsoft/TransformerCompression).

Reproduces, against transformers 4.41:
- ``CompressedOPTDecoderLayer``: an ``OPTDecoderLayer`` subclass whose residuals are multiplied
  by ``attn_shortcut_Q`` / ``mlp_shortcut_Q`` before being added. Like the official, the MLP
  half runs on the tokens flattened to rows (OPT's own habit) and is viewed back to
  ``(..., fc2.out_features)``, and only pre-norm OPTs are served: ``do_layer_norm_before``
  False raises ``NotImplementedError``. No instance attributes of its own, so official
  instances pickled with dill unpickle into it.
- ``OPTLayerAdapter`` / ``OPTModelAdapter``: the norms are ``LayerNorm`` (so the fusion gives
  ``lm_head`` a bias, see ``hf_utils.fuse_modules``); the embeddings are the token AND the
  learned position tables, both sliced; the compressed layer is built from the config alone
  (OPT layers take no index). Accepted only for model names starting with ``facebook/opt``;
  anything else returns None, so ``ModelAdapter.from_model`` raises NotImplementedError. The
  uninitialised model is a LOCAL class ``UninitializedOPTForCausalLM`` defined inside
  ``OPTModelAdapter._from_uninitialized`` (the official qualname; dill pickles it by value),
  built in the default dtype and then cast with ``.to(dtype)``. No ``post_init``: OPT
  tokenizers have a pad token.
Config and tokenizer are only ever read from local files (no Hugging Face downloads).
"""

import torch
from torch import Tensor
from torch.nn.functional import dropout
from transformers.models.opt.modeling_opt import OPTConfig, OPTDecoderLayer, OPTForCausalLM

from slicegpt.model_adapter import LayerAdapter, ModelAdapter
from slicegpt.modules import shortcut

SUPPORTED_PREFIX = "facebook/opt"


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
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (attn_weights,)
        if use_cache:
            outputs += (present,)
        return outputs


class OPTLayerAdapter(LayerAdapter):
    def get_first_layernorm(self):
        return self.layer.self_attn_layer_norm

    def get_second_layernorm(self):
        return self.layer.final_layer_norm

    def get_attention_inputs(self):
        attn = self.layer.self_attn
        return [attn.q_proj, attn.k_proj, attn.v_proj]

    def get_attention_output(self):
        return self.layer.self_attn.out_proj

    def get_mlp_inputs(self):
        return [self.layer.fc1]

    def get_mlp_output(self):
        return self.layer.fc2


class OPTModelAdapter(ModelAdapter):
    parallel_blocks = False
    should_bake_mean_into_linear = True
    original_layer_type = OPTDecoderLayer
    original_layer_norm_type = torch.nn.LayerNorm
    layer_adapter_type = OPTLayerAdapter
    compressed_layer_type = CompressedOPTDecoderLayer
    config_type = OPTConfig

    def convert_layer_to_compressed(self, layer, layer_idx):
        new_layer = CompressedOPTDecoderLayer(self.config).to(self.config.torch_dtype)
        new_layer.load_state_dict(layer.state_dict(), strict=True)
        return new_layer

    def get_layers(self):
        return [OPTLayerAdapter(layer) for layer in self.model.model.decoder.layers]

    def get_embeddings(self):
        decoder = self.model.model.decoder
        return [decoder.embed_tokens, decoder.embed_positions]

    def get_pre_head_layernorm(self):
        return self.model.model.decoder.final_layer_norm

    def get_lm_head(self):
        return self.model.lm_head

    @classmethod
    def _from_pretrained(cls, model_name, model_path, *, dtype=torch.float16, local_files_only=False, token=None):
        if not model_name.startswith(SUPPORTED_PREFIX):
            return None
        model = OPTForCausalLM.from_pretrained(model_path, torch_dtype=dtype, local_files_only=True)
        model.config.torch_dtype = dtype
        return OPTModelAdapter(model)

    @classmethod
    def _from_uninitialized(cls, model_name, model_path, *, dtype=torch.float16, local_files_only=False, token=None):
        if not model_name.startswith(SUPPORTED_PREFIX):
            return None

        class UninitializedOPTForCausalLM(OPTForCausalLM):
            def _init_weights(self, _) -> None:
                pass  # weights come from the sliced state dict

        config = OPTConfig.from_pretrained(model_path, torch_dtype=dtype, local_files_only=True)
        return OPTModelAdapter(UninitializedOPTForCausalLM(config).to(dtype=dtype))
