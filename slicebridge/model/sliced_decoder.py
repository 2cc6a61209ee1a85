"""The machinery every SliceGPT-sliced decoder shares, whatever its family.

What SliceGPT leaves of a decoder-only model, in every family it slices:

- Every norm's weight (and bias) is fused into the linear layers that read its output; what
  remains is a weightless RMS normalisation whose mean runs over the ORIGINAL hidden size:
  ``x / sqrt(sum(x**2) / hidden_size + eps)`` (eps 1e-5, SliceGPT's ``RMSN``). For LayerNorm
  families (OPT, Phi-2) the mean subtraction is baked into the embeddings and the linears that
  write the residual stream, so the stream is centred and RMSN is what LayerNorm computed.
- The residual stream is rotated and sliced, so each layer has its own widths, and each
  residual connection carries a matrix: ``h = h @ shortcut_Q + block(norm(h))``.
- The final norm is fused into ``lm_head`` in the same way (a bias appears when it had one).

This module holds what does not depend on the family: the norm, rotary position helpers, the
masks and positions, attention over a cache, the blocks most families share (self-attention with
q/k/v projections, the two-shortcut decoder layer), the decoder stack's forward pass (on one device, or
spread over several: the hidden states follow the layers' devices), the causal-LM head with generation
support, and building a model from a state dict without random init.
The family modules (``modeling_sliced_<family>.py``) define only what is theirs: their MLPs, the
names and biases of their projections, their position embeddings and any block of another shape.

Portable by design, and so are the family modules: they import only torch, transformers, the
stdlib and each other (relatively), are copied verbatim into exported model directories as remote
code, and run under transformers 4.41 (SliceGPT's pin) and 5.x. They use only transformers'
stable surface: ``PreTrainedModel``, ``GenerationMixin``, ``DynamicCache.update/get_seq_length``
and the output dataclasses; the differences between the two versions are handled in the
"Version compatibility" section.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .configuration_sliced import SlicedConfig

try:  # transformers >= 4.45 exports it at top level; 4.41 has it under generation
    from transformers import GenerationMixin
except ImportError:  # pragma: no cover - depends on the installed version
    from transformers.generation import GenerationMixin

try:  # transformers 5.x: init functions that skip tensors already loaded from a checkpoint
    from transformers import initialization as weight_init
except ImportError:  # transformers 4.x
    from torch.nn import init as weight_init

logger = logging.get_logger(__name__)

# One layer's keys and values ([batch, kv_heads, seq, head_dim] each), and the rotary cos and sin
# ([batch, seq, rotary_dim] each) that the model computes once per forward pass for all its layers.
KeyValues = tuple[torch.Tensor, torch.Tensor]
CosSin = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Version compatibility
# --------------------------------------------------------------------------------------------

# transformers 5.x renamed the cache field of model outputs (and the forward/generate keyword)
# from `past_key_values` to `cache`; outputs must use whichever name the installed version reads.
CACHE_OUTPUT_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# transformers 5.x declares tied weights as a {target: source} mapping, 4.x as a list of targets.
_TIED_KEYS_AS_MAPPING = hasattr(PreTrainedModel, "get_expanded_tied_weights_keys")


def tied_weights_keys(embedding: str) -> Any:
    """``_tied_weights_keys`` for an ``lm_head`` tied to the embedding named ``embedding``."""
    return {"lm_head.weight": embedding} if _TIED_KEYS_AS_MAPPING else ["lm_head.weight"]


LegacyCache = tuple[KeyValues, ...]


def cache_seq_length(cache: Cache | LegacyCache | None) -> int:
    """Number of positions already held by a cache (a ``Cache`` or a legacy tuple of (k, v))."""
    if cache is None:
        return 0
    if isinstance(cache, Cache):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2]) if len(cache) else 0


def cache_from_legacy(legacy: LegacyCache) -> DynamicCache:
    """Wrap a legacy tuple cache into a ``DynamicCache`` (``from_legacy_cache`` is gone in 5.x)."""
    cache = DynamicCache()
    for layer_idx, (keys, values) in enumerate(legacy):
        cache.update(keys, values, layer_idx)
    return cache


# --------------------------------------------------------------------------------------------
# Normalisation and rotary position embeddings
# --------------------------------------------------------------------------------------------


class SlicedRMSNorm(nn.Module):
    """Weightless RMS norm of a sliced stream, averaged over the ORIGINAL (dense) width.

    The weight was fused into the next linear layer; the slicing dropped coordinates but the
    mean still divides by the dense width, so this is not an RMSNorm of the sliced vector.
    """

    def __init__(self, mean_width: int, eps: float) -> None:
        super().__init__()
        self.mean_width = mean_width
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        mean_square = hidden_states.pow(2).sum(-1, keepdim=True) / self.mean_width
        return (hidden_states * torch.rsqrt(mean_square + self.eps)).to(input_dtype)

    def extra_repr(self) -> str:
        return f"mean_width={self.mean_width}, eps={self.eps}"


def _llama3_scaled_inv_freq(
    inv_freq: torch.Tensor, scaling: Mapping[str, Any], original_context: float
) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: long wavelengths are divided by ``factor``,
    short ones kept, and the band in between interpolated smoothly."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))

    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = original_context / low_freq_factor
    high_freq_wavelength = original_context / high_freq_factor
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq

    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    in_band = (wavelength <= low_freq_wavelength) & (wavelength >= high_freq_wavelength)
    return torch.where(in_band, interpolated, scaled)


def rope_inverse_frequencies(
    dim: int,
    base: float,
    scaling: Mapping[str, Any] | None,
    max_position_embeddings: int,
    device: torch.device | None = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Inverse frequencies (float32, ``dim // 2``) of RoPE over ``dim`` channels.

    ``scaling`` is a normalised scaling dict (``default``, ``linear``, ``dynamic``, ``llama3``).
    ``seq_len`` only matters for "dynamic" (NTK) scaling, which raises the base once the
    sequence outgrows the original context.
    """
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", "default")

    if rope_type == "dynamic" and seq_len is not None:
        factor = float(scaling["factor"])
        original_context = max_position_embeddings  # as transformers does for "dynamic"
        if seq_len > original_context:
            base = base * ((factor * seq_len / original_context) - (factor - 1)) ** (dim / (dim - 2))

    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim
    inv_freq = 1.0 / (base**exponents)

    if rope_type == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif rope_type == "llama3":
        original_context = scaling.get("original_max_position_embeddings") or max_position_embeddings
        inv_freq = _llama3_scaled_inv_freq(inv_freq, scaling, float(original_context))
    return inv_freq


