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

Also here: ``shortcut``, the residual path every compressed decoder layer shares (the residual
times ``*_shortcut_Q``, which rotates it and maps the block's input width to its output width;
a plain residual while no Q is set).
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
