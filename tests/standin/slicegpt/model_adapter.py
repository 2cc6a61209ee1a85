"""Test stand-in for the official ``slicegpt.model_adapter`` (microsoft/TransformerCompression).

Reproduces what loading a sliced model needs, for the four families the official adapters cover:
- ``SlicingConfig``: the dataclass whose JSON run_slicegpt writes next to the ``.pt``
  (``{model}_{sparsity}.json``); ``from_json_string`` turns the numeric string keys of its
  per-layer dicts back into ints.
- ``ModelAdapter.from_model``: the adapter is picked by asking every concrete subclass in
  turn (depth first over ``__subclasses__``); each one decides by the model NAME alone
  (see ``adapters``). When none accepts it, it raises
  ``NotImplementedError("{model_path} is neither a Hugging Face model nor a supported local model.")``
  like the official one -- so a local directory given as the model name fails.
- ``convert_layer_to_compressed_and_register_buffers``: registers ``mlp_shortcut_Q`` (sequential
  blocks only: a parallel block has one shortcut) then ``attn_shortcut_Q`` as (empty)
  parameters, so state-dict keys and order match the ``.pt``.
- What every official adapter repeats (the model, its config, width, sequence length and
  ``use_cache``; the compressed layer built from the config and the layer index) lives once in
  ``ModelAdapter`` here; the adapters add their family's module paths and name test.
Only what loading a sliced model needs is here (no rotation, no calibration).
"""

from __future__ import annotations

import copy
import inspect
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.nn import Module


class LayerAdapter(ABC):
    """Access to one transformer block's norms and linear layers (the getters are per family)."""

    def __init__(self, layer: Module) -> None:
        self._layer = layer

    @property
    def layer(self) -> Module:
        return self._layer

    @abstractmethod
    def get_first_layernorm(self) -> Module: ...

    @abstractmethod
    def get_second_layernorm(self) -> Module | None: ...

    @abstractmethod
    def get_attention_inputs(self) -> list[Module]: ...

    @abstractmethod
    def get_attention_output(self) -> Module: ...

    @abstractmethod
    def get_mlp_inputs(self) -> list[Module]: ...

    @abstractmethod
    def get_mlp_output(self) -> Module: ...


class ModelAdapter(ABC):
    """Wraps a model; ``slicing_conf`` is set by ``hf_utils.load_sliced_model``.

    Subclasses set the family's types as class attributes (``parallel_blocks``,
    ``original_layer_type``, ``original_layer_norm_type``, ``layer_adapter_type``,
    ``compressed_layer_type``, ``config_type``) and say where its modules are.
    """

    parallel_blocks = False

    def __init__(self, model: Module) -> None:
        self._model = model
        self.slicing_conf: SlicingConfig | None = None

    @property
    def model(self) -> Module:
        return self._model

    @model.setter
    def model(self, value: Module) -> None:  # the official assigns the PEFT wrapper here
        self._model = value

    @property
    def config(self):
        return self._model.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def seqlen(self) -> int:
        return self.config.max_position_embeddings

    @property
    def use_cache(self) -> bool:
        return self.config.use_cache

    @use_cache.setter
    def use_cache(self, value: bool) -> None:
        self.config.use_cache = value

    def compute_output_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def convert_layer_to_compressed(self, layer: Module, layer_idx: int | None) -> Module:
        new_layer = self.compressed_layer_type(self.config, layer_idx).to(self.config.torch_dtype)
        new_layer.load_state_dict(layer.state_dict(), strict=True)
        return new_layer

    def convert_layer_to_compressed_and_register_buffers(self, layer: Module, layer_idx: int | None) -> Module:
        new_layer = self.convert_layer_to_compressed(layer, layer_idx)
        if not self.parallel_blocks:
            new_layer.register_parameter("mlp_shortcut_Q", None)
        new_layer.register_parameter("attn_shortcut_Q", None)
        return new_layer

    def post_init(self, tokenizer) -> None:
        pass

    @classmethod
    def from_model(
        cls,
        model_name: str,
        model_path: str,
        *,
        model_type: str = "pretrained",
        dtype: torch.dtype = torch.float16,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> ModelAdapter:
        def candidates(klass):
            for sub in klass.__subclasses__():
                yield from candidates(sub)
            if not inspect.isabstract(klass):
                yield klass

        for klass in candidates(cls):
            if model_type == "pretrained":
                adapter = klass._from_pretrained(
                    model_name, model_path, dtype=dtype, local_files_only=local_files_only, token=token
                )
            elif model_type == "uninitialized":
                adapter = klass._from_uninitialized(
                    model_name, model_path, dtype=dtype, local_files_only=local_files_only, token=token
                )
            else:
                raise ValueError(f"Unknown model type: {model_type}")
            if adapter is not None:
                return adapter
        raise NotImplementedError(f"{model_path} is neither a Hugging Face model nor a supported local model.")

    @classmethod
    @abstractmethod
    def _from_pretrained(cls, model_name, model_path, *, dtype, local_files_only, token) -> ModelAdapter | None: ...

    @classmethod
    @abstractmethod
    def _from_uninitialized(cls, model_name, model_path, *, dtype, local_files_only, token) -> ModelAdapter | None: ...


def _int_keys(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    if value and all(isinstance(k, str) and k.isnumeric() for k in value):
        return {int(k): v for k, v in value.items()}
    return {k: _int_keys(v) for k, v in value.items()}


@dataclass
class SlicingConfig:
    """Per-layer sliced widths, as saved by run_slicegpt (same field names as the official)."""

    hidden_size: int = 0
    layers_num: int = 0
    do_slice_head: bool = False
    parallel_blocks: bool = False
    embedding_dimensions: dict[int, int] = field(default_factory=dict)
    attention_input_dimensions: dict[int, int] = field(default_factory=dict)
    attention_output_dimensions: dict[int, int] = field(default_factory=dict)
    mlp_input_dimensions: dict[int, int] = field(default_factory=dict)
    mlp_output_dimensions: dict[int, int] = field(default_factory=dict)
    head_dimension: int | None = None
    const_dimension: int | None = None

    @staticmethod
    def from_dict(d: dict) -> SlicingConfig:
        return SlicingConfig(**_int_keys(d))

    @staticmethod
    def from_json_string(json_str: str) -> SlicingConfig:
        return SlicingConfig.from_dict(json.loads(json_str))

    def to_dict(self) -> dict:
        self.embedding_dimensions = dict(self.embedding_dimensions)
        return asdict(self)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict())

    def clone(self) -> SlicingConfig:
        return copy.deepcopy(self)