class SlicedRotaryEmbedding(nn.Module):
    """RoPE cos/sin over a head's first ``dim`` channels (all of them, or Phi-2's partial share) for
    given positions, with the config's ``rope_theta`` and ``rotary_scaling`` (default, linear,
    dynamic, llama3). Holds no buffers, so meta-device construction and every transformers
    version's loading path need no special care."""

    def __init__(self, config: SlicedConfig, dim: int) -> None:
        super().__init__()
        self.config = config
        self.dim = dim
        self.is_dynamic = (config.rotary_scaling or {}).get("rope_type") == "dynamic"

    @torch.no_grad()
    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> CosSin:
        config = self.config
        seq_len = int(position_ids.max()) + 1 if self.is_dynamic else None
        inv_freq = rope_inverse_frequencies(
            self.dim,
            config.rope_theta,
            config.rotary_scaling,
            config.max_position_embeddings,
            hidden_states.device,
            seq_len,
        )
        return rotary_cos_sin(inv_freq, position_ids, hidden_states)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def rotary_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, like: torch.Tensor, scale: float = 1.0
) -> CosSin:
    """cos/sin ([batch, seq, 2 * len(inv_freq)]) of the rotation at ``position_ids``, in ``like``'s
    dtype, computed in float32 (``scale`` multiplies both, as scaled Phi-3 variants do)."""
    device_type = like.device.type if like.device.type != "mps" else "cpu"
    with torch.autocast(device_type=device_type, enabled=False):
        freqs = position_ids[:, :, None].to(torch.float32) * inv_freq[None, None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
    return cos.to(like.dtype), sin.to(like.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension's two halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query/key ([batch, heads, seq, head_dim]) by cos/sin ([batch, seq, rotary_dim]).

    When ``rotary_dim < head_dim`` (Phi-2's partial rotary) only the first ``rotary_dim``
    channels rotate; the rest pass through.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotary_dim = cos.shape[-1]
    if rotary_dim == query.shape[-1]:
        return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin
    query_rot, query_pass = query[..., :rotary_dim], query[..., rotary_dim:]
    key_rot, key_pass = key[..., :rotary_dim], key[..., rotary_dim:]
    query_rot = query_rot * cos + rotate_half(query_rot) * sin
    key_rot = key_rot * cos + rotate_half(key_rot) * sin
    return torch.cat((query_rot, query_pass), dim=-1), torch.cat((key_rot, key_pass), dim=-1)


# --------------------------------------------------------------------------------------------
# Attention, masks and positions
# --------------------------------------------------------------------------------------------


def repeat_kv(states: torch.Tensor, repeats: int) -> torch.Tensor:
    """[batch, kv_heads, seq, dim] -> [batch, kv_heads * repeats, seq, dim] (grouped-query attention)."""
    if repeats == 1:
        return states
    batch, kv_heads, seq_len, dim = states.shape
    expanded = states[:, :, None, :, :].expand(batch, kv_heads, repeats, seq_len, dim)
    return expanded.reshape(batch, kv_heads * repeats, seq_len, dim)


def split_heads(states: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]."""
    batch, seq_len, _ = states.shape
    return states.view(batch, seq_len, heads, head_dim).transpose(1, 2)


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Scaled dot-product attention of [batch, heads, seq, dim] queries over (grouped) keys and
    values; returns [batch, seq, heads * dim]. A mask wider than the keys is cut to its last columns:
    a sliding-window cache (transformers 5.x) hands back only the most recent keys."""
    batch, heads, seq_len, head_dim = query.shape
    groups = heads // key.shape[1]
    if attention_mask is not None and attention_mask.shape[-1] > key.shape[-2]:
        attention_mask = attention_mask[..., -key.shape[-2] :]
    attended = F.scaled_dot_product_attention(
        query,
        repeat_kv(key, groups),
        repeat_kv(value, groups),
        attn_mask=attention_mask,
        dropout_p=0.0,
        scale=scale,
    )
    return attended.transpose(1, 2).reshape(batch, seq_len, heads * head_dim)


def position_ids_from_mask(
    attention_mask: torch.Tensor | None, past_len: int, seq_len: int, device: torch.device
) -> torch.Tensor:
    """Positions of the new tokens: counted over non-padding tokens when a 2D mask is given
    (so left padding does not shift positions), else ``past_len .. past_len + seq_len - 1``."""
    if attention_mask is not None and attention_mask.dim() == 2:
        positions = attention_mask.long().cumsum(-1) - 1
        return positions.clamp(min=0)[:, -seq_len:].to(device)
    return torch.arange(past_len, past_len + seq_len, device=device).unsqueeze(0)


def causal_attention_mask(
    attention_mask: torch.Tensor | None,
    past_len: int,
    seq_len: int,
    device: torch.device,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Boolean SDPA mask [batch or 1, 1, seq_len, past_len + seq_len] (True = may attend).

    A 4D mask is returned as given. With ``sliding_window`` W a query sees W keys, itself included
    (transformers 5.x's meaning; 4.41's Phi-3 let it see W + 1, which its config converts). Query
    rows that may attend to nothing (padding before any real token) are opened up entirely: their
    outputs are never used, and a fully masked row would make SDPA return NaN, which would then
    leak through 0 * NaN into real positions.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask.to(device)
    kv_len = past_len + seq_len
    query_positions = torch.arange(past_len, kv_len, device=device)[:, None]
    key_positions = torch.arange(kv_len, device=device)[None, :]
    allowed = key_positions <= query_positions
    if sliding_window is not None:
        allowed = allowed & (query_positions - key_positions < sliding_window)
    allowed = allowed[None, None, :, :]
    if attention_mask is not None:
        if attention_mask.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the cache plus the new tokens "
                f"make {kv_len}; pass a mask over all positions (past and new)"
            )
        allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed


def to_layer_device(
    layer: nn.Module, hidden_states: torch.Tensor, rotary: CosSin | None, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, CosSin | None, torch.Tensor | None]:
    """A layer's inputs on the device of its weights, where a model spread over several devices put it (nothing
    moves on one device; a layer whose weights accelerate offloaded, on the meta device, is left to its hooks)."""
    device = next(layer.parameters()).device
    if device == hidden_states.device or device.type == "meta":
        return hidden_states, rotary, attention_mask
    if rotary is not None:
        rotary = (rotary[0].to(device), rotary[1].to(device))
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    return hidden_states.to(device), rotary, attention_mask


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross entropy: position t predicts ``labels[t + 1]`` (computed in float32)."""
    vocab_size = logits.shape[-1]
    shifted_logits = logits[:, :-1, :].reshape(-1, vocab_size).to(torch.float32)
    shifted_labels = labels[:, 1:].reshape(-1).to(logits.device)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=ignore_index)


# --------------------------------------------------------------------------------------------
# Blocks shared by the families
# --------------------------------------------------------------------------------------------


def shortcut(rows: int, columns: int) -> nn.Parameter:
    """A shortcut matrix's parameter (uninitialised; ``_init_weights`` or a checkpoint fills it)."""
    return nn.Parameter(torch.empty(rows, columns))


class SlicedAttention(nn.Module):
    """Multi-head / grouped-query self-attention reading and writing a layer's sliced widths.

    ``q_proj``, ``k_proj`` and ``v_proj`` read ``attention_input_dimensions[i]``; the output
    projection, named by the family's ``output_projection`` (``o_proj``, OPT's ``out_proj``,
    Phi's ``dense``), writes ``attention_output_dimensions[i]``. The family's subclass says which
    of them have biases. A family with one fused ``qkv_proj`` overrides ``make_input_projections``
    and ``project``. q and k are rotated when the model gives cos/sin (``rotary`` is None in a
    family with learned positions); cos/sin narrower than a head rotate only its first channels.
    """

    output_projection = "o_proj"

    def __init__(self, config: SlicedConfig, layer_idx: int, *, input_bias: bool, output_bias: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        # Read as transformers does: OPT's config has neither (no grouped-query attention, head_dim = hidden / heads).
        self.num_key_value_heads = getattr(config, "num_key_value_heads", self.num_heads)
        self.head_dim = getattr(config, "head_dim", config.hidden_size // self.num_heads)
        self.scaling = self.head_dim**-0.5
        query_width, key_value_width = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        self.split_sizes = [query_width, key_value_width, key_value_width]
        self.make_input_projections(config.attention_input_dimensions[layer_idx], input_bias)
        out_width = config.attention_output_dimensions[layer_idx]
        self.add_module(self.output_projection, nn.Linear(query_width, out_width, bias=output_bias))

    def make_input_projections(self, in_width: int, bias: bool) -> None:
        """``q_proj``, ``k_proj`` and ``v_proj``, reading the normalised stream."""
        query_width, key_width, value_width = self.split_sizes
        self.q_proj = nn.Linear(in_width, query_width, bias=bias)
        self.k_proj = nn.Linear(in_width, key_width, bias=bias)
        self.v_proj = nn.Linear(in_width, value_width, bias=bias)

    def project(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries, keys and values, [batch, seq, heads * head_dim] each."""
        return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: CosSin | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> tuple[torch.Tensor, KeyValues]:
        """Returns the attention output and this layer's full (cached + new) keys and values."""
        query, key, value = self.project(hidden_states)
        query = split_heads(query, self.num_heads, self.head_dim)
        key = split_heads(key, self.num_key_value_heads, self.head_dim)
        value = split_heads(value, self.num_key_value_heads, self.head_dim)
        if rotary is not None:
            query, key = apply_rotary_pos_emb(query, key, *rotary)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        output_projection = getattr(self, self.output_projection)
        return output_projection(attend(query, key, value, attention_mask, self.scaling)), (key, value)


class SlicedDecoderLayer(nn.Module):
    """A pre-norm block whose two residual connections go through the shortcut matrices::

        h = h @ attn_shortcut_Q + self_attn(input_layernorm(h))
        h = h @ mlp_shortcut_Q + mlp(post_attention_layernorm(h))

    A family's subclass sets ``attention_class`` and ``mlp_class`` (each built as
    ``cls(config, layer_idx)``); one whose MLP's linears belong to the layer itself (OPT's
    ``fc1`` / ``fc2``) overrides ``add_mlp`` and ``feed_forward`` instead. The norms are weightless,
    so their names are in no checkpoint.
    """

    attention_class: type[nn.Module]
    mlp_class: type[nn.Module]

    def __init__(self, config: SlicedConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = SlicedRMSNorm(config.hidden_size, config.fused_norm_eps)
        self.self_attn = self.attention_class(config, layer_idx)
        self.attn_shortcut_Q = shortcut(
            config.attention_input_dimensions[layer_idx], config.attention_output_dimensions[layer_idx]
        )
        self.post_attention_layernorm = SlicedRMSNorm(config.hidden_size, config.fused_norm_eps)
        self.add_mlp(config, layer_idx)
        self.mlp_shortcut_Q = shortcut(config.mlp_input_dimensions[layer_idx], config.mlp_output_dimensions[layer_idx])

    def add_mlp(self, config: SlicedConfig, layer_idx: int) -> None:
        """Add the MLP's modules (``self.mlp``)."""
        self.mlp = self.mlp_class(config, layer_idx)

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The MLP's output for the normalised stream."""
        return self.mlp(hidden_states)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: CosSin | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
    ) -> tuple[torch.Tensor, KeyValues]:
        attn_output, key_values = self.self_attn(self.input_layernorm(hidden_states), rotary, attention_mask, cache)
        hidden_states = torch.matmul(hidden_states, self.attn_shortcut_Q) + attn_output

        mlp_output = self.feed_forward(self.post_attention_layernorm(hidden_states))
        hidden_states = torch.matmul(hidden_states, self.mlp_shortcut_Q) + mlp_output
        return hidden_states, key_values


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class SlicedPreTrainedModel(PreTrainedModel):
    """Base of every sliced model class: weight init and the flags transformers reads."""

    config_class = SlicedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _skip_keys_device_placement = ["past_key_values", "cache"]
    # Not None, so that transformers 4.41 looks for the decoder's instance-level list (its layer class).
    _no_split_modules: list[str] = []
    _supports_sdpa = True
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        """Random init for a model built from a config alone; shortcuts start as (rectangular) identities."""
        if any(param.is_meta for param in module.parameters(recurse=False)):
            return  # built on the meta device: the weights come from a checkpoint
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            weight_init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                weight_init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            weight_init.normal_(module.weight, mean=0.0, std=std)
        for name in ("attn_shortcut_Q", "mlp_shortcut_Q"):
            matrix = getattr(module, name, None)
            if isinstance(matrix, nn.Parameter):
                weight_init.eye_(matrix)


class SlicedDecoderModel(SlicedPreTrainedModel):
    """The decoder stack: embeddings, the sliced layers and the final (weightless) norm; no head.

    A family's subclass sets ``layer_class`` (a block called as
    ``layer(hidden_states, rotary, attention_mask, cache) -> (hidden_states, (keys, values))``,
    which is also the module a device map must not split) and overrides ``make_rotary`` (rotary
    embeddings) or ``make_position_embeddings`` and ``add_positions`` (learned position
    embeddings), whichever it has.
    """

    layer_class: type[nn.Module]

    def __init__(self, config: SlicedConfig) -> None:
        super().__init__(config)
        width_errors = config.residual_width_errors()
        if width_errors:
            raise ValueError("inconsistent sliced widths: " + "; ".join(width_errors))
        self._no_split_modules = [self.layer_class.__name__]
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embedding_dimension)
        self.embed_positions = self.make_position_embeddings(config)
        self.layers = nn.ModuleList([self.layer_class(config, idx) for idx in range(config.num_hidden_layers)])
        self.norm = SlicedRMSNorm(config.hidden_size, config.fused_norm_eps)
        self.rotary_emb = self.make_rotary(config)
        self.post_init()

    def make_position_embeddings(self, config: SlicedConfig) -> nn.Module | None:
        """The learned position embeddings ``add_positions`` adds, or None for a family without them."""
        return None

    def make_rotary(self, config: SlicedConfig) -> nn.Module | None:
        """The module giving (cos, sin) for positions, or None for a family without rotary embeddings."""
        return None

    def add_positions(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, past_len: int
    ) -> torch.Tensor:
        """Add learned position embeddings to the token embeddings (a family that has them overrides this)."""
        return hidden_states

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | LegacyCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | LegacyCache | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if kwargs.get("output_attentions"):
            logger.warning_once("the sliced model uses fused SDPA attention and returns no attention weights")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)

        past = cache if cache is not None else past_key_values
        return_legacy_cache = past is not None and not isinstance(past, Cache)
        if return_legacy_cache:
            past = cache_from_legacy(past)
        if use_cache and past is None:
            past = DynamicCache()
        active_cache = past if use_cache else None

        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        seq_len = hidden_states.shape[1]
        past_len = cache_seq_length(past)
        hidden_states = self.add_positions(hidden_states, attention_mask, past_len)
        mask = causal_attention_mask(
            attention_mask, past_len, seq_len, hidden_states.device, getattr(self.config, "sliding_window", None)
        )
        rotary = None
        if self.rotary_emb is not None:
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask, past_len, seq_len, hidden_states.device)
            rotary = self.rotary_emb(hidden_states, position_ids)

        all_hidden_states: tuple[torch.Tensor, ...] | None = () if output_hidden_states else None
        legacy_layers: list[KeyValues] = []
        for layer in self.layers:
            if all_hidden_states is not None:
                all_hidden_states += (hidden_states,)
            hidden_states, rotary, mask = to_layer_device(layer, hidden_states, rotary, mask)
            hidden_states, key_values = layer(hidden_states, rotary, mask, active_cache)
            legacy_layers.append(key_values)
        hidden_states = self.norm(hidden_states)
        if all_hidden_states is not None:
            all_hidden_states += (hidden_states,)

        returned_cache: Any = None
        if use_cache:
            returned_cache = tuple(legacy_layers) if return_legacy_cache else active_cache
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, **{CACHE_OUTPUT_FIELD: returned_cache}
        )
        return output if return_dict else output.to_tuple()


class SlicedForCausalLM(SlicedPreTrainedModel, GenerationMixin):
    """A sliced decoder with its LM head (into which SliceGPT fused the final norm).

    A family's subclass sets ``model_class`` (its decoder, stored as ``self.model``) and, when
    the token embeddings are not ``model.embed_tokens``, ``_tied_weights_keys``. The head has a
    bias when ``config.lm_head_bias`` says so (the fused LayerNorm of OPT and Phi-2).
    """

    model_class: type[nn.Module]
    _tied_weights_keys = tied_weights_keys("model.embed_tokens.weight")

    def __init__(self, config: SlicedConfig) -> None:
        super().__init__(config)
        if config.tie_word_embeddings and config.lm_head_dimension != config.embedding_dimension:
            raise ValueError(
                f"tie_word_embeddings needs lm_head_dimension ({config.lm_head_dimension}) == "
                f"embedding_dimension ({config.embedding_dimension})"
            )
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        bias = bool(getattr(config, "lm_head_bias", False))
        self.lm_head = nn.Linear(config.lm_head_dimension, config.vocab_size, bias=bias)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def get_decoder(self) -> nn.Module:
        return self.model

    def set_decoder(self, decoder: nn.Module) -> None:
        self.model = decoder

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | LegacyCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | LegacyCache | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache=cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits_to_keep = kwargs.get("num_logits_to_keep", logits_to_keep)  # 4.4x spelling
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                hidden_states = hidden_states[:, -logits_to_keep:, :]
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        head_device = self.lm_head.weight.device
        if head_device != hidden_states.device and head_device.type != "meta":  # the head on another device
            hidden_states = hidden_states.to(head_device)
        logits = self.lm_head(hidden_states)
        # Spread over several devices, the logits come back where the inputs are (as accelerate's device maps have
        # it): generation appends the next token to the ids, and the loss reads the labels, on that device.
        input_device = (input_ids if input_ids is not None else inputs_embeds).device
        if logits.device != input_device:
            logits = logits.to(input_device)

        loss = causal_lm_loss(logits, labels) if labels is not None else None
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_OUTPUT_FIELD: getattr(outputs, CACHE_OUTPUT_FIELD)},
        )
        return output if return_dict else output.to_tuple()

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Use the library's generic preparation where it has one (>= 4.45, 5.x), else our own (4.41).

        ``inputs_embeds`` is named in the signature because ``generate`` looks for it there.
        """
        try:
            return super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        except NotImplementedError:
            return self._prepare_inputs_for_generation_legacy(input_ids, inputs_embeds=inputs_embeds, **kwargs)

    def _prepare_inputs_for_generation_legacy(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | LegacyCache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """transformers 4.41 passes every token so far at each step: feed only what the cache lacks.

        The sequence length is read off ``attention_mask`` when there is one, since a prompt given
        as ``inputs_embeds`` is not part of ``input_ids``. Positions are left to ``forward``, which
        derives them from ``attention_mask``.
        """
        past_len = cache_seq_length(past_key_values)
        total_len = attention_mask.shape[-1] if attention_mask is not None else input_ids.shape[1]
        new_len = max(total_len - past_len, 1)
        if inputs_embeds is not None and past_len == 0:
            model_inputs: dict[str, Any] = {"inputs_embeds": inputs_embeds}
        else:
            model_inputs = {"input_ids": input_ids[:, -new_len:].contiguous()}
        if position_ids is not None:
            model_inputs["position_ids"] = position_ids[:, -new_len:]
        model_inputs.update(past_key_values=past_key_values, attention_mask=attention_mask, use_cache=use_cache)
        return model_inputs

    @staticmethod
    def _reorder_cache(past_key_values: Cache | LegacyCache, beam_idx: torch.Tensor) -> Cache | LegacyCache:
        """Keep the cache rows of the surviving beams (5.x calls this for any cache, 4.41 for tuples)."""
        if isinstance(past_key_values, Cache):
            past_key_values.reorder_cache(beam_idx)
            return past_key_values
        return tuple(
            tuple(state.index_select(0, beam_idx.to(state.device)) for state in layer_past)
            for layer_past in past_key_values
        )


# --------------------------------------------------------------------------------------------
# Building and sizing helpers
# --------------------------------------------------------------------------------------------


def _record_dtype(config: SlicedConfig, dtype: torch.dtype) -> None:
    """Note the weights' dtype in the config (``dtype`` in 5.x, ``torch_dtype`` in 4.x)."""
    if "dtype" in getattr(type(config), "__dataclass_fields__", {}):
        config.dtype = dtype
    else:
        config.torch_dtype = dtype


