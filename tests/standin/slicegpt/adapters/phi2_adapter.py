"""Test stand-in for the official ``slicegpt.adapters.phi2_adapter`` (microsoft/TransformerCompression).

Reproduces, against transformers 4.41:
- ``CompressedPhiDecoderLayer``: a ``PhiDecoderLayer`` subclass for Phi-2's PARALLEL block:
  attention and MLP both read the one normed input and the block returns
  ``attn + mlp + residual @ attn_shortcut_Q`` (summed in that order, as the official does).
  A parallel block has a single shortcut: no ``mlp_shortcut_Q`` is registered on it. No
  instance attributes of its own, so official instances pickled with dill unpickle into it.
- ``Phi2LayerAdapter`` / ``Phi2ModelAdapter``: one ``LayerNorm`` per layer (no second norm),
  attention inputs q/k/v, output ``dense``, MLP ``fc1`` / ``fc2``; ``parallel_blocks`` True.
  Accepted only for the model name ``microsoft/phi-2`` exactly; anything else returns None,
  so ``ModelAdapter.from_model`` raises NotImplementedError. The uninitialised model is a
  LOCAL class ``UninitializedPhiForCausalLM`` defined inside
  ``Phi2ModelAdapter._from_uninitialized`` (the official qualname; dill pickles it by value),
  built in the default dtype and then cast with ``.to(dtype)``.
- ``post_init``: Phi-2 has no pad token, so pad := eos and ``config.pad_token_id`` follows.
Config and tokenizer are only ever read from local files (no Hugging Face downloads).
"""

import torch
from torch import Tensor
from transformers.models.phi.modeling_phi import PhiConfig, PhiDecoderLayer, PhiForCausalLM

from slicegpt.model_adapter import LayerAdapter, ModelAdapter
from slicegpt.modules import shortcut

SUPPORTED_NAME = "microsoft/phi-2"


class CompressedPhiDecoderLayer(PhiDecoderLayer):
    """Parallel PhiDecoderLayer whose residual is rotated (and sliced) by ``attn_shortcut_Q``."""

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        output_attentions: bool | None = False,
        use_cache: bool | None = False,
        past_key_value: tuple[Tensor] | None = None,
    ) -> tuple:
        normed = self.input_layernorm(hidden_states)
        attn_out, attn_weights, present = self.self_attn(
            hidden_states=normed,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_value=past_key_value,
            output_attentions=output_attentions,
            use_cache=use_cache,
        )
        attn_out = self.resid_dropout(attn_out)
        mlp_out = self.resid_dropout(self.mlp(normed))
        hidden_states = attn_out + mlp_out + shortcut(hidden_states, self.attn_shortcut_Q)
        outputs = (hidden_states,)
        if output_attentions:
            outputs += (attn_weights,)
        if use_cache:
            outputs += (present,)
        return outputs


class Phi2LayerAdapter(LayerAdapter):
    def get_first_layernorm(self):
        return self.layer.input_layernorm

    def get_second_layernorm(self):
        return None  # attention and MLP share the first norm

    def get_attention_inputs(self):
        attn = self.layer.self_attn
        return [attn.q_proj, attn.k_proj, attn.v_proj]

    def get_attention_output(self):
        return self.layer.self_attn.dense

    def get_mlp_inputs(self):
        return [self.layer.mlp.fc1]

    def get_mlp_output(self):
        return self.layer.mlp.fc2


class Phi2ModelAdapter(ModelAdapter):
    parallel_blocks = True
    should_bake_mean_into_linear = True
    original_layer_type = PhiDecoderLayer
    original_layer_norm_type = torch.nn.LayerNorm
    layer_adapter_type = Phi2LayerAdapter
    compressed_layer_type = CompressedPhiDecoderLayer
    config_type = PhiConfig

    def get_layers(self):
        return [Phi2LayerAdapter(layer) for layer in self.model.model.layers]

    def get_embeddings(self):
        return [self.model.model.embed_tokens]

    def get_pre_head_layernorm(self):
        return self.model.model.final_layernorm

    def get_lm_head(self):
        return self.model.lm_head

    def post_init(self, tokenizer) -> None:
        tokenizer.pad_token = tokenizer.eos_token
        self.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def _from_pretrained(cls, model_name, model_path, *, dtype=torch.float16, local_files_only=False, token=None):
        if model_name != SUPPORTED_NAME:
            return None
        model = PhiForCausalLM.from_pretrained(model_path, torch_dtype=dtype, token=token, local_files_only=True)
        model.config.torch_dtype = dtype
        return Phi2ModelAdapter(model)

    @classmethod
    def _from_uninitialized(cls, model_name, model_path, *, dtype=torch.float16, local_files_only=False, token=None):
        if model_name != SUPPORTED_NAME:
            return None

        class UninitializedPhiForCausalLM(PhiForCausalLM):
            def _init_weights(self, _) -> None:
                pass  # weights come from the sliced state dict

        config = PhiConfig.from_pretrained(model_path, torch_dtype=dtype, token=token, local_files_only=True)
        return Phi2ModelAdapter(UninitializedPhiForCausalLM(config).to(dtype=dtype))
