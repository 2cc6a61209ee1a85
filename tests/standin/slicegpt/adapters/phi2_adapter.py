"""Test stand-in for the official ``slicegpt.adapters.phi2_adapter`` (microsoft/TransformerCompression).

Reproduces, against transformers 4.41:
- ``CompressedPhiDecoderLayer``: a ``PhiDecoderLayer`` subclass for Phi-2's PARALLEL block:
  attention and MLP both read the one normed input and the block returns
  ``attn + mlp + residual @ attn_shortcut_Q`` (summed in that order, as the official does).
  A parallel block has a single shortcut: no ``mlp_shortcut_Q`` is registered on it. No
  instance attributes of its own, so official instances pickled with dill unpickle into it.
- ``Phi2LayerAdapter`` / ``Phi2ModelAdapter``: one ``LayerNorm`` per layer (no second norm),
  attention inputs q/k/v, output ``dense``, MLP ``fc1`` / ``fc2``; ``parallel_blocks`` and
  ``should_bake_mean_into_linear`` True.
  Accepted only for the model name ``microsoft/phi-2`` exactly; anything else is refused, so
  ``ModelAdapter.from_model`` raises NotImplementedError. The uninitialised model is
  ``Phi2ModelAdapter._from_uninitialized.<locals>.UninitializedPhiForCausalLM`` (see
  ``model_adapter``).
- ``pad_with_eos``: Phi-2's tokenizer has no pad token.
"""

import torch
from torch import Tensor
from transformers.models.phi.modeling_phi import PhiDecoderLayer, PhiForCausalLM

from slicegpt.model_adapter import LayerAdapter, ModelAdapter
from slicegpt.modules import layer_outputs, shortcut


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
        return layer_outputs(hidden_states, attn_weights, present, output_attentions, use_cache)


class Phi2LayerAdapter(LayerAdapter):
    first_layernorm_path = "input_layernorm"
    second_layernorm_path = None  # attention and MLP share the first norm
    attention_input_paths = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attention_output_path = "self_attn.dense"
    mlp_input_paths = ("mlp.fc1",)
    mlp_output_path = "mlp.fc2"


class Phi2ModelAdapter(ModelAdapter):
    causal_lm_type = PhiForCausalLM
    original_layer_norm_type = torch.nn.LayerNorm
    layer_adapter_type = Phi2LayerAdapter
    compressed_layer_type = CompressedPhiDecoderLayer
    parallel_blocks = True
    should_bake_mean_into_linear = True
    pad_with_eos = True
    layers_path = "model.layers"
    embedding_paths = ("model.embed_tokens",)
    pre_head_layernorm_path = "model.final_layernorm"

    @classmethod
    def accepts_name(cls, model_name: str) -> bool:
        return model_name == "microsoft/phi-2"