@contextlib.contextmanager
def _torch_init_disabled() -> Iterator[None]:
    """Make torch.nn.init's functions no-ops for a while (torch's own layer constructors call them;
    on the meta device they cost nothing but a one-off import of torch._dynamo, ~2 s)."""
    names = (
        "normal_",
        "uniform_",
        "kaiming_uniform_",
        "kaiming_normal_",
        "xavier_uniform_",
        "xavier_normal_",
        "trunc_normal_",
        "zeros_",
        "ones_",
    )
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor owning exactly its elements.

    SliceGPT slices with views (``weight[:, :width]``), so its saved tensors are often
    non-contiguous windows onto the unsliced storage; safetensors refuses those, and keeping
    them would keep the dense storage alive.
    """
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def build_sliced_model(
    model_class: type[SlicedForCausalLM],
    state_dict: Mapping[str, torch.Tensor],
    config: SlicedConfig,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SlicedForCausalLM:
    """Build ``model_class`` around the tensors of ``state_dict`` without any random initialisation.

    The modules are created on the meta device (no memory, no init cost) and the checkpoint
    tensors are then assigned in place of the meta parameters (``load_state_dict(assign=True)``).
    Tensors that are already compact are used as they are (mmap-loaded ones stay file-backed)
    unless ``dtype``/``device`` ask for a copy; SliceGPT's strided views are compacted.
    Raises ``ValueError`` naming every missing, unexpected or mis-shaped tensor.
    """
    with torch.device("meta"), _torch_init_disabled():
        model = model_class(config)

    expected = {name: tuple(param.shape) for name, param in model.state_dict().items()}
    tied_targets = {"lm_head.weight"} if config.tie_word_embeddings else set()
    problems = [
        f"missing {name} {shape}"
        for name, shape in expected.items()
        if name not in state_dict and name not in tied_targets
    ]
    problems += [f"unexpected {name}" for name in state_dict if name not in expected]
    problems += [
        f"{name} is {tuple(tensor.shape)}, expected {expected[name]}"
        for name, tensor in state_dict.items()
        if name in expected and tuple(tensor.shape) != expected[name]
    ]
    if problems:
        raise ValueError(f"state dict does not fit the {config.model_type} config: " + "; ".join(problems))

    tensors = {
        name: _compact(tensor).to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        for name, tensor in state_dict.items()
        if name not in tied_targets
    }
    model.load_state_dict(tensors, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.get_input_embeddings().weight
    still_meta = [name for name, param in model.named_parameters() if param.is_meta]
    if still_meta:
        raise ValueError(f"tensors left unloaded: {still_meta}")
    _record_dtype(model.config, model.lm_head.weight.dtype)
    return model.eval()


@dataclass(frozen=True)
class SlicedParameterCount:
    """Parameter counts of a sliced model; ``shortcut`` is the part held by the shortcut Qs."""

    total: int
    shortcut: int


def count_sliced_parameters(source: nn.Module | Mapping[str, torch.Tensor]) -> SlicedParameterCount:
    """Count the parameters of a sliced model or of its state dict (tied tensors counted once)."""
    named = source.named_parameters() if isinstance(source, nn.Module) else source.items()
    seen: set[tuple[int, tuple[int, ...]]] = set()
    total = shortcut = 0
    for name, tensor in named:
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if identity[0] and identity in seen:
            continue
        seen.add(identity)
        total += tensor.numel()
        if name.endswith("_shortcut_Q"):
            shortcut += tensor.numel()
    return SlicedParameterCount(total=total, shortcut=shortcut)
