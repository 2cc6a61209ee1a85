"""Test stand-in for the official ``slicegpt.model_adapter`` (microsoft/TransformerCompression).

Reproduces, for the Llama case only:
- ``SlicingConfig``: the dataclass whose JSON run_slicegpt writes next to the ``.pt``
  (``{model}_{sparsity}.json``); ``from_json_string`` turns the numeric string keys of its
  per-layer dicts back into ints.
- ``ModelAdapter.from_model``: the adapter is picked by asking every concrete subclass in
  turn (depth first over ``__subclasses__``); each one decides by the model NAME alone
  (see ``adapters.llama_adapter``). When none accepts it, it raises
  ``NotImplementedError("{model_path} is neither a Hugging Face model nor a supported local model.")``
  like the official one -- so a local directory given as the model name fails.
- ``convert_layer_to_compressed_and_register_buffers``: registers ``mlp_shortcut_Q`` then
  ``attn_shortcut_Q`` as (empty) parameters, so state-dict keys and order match the ``.pt``.
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
    """Access to one transformer block's norms and linear layers."""

    @property
    @abstractmethod
    def layer(self) -> Module: ...


class ModelAdapter(ABC):
    """Wraps a model; ``slicing_conf`` is set by ``hf_utils.load_sliced_model``."""

    parallel_blocks = False

    def __init__(self) -> None:
        self.slicing_conf: SlicingConfig | None = None

    @property
    @abstractmethod
    def model(self) -> Module: ...

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
