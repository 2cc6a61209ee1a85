"""Test stand-in for the official ``slicegpt.adapters.phi3_adapter`` (microsoft/TransformerCompression).

Reproduces, against transformers 4.41:
- ``CompressedPhi3DecoderLayer``: a ``Phi3DecoderLayer`` subclass (sequential block) whose
  residuals are multiplied by ``attn_shortcut_Q`` / ``mlp_shortcut_Q`` before being added.
  Like the official it takes ``**kwargs`` and warns about a ``padding_mask`` among them. No
  instance attributes of its own, so official instances pickled with dill unpickle into it.
- ``Phi3LayerAdapter`` / ``Phi3ModelAdapter``: ``Phi3RMSNorm`` norms, the FUSED ``qkv_proj``
  as the one attention input and ``gate_up_proj`` as the one MLP input. Accepted only for
  model names starting with ``microsoft/Phi-3-mini-4k-instruct``; anything else returns None,
  so ``ModelAdapter.from_model`` raises NotImplementedError. The uninitialised model is a
  LOCAL class ``UninitializedPhi3ForCausalLM`` defined inside
  ``Phi3ModelAdapter._from_uninitialized`` (the official qualname; dill pickles it by value),
  built in the default dtype and then cast with ``.to(dtype)``. No ``post_init``: the
  tokenizer's pad token is left as it is.
Config and tokenizer are only ever read from local files (no Hugging Face downloads).
"""

import warnings

import torch
from torch import Tensor
from transformers.models.phi3.modeling_phi3 import Phi3Config, Phi3DecoderLayer, Phi3ForCausalLM, Phi3RMSNorm

from slicegpt.model_adapter import LayerAdapter, ModelAdapter
from slicegpt.modules import shortcut

SUPPORTED_PREFIX = "microsoft/Phi-3-mini-4k-instruct"


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
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (attn_weights,)
        if use_cache:
            outputs += (present,)
        return outputs


class Phi3LayerAdapter(LayerAdapter):
    def get_first_layernorm(self):
        return self.layer.input_layernorm

    def get_second_layernorm(self):
        return self.layer.post_attention_layernorm

    def get_attention_inputs(self):
        return [self.layer.self_attn.qkv_proj]

    def get_attention_output(self):
        return self.layer.self_attn.o_proj

    def get_mlp_inputs(self):
        return [self.layer.mlp.gate_up_proj]

    def get_mlp_output(self):
        return self.layer.mlp.down_proj


class Phi3ModelAdapter(ModelAdapter):
    parallel_blocks = False
    should_bake_mean_into_linear = False
    original_layer_type = Phi3DecoderLayer
    original_layer_norm_type = Phi3RMSNorm
    layer_adapter_type = Phi3LayerAdapter
    compressed_layer_type = CompressedPhi3DecoderLayer
    config_type = Phi3Config

    def get_layers(self):
        return [Phi3LayerAdapter(layer) for layer in self.model.model.layers]

    def get_embeddings(self):
        return [self.model.model.embed_tokens]

    def get_pre_head_layernorm(self):
        return self.model.model.norm

    def get_lm_head(self):
        return self.model.lm_head

    @classmethod
    def _from_pretrained(cls, model_name, model_path, *, dtype=torch.float16, local_files_only=False, token=None):
        if not model_name.startswith(SUPPORTED_PREFIX):
            return None
        model = Phi3ForCausalLM.from_pretrained(model_path, torch_dtype=dtype, token=token, local_files_only=True)
        model.config.torch_dtype = dtype
        return Phi3ModelAdapter(model)

    @classmethod
    def _from_uninitialized(cls, model_name, model_path, *, dtype=torch.float16, local_files_only=False, token=None):
        if not model_name.startswith(SUPPORTED_PREFIX):
            return None

        class UninitializedPhi3ForCausalLM(Phi3ForCausalLM):
            def _init_weights(self, _) -> None:
                pass  # weights come from the sliced state dict

        config = Phi3Config.from_pretrained(model_path, torch_dtype=dtype, token=token, local_files_only=True)
        return Phi3ModelAdapter(UninitializedPhi3ForCausalLM(config).to(dtype=dtype))
