"""Test stand-in for the official ``slicegpt.model_utils`` (microsoft/TransformerCompression).

Reproduces the two ways the official rotation reads calibration activations:
- ``get_layer0_inputs(model_adapter, batch)``: runs the model on one batch with layer 0 swapped
  (``set_raw_layer_at``) for a catcher that records its positional and keyword arguments and
  stops the forward pass by raising ``ValueError``; returns the hidden states, the positional
  args and the kwargs (attention mask, position ids, ...), on the CPU. The same args and kwargs
  are then given to EVERY layer (hence no OPT-350m). Quirks kept: the embeddings' weights are
  re-wrapped as new Parameters on ``config.device`` and back on the CPU; the batch goes to the
  model whole (``model(**batch)``: ``labels`` included, and any key the model's forward does not
  take, e.g. a tokenizer's ``token_type_ids``, raises ``TypeError`` there).
- ``get_signals(layer_adapter, args, kwargs)``: runs one layer on every batch and returns, per
  batch, the input of its second norm (caught by a forward hook on that ``RMSN``; a 2-D input,
  as OPT's MLP gets, is reshaped to [batch, seq, -1]) and the layer's output hidden states.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from slicegpt import utils
from slicegpt.config import config
from slicegpt.model_adapter import LayerAdapter, ModelAdapter
from slicegpt.modules import RMSN


class _Catcher(torch.nn.Module):
    """Stands in for layer 0: keeps what it is called with, then stops the forward pass."""

    def forward(self, *args, **kwargs):
        self.saved_args = args
        self.saved_kwargs = kwargs
        raise ValueError


def _move_embeddings(model_adapter: ModelAdapter, device: torch.device | str) -> None:
    for embedding in model_adapter.get_embeddings():
        embedding.weight = torch.nn.Parameter(embedding.weight.to(device))


def get_layer0_inputs(model_adapter: ModelAdapter, batch: dict[str, Tensor]) -> tuple[Tensor, tuple, dict[str, Any]]:
    """The hidden states entering layer 0 for ``batch``, with the args and kwargs layer 0 is called with."""
    _move_embeddings(model_adapter, config.device)
    layer0 = model_adapter.get_layers()[0]
    catcher = _Catcher()
    model_adapter.set_raw_layer_at(0, catcher)
    try:
        model_adapter.model(**utils.map_tensors(batch, device=config.device))
    except ValueError:
        pass
    args = utils.map_tensors(catcher.saved_args, device="cpu")
    kwargs = utils.map_tensors(catcher.saved_kwargs, device="cpu")
    model_adapter.set_raw_layer_at(0, layer0.layer)
    _move_embeddings(model_adapter, "cpu")
    utils.cleanup_memory()
    return args[layer0.hidden_states_args_position], args, kwargs


def get_signals(
    layer_adapter: LayerAdapter, layer_args: list[tuple], layer_kwargs: list[dict[str, Any]]
) -> tuple[list[Tensor], list[Tensor]]:
    """Per batch: the input of the layer's second norm and the layer's output (both on the CPU)."""
    mlp_ln_inputs: list[Tensor] = []
    outputs: list[Tensor] = []
    layer = layer_adapter.layer.to(config.device)
    norm = layer_adapter.get_second_layernorm()
    assert isinstance(norm, RMSN)
    hook = norm.register_forward_hook(lambda _module, inputs, _output: mlp_ln_inputs.append(inputs[0].cpu()))
    for i, (args, kwargs) in enumerate(zip(layer_args, layer_kwargs, strict=True)):
        args, kwargs = utils.map_tensors([args, kwargs], device=config.device)
        out = layer(*args, **kwargs)
        if isinstance(out, tuple):
            out = out[layer_adapter.hidden_states_output_position]
        outputs.append(out.cpu())
        if mlp_ln_inputs[i].ndim == 2:
            batch_size, seqlen, _ = outputs[i].shape
            mlp_ln_inputs[i] = mlp_ln_inputs[i].reshape(batch_size, seqlen, -1)
    hook.remove()
    return mlp_ln_inputs, outputs
