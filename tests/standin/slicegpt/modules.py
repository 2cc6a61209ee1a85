"""Test stand-in for the official ``slicegpt.modules`` (microsoft/TransformerCompression).

Reproduces ``RMSN``: the weight-free RMS norm that SliceGPT puts in place of every
``LlamaRMSNorm`` once their weights are fused into the next linear layers. Quirks kept:
the mean of squares is taken over ``mean_dim`` (the ORIGINAL hidden size), not over the
sliced width the tensor actually has; ``eps`` is a fixed 1e-5 whatever the model config's
``rms_norm_eps``; fp16 input is normalised in fp32 and cast back. The instance attributes
(``eps``, ``mean_dim``) carry the official names, so an official ``RMSN`` pickled with dill
unpickles into this class and runs.
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
