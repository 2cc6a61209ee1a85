"""Test stand-in for the official ``slicegpt.adapters.llama_adapter`` (microsoft/TransformerCompression).

Reproduces, against transformers 4.41:
- ``CompressedLlamaDecoderLayer``: a ``LlamaDecoderLayer`` subclass whose residuals are
  multiplied by ``attn_shortcut_Q`` / ``mlp_shortcut_Q`` (parameters, or None for a plain
  residual) before being added, so a sliced block maps width d_in to d_out. It adds no
  instance attributes of its own, so official instances pickled with dill unpickle into it.
- ``LlamaModelAdapter``: accepted only for model names starting with ``meta-llama/Llama-2``
  or ``meta-llama/Meta-Llama-3`` (the official prefix test; anything else, e.g. a local
  path, returns None and ``ModelAdapter.from_model`` raises NotImplementedError). The
  uninitialised model is a LOCAL class ``UninitializedLlamaForCausalLM`` defined inside
  ``LlamaModelAdapter._from_uninitialized`` (same qualname as the official), built in the
  default dtype and then cast with ``.to(dtype)`` (which also rounds the rotary ``inv_freq``
  to fp16). dill pickles that class by value with this module's ``__dict__`` as globals.
- ``post_init``: pad token := eos token, ``config.pad_token_id`` set accordingly.
Config and tokenizer are only ever read from local files (no Hugging Face downloads).
"""

import torch
from torch import Tensor
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaRMSNorm

from slicegpt.model_adapter import LayerAdapter, ModelAdapter
from slicegpt.modules import shortcut

SUPPORTED_PREFIXES = ("meta-llama/Llama-2", "meta-llama/Meta-Llama-3")


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
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (attn_weights,)
        if use_cache:
            outputs += (present,)
        return outputs


class LlamaLayerAdapter(LayerAdapter):
    def get_first_layernorm(self):
        return self.layer.input_layernorm

    def get_second_layernorm(self):
        return self.layer.post_attention_layernorm

    def get_attention_inputs(self):
        attn = self.layer.self_attn
        return [attn.q_proj, attn.k_proj, attn.v_proj]

    def get_attention_output(self):
        return self.layer.self_attn.o_proj

    def get_mlp_inputs(self):
        return [self.layer.mlp.gate_proj, self.layer.mlp.up_proj]

    def get_mlp_output(self):
        return self.layer.mlp.down_proj


class LlamaModelAdapter(ModelAdapter):
    parallel_blocks = False
    should_bake_mean_into_linear = False
    original_layer_type = LlamaDecoderLayer
    original_layer_norm_type = LlamaRMSNorm
    layer_adapter_type = LlamaLayerAdapter
    compressed_layer_type = CompressedLlamaDecoderLayer
    config_type = LlamaConfig

    def get_layers(self):
        return [LlamaLayerAdapter(layer) for layer in self.model.model.layers]

    def get_embeddings(self):
        return [self.model.model.embed_tokens]

    def get_pre_head_layernorm(self):
        return self.model.model.norm

    def get_lm_head(self):
        return self.model.lm_head

    def post_init(self, tokenizer) -> None:
        tokenizer.pad_token = tokenizer.eos_token
        self.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def _from_pretrained(cls, model_name, model_path, *, dtype=torch.float16, local_files_only=False, token=None):
        if not model_name.startswith(SUPPORTED_PREFIXES):
            return None
        model = LlamaForCausalLM.from_pretrained(model_path, torch_dtype=dtype, token=token, local_files_only=True)
        model.config.torch_dtype = dtype
        return LlamaModelAdapter(model)

    @classmethod
    def _from_uninitialized(cls, model_name, model_path, *, dtype=torch.float16, local_files_only=False, token=None):
        if not model_name.startswith(SUPPORTED_PREFIXES):
            return None

        class UninitializedLlamaForCausalLM(LlamaForCausalLM):
            def _init_weights(self, _) -> None:
                pass  # weights come from the sliced state dict

        config = LlamaConfig.from_pretrained(model_path, torch_dtype=dtype, token=token, local_files_only=True)
        return LlamaModelAdapter(UninitializedLlamaForCausalLM(config).to(dtype=dtype))
