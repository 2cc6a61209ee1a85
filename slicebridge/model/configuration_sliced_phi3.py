"""Configuration of a SliceGPT-sliced Phi-3 (``model_type = "sliced_phi3"``).

The ORIGINAL Phi-3 fields (``hidden_size`` is the dense width: the fused RMS norms still
divide by it) plus the per-layer sliced widths; what the sliced families share, RoPE included,
is in ``configuration_sliced`` (``SlicedConfig`` and ``SlicedRotaryConfig``).

Portable by design: this file imports only the stdlib, transformers and its sibling
``configuration_sliced``, and is copied verbatim into exported model directories as remote
code. It works with transformers 4.41 (SliceGPT's pin) and with transformers 5.x.

Two fields are stored differently from a Phi3Config, so that they mean the same under both
transformers versions:

- RoPE: the scaling dict lives under ``rotary_scaling`` and ``rope_theta`` on its own (see
  ``SlicedRotaryConfig``). Phi-3's scaled variants are "su" and "yarn" (what transformers 4.41
  implements) and "longrope", the later name of "su" (same maths; an explicit ``factor`` /
  ``attention_factor`` is honoured as 5.x does); each needs per-channel factors.
- ``sliding_window`` counts the positions a query sees, itself included (what the shared mask
  and 5.x's sliding-window cache read). transformers 4.41's Phi-3, which SliceGPT runs, lets a
  query see its ``sliding_window`` predecessors as well as itself, so ``from_base_and_slicing``
  stores the base value plus one; the base value is kept in ``base_sliding_window``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .configuration_sliced import SlicedRotaryConfig, require_positive


def check_rope_factors(scaling: Mapping[str, Any] | None, head_dim: int) -> None:
    """Refuse a scaled RoPE dict without per-channel ``short_factor`` / ``long_factor`` lists of ``head_dim // 2``."""
    if scaling is None:
        return
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if not isinstance(factors, (list, tuple)) or len(factors) != head_dim // 2:
            raise ValueError(
                f"Phi-3 RoPE scaling {scaling['rope_type']!r} needs {key} as a list of {head_dim // 2} numbers "
                f"(head_dim {head_dim} / 2), got {factors!r}"
            )


class SlicedPhi3Config(SlicedRotaryConfig):
    """Phi-3 hyper-parameters plus SliceGPT's per-layer sliced widths (see ``SlicedConfig``)."""

    model_type = "sliced_phi3"
    family_name = "Phi-3"
    dense_defaults = {  # Phi3Config's
        "vocab_size": 32064,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
    }
    supported_rope_types = ("default", "su", "yarn", "longrope")

    def __init__(
        self,
        original_max_position_embeddings: int = 4096,
        rms_norm_eps: float = 1e-5,
        pad_token_id: int | None = 32000,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 32000,
        sliding_window: int | None = None,
        **kwargs: Any,
    ) -> None:
        """The Phi-3 fields; ``kwargs`` are the shared ones (``SlicedRotaryConfig``, ``SlicedConfig``)."""
        require_positive(
            original_max_position_embeddings=original_max_position_embeddings, sliding_window=sliding_window
        )
        self.original_max_position_embeddings = int(original_max_position_embeddings)
        self.rms_norm_eps = rms_norm_eps
        self.sliding_window = int(sliding_window) if sliding_window is not None else None
        shared = {**self.dense_defaults, **kwargs}
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **shared)
        check_rope_factors(self.rotary_scaling, self.head_dim)

    @classmethod
    def fields_from_base(cls, base_config: Mapping[str, Any]) -> dict[str, Any]:
        """The shared fields of a dense Phi3Config dict plus the Phi-3 ones.

        ``sliding_window`` becomes the base value plus one (see the module docstring).
        """
        rope_scaling = base_config.get("rope_scaling") or base_config.get("rope_parameters") or {}
        base_window = base_config.get("sliding_window")
        return {
            **super().fields_from_base(base_config),
            "original_max_position_embeddings": base_config.get("original_max_position_embeddings")
            or rope_scaling.get("original_max_position_embeddings")
            or 4096,
            "rms_norm_eps": base_config.get("rms_norm_eps", 1e-5),
            "sliding_window": int(base_window) + 1 if base_window is not None else None,
            "base_sliding_window": base_window,
            "attention_dropout": base_config.get("attention_dropout", 0.0),
        }
