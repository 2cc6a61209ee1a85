"""Configuration of a SliceGPT-sliced OPT (``model_type = "sliced_opt"``).

The ORIGINAL OPT fields (``hidden_size`` is the dense width: the fused norms still divide by
it) plus the per-layer sliced widths; what the sliced families share is in
``configuration_sliced.SlicedConfig``. Two things differ from the dense ``OPTConfig``:
``lm_head_bias`` is True (SliceGPT fuses the final LayerNorm's bias into the head) and
``tie_word_embeddings`` is False (the fusion clones the head before slicing; the base value,
which OPTConfig defaults to True, is kept in ``base_tie_word_embeddings``).

Only the pre-LayerNorm OPT layout (OPT-125m, 1.3b and up) can be sliced by the official
SliceGPT: ``opt_layout_refusal`` names the layouts it cannot slice (OPT-350m's), and both the
constructor and ``from_base_and_slicing`` refuse them.

Portable by design: this file imports only the stdlib, transformers and its sibling
``configuration_sliced``, and is copied verbatim into exported model directories as remote
code. It works with transformers 4.41 (SliceGPT's pin) and with transformers 5.x.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .configuration_sliced import SlicedConfig, require_activation, require_positive


def opt_layout_refusal(config: Mapping[str, Any]) -> str | None:
    """Why the official SliceGPT cannot slice the OPT an ``OPTConfig`` dict describes (one sentence), or None."""
    hidden = int(config.get("hidden_size", 768))
    word_embed_proj_dim = int(config.get("word_embed_proj_dim") or hidden)
    if not config.get("do_layer_norm_before", True):
        return (
            "cannot slice an OPT-350m-style model with its LayerNorms after the blocks (do_layer_norm_before "
            "False): the official CompressedOPTDecoderLayer raises NotImplementedError for that layout"
        )
    if word_embed_proj_dim != hidden:
        return (
            f"cannot slice an OPT-350m-style model with project_in/project_out (word_embed_proj_dim "
            f"{word_embed_proj_dim} != hidden_size {hidden}): the official code fuses the {hidden}-wide final "
            f"LayerNorm into the {word_embed_proj_dim}-wide lm_head and rotates the {word_embed_proj_dim}-wide token "
            f"embeddings by a {hidden} x {hidden} matrix, both shape errors"
        )
    if config.get("_remove_final_layer_norm", False):
        return (
            "cannot slice an OPT-350m-style model without a final LayerNorm (_remove_final_layer_norm True): the "
            "official fusion needs that norm to fold into lm_head"
        )
    if not config.get("layer_norm_elementwise_affine", True):
        return (
            "cannot slice an OPT whose LayerNorms have no weight and bias (layer_norm_elementwise_affine False): "
            "the official fuse_ln_linear folds them into the next linears"
        )
    return None


class SlicedOPTConfig(SlicedConfig):
    """OPT hyper-parameters plus SliceGPT's per-layer sliced widths (see ``SlicedConfig``)."""

    model_type = "sliced_opt"
    family_name = "OPT"
    dense_defaults = {  # OPTConfig's
        "vocab_size": 50272,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 2048,
    }
    dense_tie_word_embeddings = True

    def __init__(
        self,
        ffn_dim: int = 3072,
        activation_function: str = "relu",
        do_layer_norm_before: bool = True,
        word_embed_proj_dim: int | None = None,
        enable_bias: bool = True,
        pad_token_id: int | None = 1,
        bos_token_id: int | None = 2,
        eos_token_id: int | list[int] | None = 2,
        lm_head_bias: bool = True,
        **kwargs: Any,
    ) -> None:
        """The OPT fields; ``kwargs`` are the shared ones (``SlicedConfig``). Refuses an unsliceable layout."""
        shared = {**self.dense_defaults, **kwargs}
        require_positive(ffn_dim=ffn_dim)
        require_activation("activation_function", activation_function)
        self.ffn_dim = int(ffn_dim)
        self.activation_function = activation_function
        self.do_layer_norm_before = bool(do_layer_norm_before)
        self.word_embed_proj_dim = int(word_embed_proj_dim or shared["hidden_size"])
        self.enable_bias = bool(enable_bias)
        self.lm_head_bias = bool(lm_head_bias)
        refusal = opt_layout_refusal(
            {
                "hidden_size": shared["hidden_size"],
                "do_layer_norm_before": self.do_layer_norm_before,
                "word_embed_proj_dim": self.word_embed_proj_dim,
            }
        )
        if refusal is not None:
            raise ValueError(refusal)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **shared)

    @classmethod
    def fields_from_base(cls, base_config: Mapping[str, Any]) -> dict[str, Any]:
        """The shared fields of a dense OPTConfig dict plus the OPT ones; refuses what ``opt_layout_refusal`` names.

        OPTConfig calls ``initializer_range`` ``init_std``; the head has a bias (see the module docstring).
        """
        refusal = opt_layout_refusal(base_config)
        if refusal is not None:
            raise ValueError(refusal)
        return {
            **super().fields_from_base(base_config),
            "ffn_dim": base_config["ffn_dim"],
            "activation_function": base_config.get("activation_function", "relu"),
            "do_layer_norm_before": base_config.get("do_layer_norm_before", True),
            "word_embed_proj_dim": base_config.get("word_embed_proj_dim"),
            "enable_bias": base_config.get("enable_bias", True),
            "initializer_range": base_config.get("init_std", 0.02),
            "lm_head_bias": True,
        }
