"""Configuration of a SliceGPT-sliced Llama (``model_type = "sliced_llama"``).

SliceGPT rotates a Llama's residual stream and slices it to a smaller width, so every
layer can have its own widths. This config keeps the ORIGINAL Llama fields (``hidden_size``
is the dense width: the fused RMS norms still divide by it) plus the per-layer sliced widths
that SliceGPT's ``SlicingConfig`` records, as plain JSON lists.

Portable by design: this file imports only the stdlib and transformers, and is copied
verbatim next to ``modeling_sliced_llama.py`` into exported model directories as remote code.
It works with transformers 4.41 (SliceGPT's pin) and with transformers 5.x.

Note on RoPE fields: transformers 5.x turned ``config.rope_scaling`` into a deprecated alias of
``rope_parameters``. To behave the same under both versions this config stores the scaling
dict under ``rotary_scaling`` (and ``rope_theta`` on its own); ``rope_scaling=`` and
``rope_parameters=`` are still accepted as constructor arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PretrainedConfig

# SliceGPT replaces every LlamaRMSNorm by a weightless RMS normalisation with this epsilon
# (slicegpt.modules.RMSN), whatever ``rms_norm_eps`` the base model had.
SLICEGPT_FUSED_NORM_EPS = 1e-5

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def normalize_rope_scaling(
    rope_scaling: Mapping[str, Any] | None,
) -> dict[str, Any] | None:
    """Return a RoPE scaling dict with a ``rope_type`` key, or None for plain RoPE.

    Accepts the Llama-2 era form (``{"type": "linear", "factor": 2.0}``), the Llama-3.1 form
    (``{"rope_type": "llama3", ...}``) and transformers 5.x ``rope_parameters`` (which also
    carry ``rope_theta``; that key is dropped here and kept in ``config.rope_theta``).
    """
    if not rope_scaling:
        return None
    scaling = {key: value for key, value in dict(rope_scaling).items() if key != "rope_theta"}
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type == "default":
        return None
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"RoPE scaling type {rope_type!r} is not supported by the sliced Llama model; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return {"rope_type": rope_type, **scaling}


def _layer_list(values: Mapping[Any, int] | list[int] | None, num_layers: int, default: int, name: str) -> list[int]:
    """Turn a SlicingConfig ``{"0": 96, ...}`` dict (or a list) into a per-layer list of ints."""
    if values is None:
        return [int(default)] * num_layers
    if isinstance(values, Mapping):
        by_index = {int(key): int(value) for key, value in values.items()}
        missing = [idx for idx in range(num_layers) if idx not in by_index]
        if missing:
            raise ValueError(f"{name} has no width for layer(s) {missing}")
        return [by_index[idx] for idx in range(num_layers)]
    widths = [int(value) for value in values]
    if len(widths) != num_layers:
        raise ValueError(f"{name} has {len(widths)} entries, expected one per layer ({num_layers})")
    return widths


class SlicedLlamaConfig(PretrainedConfig):
    """Llama hyper-parameters plus SliceGPT's per-layer sliced widths.

    Width fields (all default to the dense ``hidden_size``):

    - ``embedding_dimension``: columns of ``embed_tokens`` (the residual width entering layer 0).
    - ``attention_input_dimensions[i]``: input width of q/k/v of layer i (= rows of its ``attn_shortcut_Q``).
    - ``attention_output_dimensions[i]``: output width of o_proj (= columns of ``attn_shortcut_Q``).
    - ``mlp_input_dimensions[i]``: input width of gate/up (= rows of ``mlp_shortcut_Q``).
    - ``mlp_output_dimensions[i]``: output width of down_proj (= columns of ``mlp_shortcut_Q``).
    - ``lm_head_dimension``: input width of ``lm_head`` (SliceGPT's ``head_dimension``).
    """

    model_type = "sliced_llama"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        intermediate_size: int = 11008,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        fused_norm_eps: float = SLICEGPT_FUSED_NORM_EPS,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,
        rotary_scaling: Mapping[str, Any] | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mlp_bias: bool = False,
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
        # Legacy / 5.x spellings of the RoPE settings (see the module docstring).
        legacy_rope_scaling = kwargs.pop("rope_scaling", None)
        rope_parameters = kwargs.pop("rope_parameters", None)
        if rope_theta is None and isinstance(rope_parameters, Mapping):
            rope_theta = rope_parameters.get("rope_theta")
        self.rope_theta = float(rope_theta) if rope_theta is not None else 10000.0
        self.rotary_scaling = normalize_rope_scaling(rotary_scaling or legacy_rope_scaling or rope_parameters)

        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.intermediate_size = int(intermediate_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.num_key_value_heads = int(num_key_value_heads or num_attention_heads)
        self.head_dim = int(head_dim or hidden_size // num_attention_heads)
        self.hidden_act = hidden_act
        self.max_position_embeddings = int(max_position_embeddings)
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.fused_norm_eps = fused_norm_eps
        self.use_cache = use_cache
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mlp_bias = mlp_bias

        layers = self.num_hidden_layers
        self.embedding_dimension = int(embedding_dimension or hidden_size)
        self.attention_input_dimensions = _layer_list(
            attention_input_dimensions, layers, hidden_size, "attention_input_dimensions"
        )
        self.attention_output_dimensions = _layer_list(
            attention_output_dimensions, layers, hidden_size, "attention_output_dimensions"
        )
        self.mlp_input_dimensions = _layer_list(mlp_input_dimensions, layers, hidden_size, "mlp_input_dimensions")
        self.mlp_output_dimensions = _layer_list(mlp_output_dimensions, layers, hidden_size, "mlp_output_dimensions")
        self.lm_head_dimension = int(lm_head_dimension or hidden_size)
        self.do_slice_head = bool(do_slice_head)
        self.sparsity = sparsity
        self.round_interval = round_interval

        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def residual_width_errors(self) -> list[str]:
        """Inconsistencies between consecutive widths of the residual stream (empty when consistent).

        Layer i reads the stream through q/k/v, then the stream becomes ``attention_output_dimensions[i]``
        wide; gate/up read that, then the stream becomes ``mlp_output_dimensions[i]`` wide.
        """
        errors: list[str] = []
        width, source = self.embedding_dimension, "embedding_dimension"
        stages = (
            ("attention_input_dimensions", "attention_output_dimensions"),
            ("mlp_input_dimensions", "mlp_output_dimensions"),
        )
        for idx in range(self.num_hidden_layers):
            for reader, writer in stages:
                got = getattr(self, reader)[idx]
                if got != width:
                    errors.append(f"{reader}[{idx}] is {got} but the residual stream there is {width} wide ({source})")
                width, source = getattr(self, writer)[idx], f"{writer}[{idx}]"
        if self.lm_head_dimension != width:
            errors.append(
                f"lm_head_dimension is {self.lm_head_dimension} but the last layer outputs {width} ({source})"
            )
        return errors

    @classmethod
    def from_base_and_slicing(
        cls,
        base_config: Mapping[str, Any],
        slicing_config: Mapping[str, Any],
        **overrides: Any,
    ) -> SlicedLlamaConfig:
        """Build the config from a base LlamaConfig dict (its config.json) and a SliceGPT SlicingConfig dict.

        The sliced model never ties its embeddings: SliceGPT fuses the final norm into a copy of
        ``lm_head`` and slices both matrices independently, so ``tie_word_embeddings`` is False
        whatever the base model said (the base value is kept in ``base_tie_word_embeddings``).
        ``overrides`` (e.g. ``sparsity=0.25, round_interval=8``) win over both dicts.
        """
        num_layers = int(base_config["num_hidden_layers"])
        hidden = int(base_config["hidden_size"])
        if slicing_config.get("parallel_blocks"):
            raise ValueError("parallel-block slicing (Phi-2 style) is not a Llama layout")
        const_dim = slicing_config.get("const_dimension")
        embedding_dims = slicing_config.get("embedding_dimensions") or {}
        embedding_dim = next(iter(embedding_dims.values()), None) if embedding_dims else const_dim

        def layer_widths(key: str) -> list[int]:
            values = slicing_config.get(key) or None
            return _layer_list(values, num_layers, const_dim or hidden, key)

        mlp_output = layer_widths("mlp_output_dimensions")
        head_dim_value = slicing_config.get("head_dimension")
        if head_dim_value is None:
            # SliceGPT leaves the head unsliced unless do_slice_head; the last layer then outputs `hidden`.
            head_dim_value = const_dim if slicing_config.get("do_slice_head") else hidden
            if not slicing_config.get("mlp_output_dimensions"):
                mlp_output[-1] = int(head_dim_value)

        rope_parameters = base_config.get("rope_parameters")
        rope_theta = base_config.get("rope_theta")
        if rope_theta is None and isinstance(rope_parameters, Mapping):
            rope_theta = rope_parameters.get("rope_theta")

        fields: dict[str, Any] = {
            "vocab_size": base_config["vocab_size"],
            "hidden_size": hidden,
            "intermediate_size": base_config["intermediate_size"],
            "num_hidden_layers": num_layers,
            "num_attention_heads": base_config["num_attention_heads"],
            "num_key_value_heads": base_config.get("num_key_value_heads"),
            "head_dim": base_config.get("head_dim"),
            "hidden_act": base_config.get("hidden_act", "silu"),
            "max_position_embeddings": base_config.get("max_position_embeddings", 2048),
            "initializer_range": base_config.get("initializer_range", 0.02),
            "rms_norm_eps": base_config.get("rms_norm_eps", 1e-6),
            "rope_theta": rope_theta,
            "rotary_scaling": base_config.get("rope_scaling") or rope_parameters,
            "attention_bias": base_config.get("attention_bias", False),
            "mlp_bias": base_config.get("mlp_bias", False),
            "bos_token_id": base_config.get("bos_token_id"),
            "eos_token_id": base_config.get("eos_token_id"),
            "pad_token_id": base_config.get("pad_token_id"),
            "tie_word_embeddings": False,
            "base_tie_word_embeddings": bool(base_config.get("tie_word_embeddings", False)),
            "embedding_dimension": embedding_dim or hidden,
            "attention_input_dimensions": layer_widths("attention_input_dimensions"),
            "attention_output_dimensions": layer_widths("attention_output_dimensions"),
            "mlp_input_dimensions": layer_widths("mlp_input_dimensions"),
            "mlp_output_dimensions": mlp_output,
            "lm_head_dimension": head_dim_value,
            "do_slice_head": bool(slicing_config.get("do_slice_head", False)),
        }
        fields.update(overrides)
        return cls(**fields)
