"""Configuration of a SliceGPT-sliced Phi-2 (``model_type = "sliced_phi2"``).

The ORIGINAL Phi fields (``hidden_size`` is the dense width: the fused norms still divide by it)
plus the per-layer sliced widths; what the sliced families share, RoPE included, is in
``configuration_sliced`` (``SlicedConfig`` and ``SlicedRotaryConfig``). Phi-2 runs attention
and MLP in parallel on one normalised stream (``parallel_blocks``), so per layer the MLP reads
what the attention reads and the attention writes what the MLP writes. Its LayerNorms had
biases, so the sliced ``lm_head`` has one too (``lm_head_bias``). Only the first
``partial_rotary_factor`` of each head rotates; that factor is a field of its own, also when
given inside 5.x ``rope_parameters``.

Portable by design: this file imports only the stdlib, transformers and its sibling
``configuration_sliced``, and is copied verbatim into exported model directories as remote
code. It works with transformers 4.41 (SliceGPT's pin) and with transformers 5.x.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .configuration_sliced import SlicedRotaryConfig

DEFAULT_PARTIAL_ROTARY_FACTOR = 0.5  # PhiConfig's default; Phi-2 itself uses 0.4


def _partial_rotary_factor(value: float | None, rope_parameters: Mapping[str, Any] | None) -> float:
    """The fraction of each head that rotates: given, else inside 5.x ``rope_parameters``, else Phi's default."""
    if value is None and isinstance(rope_parameters, Mapping):
        value = rope_parameters.get("partial_rotary_factor")
    return float(value if value is not None else DEFAULT_PARTIAL_ROTARY_FACTOR)


class SlicedPhi2Config(SlicedRotaryConfig):
    """Phi-2 hyper-parameters plus SliceGPT's per-layer sliced widths (see ``SlicedConfig``)."""

    model_type = "sliced_phi2"
    family_name = "Phi-2"
    dense_defaults = {  # PhiConfig's
        "vocab_size": 51200,
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "hidden_act": "gelu_new",
        "max_position_embeddings": 2048,
    }
    parallel_blocks = True
    supported_rope_types = ("default", "linear", "dynamic")  # what transformers 4.41's Phi implements
    rope_fields_apart = ("partial_rotary_factor",)

    def __init__(
        self,
        layer_norm_eps: float = 1e-5,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        partial_rotary_factor: float | None = None,
        qk_layernorm: bool = False,
        lm_head_bias: bool = True,
        **kwargs: Any,
    ) -> None:
        """The Phi-2 fields; ``kwargs`` are the shared ones (``SlicedRotaryConfig``, ``SlicedConfig``)."""
        if qk_layernorm:
            raise ValueError(
                "qk_layernorm=True is not supported: SliceGPT's fusion would also replace the per-head q/k "
                "LayerNorms by its RMS norm, so the sliced model would not compute what the dense model did"
            )
        self.partial_rotary_factor = _partial_rotary_factor(partial_rotary_factor, kwargs.get("rope_parameters"))
        if not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor!r} must be in (0, 1]")
        self.layer_norm_eps = layer_norm_eps
        self.qk_layernorm = False
        self.lm_head_bias = bool(lm_head_bias)
        shared = {**self.dense_defaults, **kwargs}
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **shared)

    @property
    def rotary_dim(self) -> int:
        """Channels of each query/key head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.partial_rotary_factor * self.head_dim)

    @classmethod
    def fields_from_base(cls, base_config: Mapping[str, Any]) -> dict[str, Any]:
        """The shared fields of a dense PhiConfig dict plus the Phi-2 ones.

        The official Phi-2 adapter sets ``pad_token_id`` to the EOS id (Phi-2 has no pad token), and
        so does this config; the other token ids are the base's.
        """
        fields = super().fields_from_base(base_config)
        eos_token_id = fields["eos_token_id"]
        pad_token_id = eos_token_id[0] if isinstance(eos_token_id, list) and eos_token_id else eos_token_id
        return {
            **fields,
            "head_dim": base_config.get("head_dim"),
            "layer_norm_eps": base_config.get("layer_norm_eps", 1e-5),
            "partial_rotary_factor": _partial_rotary_factor(
                base_config.get("partial_rotary_factor"), base_config.get("rope_parameters")
            ),
            "qk_layernorm": bool(base_config.get("qk_layernorm", False)),
            "pad_token_id": pad_token_id if pad_token_id is not None else fields["pad_token_id"],
        }
