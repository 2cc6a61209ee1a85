"""What every sliced family's config shares: the common fields, SliceGPT's per-layer widths, RoPE.

SliceGPT rotates a model's residual stream and slices it to a smaller width, so each layer can
have its own widths. ``SlicedConfig`` holds them as plain JSON lists, next to the ORIGINAL
hyper-parameters a family's config keeps (``hidden_size`` stays the dense width: the fused
norms still divide by it), and builds a family's config from a dense config.json and a
SlicingConfig (``from_base_and_slicing``). ``SlicedRotaryConfig`` adds what the families with
rotary position embeddings share. The family configs (``configuration_sliced_<family>.py``)
subclass one of them and add only their own fields.

Portable by design: this file imports only the stdlib and transformers, and is copied verbatim
into exported model directories as remote code. It works with transformers 4.41 (SliceGPT's
pin) and with transformers 5.x.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PretrainedConfig
from transformers.activations import ACT2FN

# SliceGPT replaces every norm by a weightless RMS normalisation with this epsilon
# (slicegpt.modules.RMSN), whatever epsilon the base model had.
SLICEGPT_FUSED_NORM_EPS = 1e-5

WIDTH_FIELDS = (
    "embedding_dimension",
    "attention_input_dimensions",
    "attention_output_dimensions",
    "mlp_input_dimensions",
    "mlp_output_dimensions",
    "lm_head_dimension",
)

# A per-layer width field as the constructor takes it: a list, a SlicingConfig ``{"0": 96, ...}`` dict, or None.
LayerWidths = list[int] | Mapping[Any, int] | None


# RoPE scaling types whose ``factor`` the rotary embedding divides by: it must be a positive number.
_FACTOR_SCALINGS = ("linear", "dynamic", "llama3")


def require_positive(**sizes: Any) -> None:
    """Refuse (ValueError naming each) sizes that are not positive whole numbers; None is left alone."""
    bad = [
        f"{name} {value!r}"
        for name, value in sizes.items()
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1)
    ]
    if bad:
        raise ValueError(f"{', '.join(bad)}: each must be a positive whole number")


def require_activation(name: str, value: Any) -> None:
    """Refuse (ValueError) an activation transformers does not know."""
    if not isinstance(value, str) or value not in ACT2FN:
        raise ValueError(f"{name} {value!r} is not an activation transformers knows")


def normalize_rope_scaling(
    rope_scaling: Mapping[str, Any] | None, supported: tuple[str, ...], model: str, kept_apart: tuple[str, ...] = ()
) -> dict[str, Any] | None:
    """Return a RoPE scaling dict with a ``rope_type`` key, or None for plain RoPE.

    Accepts the Llama-2 era form (``{"type": "linear", "factor": 2.0}``), the later form
    (``{"rope_type": "llama3", ...}``) and transformers 5.x ``rope_parameters`` (which also
    carry ``rope_theta``; that key is dropped here and kept in ``config.rope_theta``, and so are
    the ``kept_apart`` keys a config holds in fields of their own). A type not in ``supported``
    is refused in a sentence naming the ``model``.
    """
    if not rope_scaling:
        return None
    dropped = ("rope_theta", *kept_apart)
    scaling = {key: value for key, value in dict(rope_scaling).items() if key not in dropped}
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type == "default":
        return None
    if rope_type not in supported:
        raise ValueError(
            f"RoPE scaling type {rope_type!r} is not supported by the sliced {model} model; "
            f"supported: {', '.join(supported)}"
        )
    factor = scaling.get("factor")
    usable = isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 0
    if rope_type in _FACTOR_SCALINGS and not usable:
        raise ValueError(f"RoPE scaling {rope_type!r} needs a positive 'factor', not {factor!r}")
    return {"rope_type": rope_type, **scaling}


def rope_theta_of(config: Mapping[str, Any], default: float = 10000.0) -> float:
    """``rope_theta`` of a config dict, 4.x style or inside 5.x ``rope_parameters``."""
    rope_theta = config.get("rope_theta")
    rope_parameters = config.get("rope_parameters")
    if rope_theta is None and isinstance(rope_parameters, Mapping):
        rope_theta = rope_parameters.get("rope_theta")
    return float(rope_theta) if rope_theta is not None else default


def layer_list(values: Mapping[Any, int] | list[int] | None, num_layers: int, default: int, name: str) -> list[int]:
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


def widths_from_slicing(
    slicing_config: Mapping[str, Any], num_layers: int, hidden_size: int, parallel_blocks: bool
) -> dict[str, Any]:
    """The width fields (``WIDTH_FIELDS``) a SliceGPT SlicingConfig dict describes.

    Missing entries fall back to ``const_dimension``, else the dense width. SliceGPT leaves the
    head unsliced unless ``do_slice_head``, so the last layer then outputs ``hidden_size``. With
    parallel blocks the SlicingConfig records no attention output and no MLP input widths: they
    are the layer's output and input widths.
    """
    const_dim = slicing_config.get("const_dimension")
    embedding_dims = slicing_config.get("embedding_dimensions") or {}
    embedding_dim = next(iter(embedding_dims.values()), None) if embedding_dims else const_dim

    def widths(key: str, fallback: list[int] | None = None) -> list[int]:
        values = slicing_config.get(key) or None
        if values is None and fallback is not None:
            return list(fallback)
        return layer_list(values, num_layers, const_dim or hidden_size, key)

    mlp_output = widths("mlp_output_dimensions")
    head = slicing_config.get("head_dimension")
    if head is None:
        head = const_dim if slicing_config.get("do_slice_head") else hidden_size
        if not slicing_config.get("mlp_output_dimensions"):
            mlp_output[-1] = int(head)
    attention_input = widths("attention_input_dimensions")
    return {
        "embedding_dimension": int(embedding_dim or hidden_size),
        "attention_input_dimensions": attention_input,
        "attention_output_dimensions": widths("attention_output_dimensions", mlp_output if parallel_blocks else None),
        "mlp_input_dimensions": widths("mlp_input_dimensions", attention_input if parallel_blocks else None),
        "mlp_output_dimensions": mlp_output,
        "lm_head_dimension": int(head),
    }


class _KeywordConfig(PretrainedConfig):
    """``PretrainedConfig`` constructed the way transformers constructs a subclass without an ``__init__``.

    transformers 5.x makes configs strict dataclasses: ``PretrainedConfig.__init__`` runs the
    ``validate_*`` checks, while a subclass that defines no ``__init__`` gets one that takes any
    keyword argument and runs none. The sliced configs are built the second way (they check their
    own fields); ``SlicedConfig.__init__`` reaches it through this class. Under transformers 4.x
    this is plain ``PretrainedConfig``.
    """


class SlicedConfig(_KeywordConfig):
    """The fields of a SliceGPT-sliced model that every family has (subclassed once per family).

    Dense fields, defaulting to the family's dense config (its ``dense_defaults``): ``vocab_size``,
    ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``max_position_embeddings``; and,
    alike in every family, ``initializer_range``, ``fused_norm_eps`` (SliceGPT's norm epsilon),
    ``use_cache`` and ``tie_word_embeddings`` (False: see ``fields_from_base``). The token ids are
    PretrainedConfig's: each family's ``__init__`` names them, with its dense config's defaults.

    Width fields (all default to the dense ``hidden_size``):

    - ``embedding_dimension``: columns of the embeddings (the residual width entering layer 0).
    - ``attention_input_dimensions[i]``: input width of layer i's attention (= rows of its ``attn_shortcut_Q``).
    - ``attention_output_dimensions[i]``: output width of the attention's output projection.
    - ``mlp_input_dimensions[i]``: input width of the MLP.
    - ``mlp_output_dimensions[i]``: output width of the MLP (the layer's output width).
    - ``lm_head_dimension``: input width of ``lm_head`` (SliceGPT's ``head_dimension``).

    With ``parallel_blocks`` (Phi-2) attention and MLP both read the layer's input and their
    outputs are summed with one shortcut, so ``mlp_input == attention_input`` and
    ``attention_output == mlp_output``, layer by layer.

    Slicing facts: ``do_slice_head`` (SliceGPT sliced the head too), ``sparsity`` and ``round_interval``.
    """

    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    parallel_blocks = False
    # Set by each family: its name in messages, its dense config's defaults for the fields set by the
    # shared classes, and whether that dense config ties lm_head to the embeddings unless told.
    family_name = ""
    dense_defaults = {}
    dense_tie_word_embeddings = False

    def __init__(
        self,
        *,
        vocab_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        num_attention_heads: int,
        max_position_embeddings: int,
        initializer_range: float = 0.02,
        fused_norm_eps: float = SLICEGPT_FUSED_NORM_EPS,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        embedding_dimension: int | None = None,
        attention_input_dimensions: LayerWidths = None,
        attention_output_dimensions: LayerWidths = None,
        mlp_input_dimensions: LayerWidths = None,
        mlp_output_dimensions: LayerWidths = None,
        lm_head_dimension: int | None = None,
        do_slice_head: bool = False,
        sparsity: float | None = None,
        round_interval: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Set the shared fields, then PretrainedConfig's (the token ids among them, in ``kwargs``).

        A family's ``__init__`` sets its own fields first and passes the rest on, over its ``dense_defaults``.
        Sizes and widths that are not positive whole numbers are refused (ValueError).
        """
        require_positive(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            max_position_embeddings=max_position_embeddings,
            embedding_dimension=embedding_dimension,
            lm_head_dimension=lm_head_dimension,
        )
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.num_hidden_layers = int(num_hidden_layers)
        self.num_attention_heads = int(num_attention_heads)
        self.max_position_embeddings = int(max_position_embeddings)
        self.initializer_range = initializer_range
        self.fused_norm_eps = fused_norm_eps
        self.use_cache = use_cache
        self.embedding_dimension = int(embedding_dimension or hidden_size)
        for name, values in (
            ("attention_input_dimensions", attention_input_dimensions),
            ("attention_output_dimensions", attention_output_dimensions),
            ("mlp_input_dimensions", mlp_input_dimensions),
            ("mlp_output_dimensions", mlp_output_dimensions),
        ):
            setattr(self, name, layer_list(values, self.num_hidden_layers, self.hidden_size, name))
            require_positive(**{f"{name}[{idx}]": width for idx, width in enumerate(getattr(self, name))})
        self.lm_head_dimension = int(lm_head_dimension or hidden_size)
        self.do_slice_head = bool(do_slice_head)
        self.sparsity = sparsity
        self.round_interval = round_interval
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @classmethod
    def fields_from_base(cls, base_config: Mapping[str, Any]) -> dict[str, Any]:
        """The fields a dense config dict (its config.json) gives; each family adds its own to these.

        The sliced model never ties its embeddings: SliceGPT fuses the final norm into a copy of
        ``lm_head`` and slices both matrices independently, so ``tie_word_embeddings`` is False
        whatever the base model said (the base value, else the dense family's default, is kept in
        ``base_tie_word_embeddings``). The token ids are the base's.
        """
        return {
            "vocab_size": base_config["vocab_size"],
            "hidden_size": int(base_config["hidden_size"]),
            "num_hidden_layers": int(base_config["num_hidden_layers"]),
            "num_attention_heads": base_config["num_attention_heads"],
            "max_position_embeddings": base_config.get(
                "max_position_embeddings", cls.dense_defaults["max_position_embeddings"]
            ),
            "initializer_range": base_config.get("initializer_range", 0.02),
            "bos_token_id": base_config.get("bos_token_id"),
            "eos_token_id": base_config.get("eos_token_id"),
            "pad_token_id": base_config.get("pad_token_id"),
            "tie_word_embeddings": False,
            "base_tie_word_embeddings": bool(base_config.get("tie_word_embeddings", cls.dense_tie_word_embeddings)),
        }

    @classmethod
    def from_base_and_slicing(
        cls,
        base_config: Mapping[str, Any],
        slicing_config: Mapping[str, Any],
        **overrides: Any,
    ) -> SlicedConfig:
        """Build the config from a dense config dict (its config.json) and a SliceGPT SlicingConfig dict.

        The fields come from ``fields_from_base``, the widths and ``do_slice_head`` from the
        SlicingConfig; ``overrides`` (e.g. ``sparsity=0.25, round_interval=8``) win over both dicts.
        Parallel-block slicing (Phi-2 style) is refused for a family whose blocks are sequential.
        """
        fields = cls.fields_from_base(base_config)
        if slicing_config.get("parallel_blocks") and not cls.parallel_blocks:
            article = "an" if cls.family_name[:1] in "AEIOU" else "a"
            raise ValueError(f"parallel-block slicing (Phi-2 style) is not {article} {cls.family_name} layout")
        widths = widths_from_slicing(
            slicing_config, fields["num_hidden_layers"], fields["hidden_size"], parallel_blocks=cls.parallel_blocks
        )
        do_slice_head = bool(slicing_config.get("do_slice_head", False))
        return cls(**{**fields, **widths, "do_slice_head": do_slice_head, **overrides})

    def residual_width_errors(self) -> list[str]:
        """Inconsistencies between consecutive widths of the residual stream (empty when consistent).

        Layer i reads the stream through its attention, then the stream becomes
        ``attention_output_dimensions[i]`` wide; the MLP reads that, then the stream becomes
        ``mlp_output_dimensions[i]`` wide. With parallel blocks both read the layer's input.
        """
        errors: list[str] = []
        width, source = self.embedding_dimension, "embedding_dimension"
        for idx in range(self.num_hidden_layers):
            layer_input, input_source = width, source
            for reader, writer in (
                ("attention_input_dimensions", "attention_output_dimensions"),
                ("mlp_input_dimensions", "mlp_output_dimensions"),
            ):
                if self.parallel_blocks and reader == "mlp_input_dimensions":
                    width, source = layer_input, input_source
                got = getattr(self, reader)[idx]
                if got != width:
                    errors.append(f"{reader}[{idx}] is {got} but the residual stream there is {width} wide ({source})")
                width, source = getattr(self, writer)[idx], f"{writer}[{idx}]"
            if self.parallel_blocks and self.attention_output_dimensions[idx] != width:
                errors.append(
                    f"attention_output_dimensions[{idx}] is {self.attention_output_dimensions[idx]} but the parallel "
                    f"MLP writes {width} ({source})"
                )
        if self.lm_head_dimension != width:
            errors.append(
                f"lm_head_dimension is {self.lm_head_dimension} but the last layer outputs {width} ({source})"
            )
        return errors


class SlicedRotaryConfig(SlicedConfig):
    """The fields the families with rotary position embeddings share (Llama, Phi-2, Phi-3).

    ``intermediate_size``, ``hidden_act`` (both defaulting to the family's ``dense_defaults``),
    ``attention_dropout``, the attention heads (``num_key_value_heads`` defaults to
    ``num_attention_heads``, ``head_dim`` to ``hidden_size // num_attention_heads``) and RoPE.

    RoPE: transformers 5.x turned ``config.rope_scaling`` into a deprecated alias of
    ``rope_parameters``. To behave the same under both versions these configs store the scaling
    dict under ``rotary_scaling`` (with a ``rope_type`` key; None for plain RoPE) and
    ``rope_theta`` on its own; ``rope_scaling=`` (4.x) and ``rope_parameters=`` (5.x, which also
    carries ``rope_theta``) are accepted as constructor arguments. A family sets the scaling types
    it implements (``supported_rope_types``) and the keys of ``rope_parameters`` it keeps in fields
    of its own (``rope_fields_apart``).
    """

    supported_rope_types = ("default",)
    rope_fields_apart = ()

    def __init__(
        self,
        *,
        hidden_size: int,
        num_attention_heads: int,
        intermediate_size: int,
        hidden_act: str,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        attention_dropout: float = 0.0,
        rope_theta: float | None = None,
        rotary_scaling: Mapping[str, Any] | None = None,
        rope_scaling: Mapping[str, Any] | None = None,
        rope_parameters: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Set the rotary families' fields, then ``SlicedConfig``'s."""
        require_positive(
            hidden_size=hidden_size,
            num_attention_heads=num_attention_heads,
            intermediate_size=intermediate_size,
            num_key_value_heads=num_key_value_heads,
            head_dim=head_dim,
        )
        if num_attention_heads % (num_key_value_heads or num_attention_heads):
            raise ValueError(f"num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads")
        require_activation("hidden_act", hidden_act)
        self.rope_theta = rope_theta_of({"rope_theta": rope_theta, "rope_parameters": rope_parameters})
        self.rotary_scaling = normalize_rope_scaling(
            rotary_scaling or rope_scaling or rope_parameters,
            self.supported_rope_types,
            self.family_name,
            self.rope_fields_apart,
        )
        self.intermediate_size = int(intermediate_size)
        self.num_key_value_heads = int(num_key_value_heads or num_attention_heads)
        self.head_dim = int(head_dim or hidden_size // num_attention_heads)
        self.hidden_act = hidden_act
        self.attention_dropout = attention_dropout
        super().__init__(hidden_size=hidden_size, num_attention_heads=num_attention_heads, **kwargs)

    @classmethod
    def fields_from_base(cls, base_config: Mapping[str, Any]) -> dict[str, Any]:
        """``SlicedConfig``'s fields of a dense config dict plus the rotary families' (see the class docstring)."""
        return {
            **super().fields_from_base(base_config),
            "intermediate_size": base_config["intermediate_size"],
            "num_key_value_heads": base_config.get("num_key_value_heads"),
            "hidden_act": base_config.get("hidden_act", cls.dense_defaults["hidden_act"]),
            "rope_theta": rope_theta_of(base_config),
            "rotary_scaling": base_config.get("rope_scaling") or base_config.get("rope_parameters"),
        }
