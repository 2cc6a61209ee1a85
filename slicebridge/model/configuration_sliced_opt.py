"""Configuration of a SliceGPT-sliced OPT (``model_type = "sliced_opt"``).

The ORIGINAL OPT fields (``hidden_size`` is the dense width: the fused norms still divide by
it) plus the per-layer sliced widths of ``configuration_sliced.SlicedConfig``. Two things
differ from the dense ``OPTConfig``: ``lm_head_bias`` is True (SliceGPT fuses the final
LayerNorm's bias into the head) and ``tie_word_embeddings`` is False (the fusion clones the
head before slicing; the base value is kept in ``base_tie_word_embeddings``).

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

from .configuration_sliced import SLICEGPT_FUSED_NORM_EPS, SlicedConfig, widths_from_slicing


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
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 50272,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        ffn_dim: int = 3072,
        num_attention_heads: int = 12,
        max_position_embeddings: int = 2048,
        activation_function: str = "relu",
        do_layer_norm_before: bool = True,
        word_embed_proj_dim: int | None = None,
        enable_bias: bool = True,
        initializer_range: float = 0.02,
        fused_norm_eps: float = SLICEGPT_FUSED_NORM_EPS,
        use_cache: bool = True,
        pad_token_id: int | None = 1,
        bos_token_id: int | None = 2,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        lm_head_bias: bool = True,
        embedding_dimension: int | None = None,
        attention_input_dimensions: list[int] | Mapping[Any, int] | None = None,
        attention_output_dimensions: list[int] | Mapping[Any, int] | None = None,
        mlp_input_dimensions: list[int] | Mapping[Any, int] | None = None,
        mlp_output_dimensions: list[int] | Mapping[Any, int] | None = None,
        lm_head_dimension: int | None = None,
        do_slice_head: bool = False,
        sparsity: float | None = None,
        round_interval: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.ffn_dim = int(ffn_dim)
        self.num_attention_heads = int(num_attention_heads)
        self.max_position_embeddings = int(max_position_embeddings)
        self.activation_function = activation_function
        self.do_layer_norm_before = bool(do_layer_norm_before)
        self.word_embed_proj_dim = int(word_embed_proj_dim or hidden_size)
        self.enable_bias = bool(enable_bias)
        self.initializer_range = initializer_range
        self.fused_norm_eps = fused_norm_eps
        self.use_cache = use_cache
        self.lm_head_bias = bool(lm_head_bias)
        refusal = opt_layout_refusal(
            {
                "hidden_size": self.hidden_size,
                "do_layer_norm_before": self.do_layer_norm_before,
                "word_embed_proj_dim": self.word_embed_proj_dim,
            }
        )
        if refusal is not None:
            raise ValueError(refusal)

        self.init_widths(
            hidden_size=self.hidden_size,
            num_layers=self.num_hidden_layers,
            embedding_dimension=embedding_dimension,
            attention_input_dimensions=attention_input_dimensions,
            attention_output_dimensions=attention_output_dimensions,
            mlp_input_dimensions=mlp_input_dimensions,
            mlp_output_dimensions=mlp_output_dimensions,
            lm_head_dimension=lm_head_dimension,
            do_slice_head=do_slice_head,
            sparsity=sparsity,
            round_interval=round_interval,
        )

        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @classmethod
    def from_base_and_slicing(
        cls,
        base_config: Mapping[str, Any],
        slicing_config: Mapping[str, Any],
        **overrides: Any,
    ) -> SlicedOPTConfig:
        """Build the config from a base OPTConfig dict (its config.json) and a SliceGPT SlicingConfig dict.

        Raises ``ValueError`` for the OPT layouts the official SliceGPT cannot slice
        (``opt_layout_refusal``). The sliced model never ties its embeddings and its head has a
        bias (see the module docstring). ``overrides`` (e.g. ``sparsity=0.25, round_interval=8``)
        win over both dicts.
        """
        refusal = opt_layout_refusal(base_config)
        if refusal is not None:
            raise ValueError(refusal)
        if slicing_config.get("parallel_blocks"):
            raise ValueError("parallel-block slicing (Phi-2 style) is not an OPT layout")
        num_layers = int(base_config["num_hidden_layers"])
        hidden = int(base_config["hidden_size"])
        fields: dict[str, Any] = {
            "vocab_size": base_config["vocab_size"],
            "hidden_size": hidden,
            "num_hidden_layers": num_layers,
            "ffn_dim": base_config["ffn_dim"],
            "num_attention_heads": base_config["num_attention_heads"],
            "max_position_embeddings": base_config.get("max_position_embeddings", 2048),
            "activation_function": base_config.get("activation_function", "relu"),
            "do_layer_norm_before": base_config.get("do_layer_norm_before", True),
            "word_embed_proj_dim": base_config.get("word_embed_proj_dim"),
            "enable_bias": base_config.get("enable_bias", True),
            "initializer_range": base_config.get("init_std", 0.02),
            "bos_token_id": base_config.get("bos_token_id"),
            "eos_token_id": base_config.get("eos_token_id"),
            "pad_token_id": base_config.get("pad_token_id"),
            "tie_word_embeddings": False,
            "base_tie_word_embeddings": bool(base_config.get("tie_word_embeddings", True)),
            "lm_head_bias": True,
            **widths_from_slicing(slicing_config, num_layers, hidden, parallel_blocks=False),
            "do_slice_head": bool(slicing_config.get("do_slice_head", False)),
        }
        fields.update(overrides)
        return cls(**fields)
