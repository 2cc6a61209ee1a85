"""Test stand-in for the official ``slicegpt.layernorm_fusion`` (microsoft/TransformerCompression).

Reproduces the two steps that make a model rotatable, with the official arithmetic (float64,
each result cast back to the weight's dtype):
- ``replace_layers``: every decoder layer (depth first, not inside replaced modules) becomes
  the adapter's compressed layer, with empty ``*_shortcut_Q`` slots (a plain residual until
  rotation sets them).
- ``fuse_modules``: the head is untied (its weight cloned); EVERY embedding matrix is centred
  (row means removed: all families, as the official does, although only a LayerNorm undoes it --
  so for the RMSNorm families, Llama and Phi-3, the fused model is NOT the dense model's
  function); each norm's weight is folded into the columns of the linears that read it and a
  LayerNorm's bias into their biases (``b + W @ beta``, a linear without a bias gains one, e.g.
  OPT's ``lm_head``): the first norm into the attention inputs (in a parallel block, Phi-2's,
  into the attention AND MLP inputs), the second into the MLP inputs, the final norm into
  ``lm_head``; for LayerNorm families (``should_bake_mean_into_linear``: OPT, Phi-2) the
  attention and MLP OUTPUT linears lose their mean over output rows (weight and bias), so the
  residual stream stays centred; every norm becomes ``RMSN(hidden_size)``. Quirks kept: a norm
  "has a bias" when it has a ``bias`` attribute; the norms' eps becomes RMSN's fixed 1e-5.
``hf_utils.load_sliced_model`` runs both on an uninitialised model before loading the state
dict, which overwrites every fused weight anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch.nn import Linear, Module, Parameter

from slicegpt.model_adapter import ModelAdapter
from slicegpt.modules import RMSN

log = logging.getLogger(__name__)


def replace_modules(
    root: Module, type_to_replace: type, new_module_factory: Callable[..., Module], replace_layers: bool
) -> None:
    """Replace each ``type_to_replace`` under ``root`` (depth first, not inside replaced ones) by the
    factory's module: ``factory(module, int(name))`` for layers, ``factory(module)`` for norms."""
    for name, module in root.named_children():
        if isinstance(module, type_to_replace):
            new = new_module_factory(module, int(name)) if replace_layers else new_module_factory(module)
            setattr(root, name, new)
        elif len(list(module.children())) > 0:
            replace_modules(module, type_to_replace, new_module_factory, replace_layers)


def replace_layers(model_adapter: ModelAdapter, verbose: bool = True) -> None:
    """Swap every decoder layer for the adapter's compressed layer (with empty shortcut_Q slots)."""
    if verbose:
        log.info("Replacing layers")
    replace_modules(
        model_adapter.model,
        model_adapter.original_layer_type,
        model_adapter.convert_layer_to_compressed_and_register_buffers,
        replace_layers=True,
    )
    if verbose:
        log.info("Replacing layers done")


def fuse_ln_linear(layernorm: Module, linear_layers: Iterable[Linear]) -> None:
    """Fold the norm's weight (and bias, if it has one) into the linears that read its output."""
    for linear in linear_layers:
        dtype = linear.weight.dtype
        weight = linear.weight.data.double()
        linear.weight.data = (weight * layernorm.weight.double()).to(dtype)
        if hasattr(layernorm, "bias"):
            if linear.bias is None:
                linear.bias = Parameter(torch.zeros(linear.out_features, dtype=torch.float64))
            linear.bias.data = (linear.bias.data.double() + weight @ layernorm.bias.double()).to(dtype)


def bake_mean_into_linear(linear: Linear) -> None:
    """Subtract the mean over output rows from the weight (and from the bias): the output has zero mean."""
    dtype = linear.weight.dtype
    weight = linear.weight.data.double()
    linear.weight.data = (weight - weight.mean(dim=-2, keepdim=True)).to(dtype)
    if linear.bias is not None:
        bias = linear.bias.data.double()
        linear.bias.data = (bias - bias.mean()).to(dtype)


def _center_embeddings(model_adapter: ModelAdapter) -> None:
    for embedding in model_adapter.get_embeddings():
        weight = embedding.weight.data.double()
        embedding.weight.data = (weight - weight.mean(dim=-1, keepdim=True)).to(embedding.weight.dtype)


def fuse_modules(model_adapter: ModelAdapter) -> None:
    """Fold every norm into the linears around it and replace it by RMSN (see the module docstring)."""
    log.info("Fusing layernorm modules")
    head = model_adapter.get_lm_head()
    head.weight = Parameter(head.weight.clone())
    _center_embeddings(model_adapter)
    for layer_adapter in model_adapter.get_layers():
        if model_adapter.parallel_blocks:
            readers = layer_adapter.get_attention_inputs() + layer_adapter.get_mlp_inputs()
            fuse_ln_linear(layer_adapter.get_first_layernorm(), readers)
        else:
            fuse_ln_linear(layer_adapter.get_first_layernorm(), layer_adapter.get_attention_inputs())
            fuse_ln_linear(layer_adapter.get_second_layernorm(), layer_adapter.get_mlp_inputs())
        if model_adapter.should_bake_mean_into_linear:
            bake_mean_into_linear(layer_adapter.get_attention_output())
            bake_mean_into_linear(layer_adapter.get_mlp_output())
    fuse_ln_linear(model_adapter.get_pre_head_layernorm(), [model_adapter.get_lm_head()])
    hidden = model_adapter.hidden_size
    replace_modules(model_adapter.model, model_adapter.original_layer_norm_type, lambda _: RMSN(hidden), False)
    log.info("Fusing layernorm modules done")
