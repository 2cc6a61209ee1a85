"""What every sliced family's config shares: SliceGPT's per-layer widths of the residual stream.

SliceGPT rotates a model's residual stream and slices it to a smaller width, so each layer can
have its own widths. ``SlicedConfig`` holds them as plain JSON lists, next to the ORIGINAL
hyper-parameters a family's config keeps (``hidden_size`` stays the dense width: the fused
norms still divide by it). The family configs (``configuration_sliced_<family>.py``) subclass
it and add their own fields and their ``from_base_and_slicing`` constructor.

Portable by design: this file imports only the stdlib and transformers, and is copied verbatim
into exported model directories as remote code. It works with transformers 4.41 (SliceGPT's
pin) and with transformers 5.x.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PretrainedConfig

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


def normalize_rope_scaling(
    rope_scaling: Mapping[str, Any] | None, supported: tuple[str, ...], model: str
) -> dict[str, Any] | None:
    """Return a RoPE scaling dict with a ``rope_type`` key, or None for plain RoPE.

    Accepts the Llama-2 era form (``{"type": "linear", "factor": 2.0}``), the later form
    (``{"rope_type": "llama3", ...}``) and transformers 5.x ``rope_parameters`` (which also
    carry ``rope_theta``; that key is dropped here and kept in ``config.rope_theta``). A type
    not in ``supported`` is refused in a sentence naming the ``model``.
    """
    if not rope_scaling:
        return None
    scaling = {key: value for key, value in dict(rope_scaling).items() if key != "rope_theta"}
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type == "default":
        return None
    if rope_type not in supported:
        raise ValueError(
            f"RoPE scaling type {rope_type!r} is not supported by the sliced {model} model; "
            f"supported: {', '.join(supported)}"
        )
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


class SlicedConfig(PretrainedConfig):
    """The widths of a SliceGPT-sliced model (subclassed once per family).

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
    """

    parallel_blocks = False

    def init_widths(
        self,
        *,
        hidden_size: int,
        num_layers: int,
        embedding_dimension: int | None = None,
        attention_input_dimensions: list[int] | Mapping[Any, int] | None = None,
        attention_output_dimensions: list[int] | Mapping[Any, int] | None = None,
        mlp_input_dimensions: list[int] | Mapping[Any, int] | None = None,
        mlp_output_dimensions: list[int] | Mapping[Any, int] | None = None,
        lm_head_dimension: int | None = None,
        do_slice_head: bool = False,
        sparsity: float | None = None,
        round_interval: int | None = None,
    ) -> None:
        """Set the width fields and the slicing facts (called by each family's ``__init__``)."""
        self.embedding_dimension = int(embedding_dimension or hidden_size)
        for name, values in (
            ("attention_input_dimensions", attention_input_dimensions),
            ("attention_output_dimensions", attention_output_dimensions),
            ("mlp_input_dimensions", mlp_input_dimensions),
            ("mlp_output_dimensions", mlp_output_dimensions),
        ):
            setattr(self, name, layer_list(values, num_layers, hidden_size, name))
        self.lm_head_dimension = int(lm_head_dimension or hidden_size)
        self.do_slice_head = bool(do_slice_head)
        self.sparsity = sparsity
        self.round_interval = round_interval

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
