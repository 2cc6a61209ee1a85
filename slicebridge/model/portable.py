"""The portable model of each family, found through the family table: config and model classes, building.

``families`` names each family's ``configuration_sliced_<key>`` / ``modeling_sliced_<key>``
modules and classes; this module imports them on demand, so a caller that has a family, a
sliced config or a config dict gets the right class without knowing the families. Not shipped
as remote code (an export carries its family's modules themselves).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .families import FAMILIES, Family

_BY_SLICED_TYPE = {family.sliced_model_type: family for family in FAMILIES}

if TYPE_CHECKING:
    import torch

    from .configuration_sliced import SlicedConfig
    from .sliced_decoder import SlicedForCausalLM


def config_class(family: Family) -> type[SlicedConfig]:
    module = importlib.import_module(f"{__package__}.{family.config_module}")
    return getattr(module, family.config_class)


def model_class(family: Family) -> type[SlicedForCausalLM]:
    module = importlib.import_module(f"{__package__}.{family.modeling_module}")
    return getattr(module, family.model_class)


def family_of(config: SlicedConfig | Mapping[str, Any]) -> Family:
    """The family of a sliced config object or dict (by its ``model_type``, ``sliced_<key>``)."""
    model_type = config.get("model_type") if isinstance(config, Mapping) else config.model_type
    if not isinstance(model_type, str):
        raise ValueError("the config names no model_type")
    family = _BY_SLICED_TYPE.get(model_type)  # a dense model's type ("llama") is not a sliced one's ("sliced_llama")
    if family is None:
        raise ValueError(f"model_type {model_type!r} is not a sliced model family slicebridge knows")
    return family


def config_from_dict(data: Mapping[str, Any]) -> SlicedConfig:
    """The sliced config a ``config.json`` dict (``model_type`` included) describes."""
    fields = dict(data)
    family = family_of(fields)
    fields.pop("model_type", None)
    return config_class(family)(**fields)


def sliced_config(family: Family, base_config: Mapping[str, Any], slicing_config: Mapping[str, Any], **overrides):
    """The family's sliced config from a dense ``config.json`` dict and a SlicingConfig dict."""
    return config_class(family).from_base_and_slicing(base_config, slicing_config, **overrides)


def build_model(
    state_dict: Mapping[str, torch.Tensor],
    config: SlicedConfig,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> SlicedForCausalLM:
    """The portable model of ``config``'s family around ``state_dict``'s tensors (no random init)."""
    from .sliced_decoder import build_sliced_model

    return build_sliced_model(model_class(family_of(config)), state_dict, config, dtype=dtype, device=device)
