"""Test stand-in for the official ``slicegpt.modules`` (microsoft/TransformerCompression).

Reproduces ``RMSN``: the weight-free RMS norm that SliceGPT puts in place of every norm
(``LlamaRMSNorm``, ``Phi3RMSNorm``, and OPT's and Phi-2's ``LayerNorm``, whose mean subtraction
goes into the preceding linear layers) once their weights are fused into the next linear layers.
Quirks kept:
the mean of squares is taken over ``mean_dim`` (the ORIGINAL hidden size), not over the
sliced width the tensor actually has; ``eps`` is a fixed 1e-5 whatever the model config's
``rms_norm_eps``; fp16 input is normalised in fp32 and cast back. The instance attributes
(``eps``, ``mean_dim``) carry the official names, so an official ``RMSN`` pickled with dill
unpickles into this class and runs.

Also here, what every compressed decoder layer shares: ``shortcut``, the residual path (the
residual times ``*_shortcut_Q``, which rotates it and maps the block's input width to its output
width; a plain residual while no Q is set), and ``layer_outputs``, the tuple a transformers 4.41
decoder layer returns.
"""

import torch


class RMSN(torch.nn.Module):
    """x / sqrt(sum(x^2) / mean_dim + eps), no learnable weight."""

    def __init__(self, mean_dim: int):
        super().__init__()
        self.eps = 1e-5
        self.mean_dim = mean_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype
        h = x.to(torch.float32) if out_dtype == torch.float16 else x
        mean_square = h.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (h * torch.rsqrt(mean_square + self.eps)).to(out_dtype)


def shortcut(residual: torch.Tensor, q: torch.Tensor | None) -> torch.Tensor:
    """The residual as a compressed layer adds it back: ``residual @ q``, or unchanged without a Q."""
    return residual if q is None else torch.matmul(residual, q)


def layer_outputs(
    hidden_states: torch.Tensor, attn_weights, present, output_attentions: bool | None, use_cache: bool | None
) -> tuple:
    """What a decoder layer returns: the hidden states, then the attention weights and the cache when asked for."""
    outputs = (hidden_states,)
    if output_attentions:
        outputs += (attn_weights,)
    if use_cache:
        outputs += (present,)
    return outputs
