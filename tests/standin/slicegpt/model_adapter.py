"""Test stand-in for the official ``slicegpt.model_adapter`` (microsoft/TransformerCompression).

Reproduces what loading and slicing a model need, for the four families the official adapters cover:
- ``SlicingConfig``: the dataclass whose JSON run_slicegpt writes next to the ``.pt``
  (``{model}_{sparsity}.json``); ``from_json_string`` turns the numeric string keys of its
  per-layer dicts back into ints.
- ``ModelAdapter.from_model``: the adapter is picked by asking every concrete subclass in
  turn (depth first over ``__subclasses__``); each one decides by the model NAME alone
  (``accepts_name``, see ``adapters``). When none accepts it, it raises
  ``NotImplementedError("{model_path} is neither a Hugging Face model nor a supported local model.")``
  like the official one -- so a local directory given as the model name fails.
- ``convert_layer_to_compressed_and_register_buffers``: registers ``mlp_shortcut_Q`` (sequential
  blocks only: a parallel block has one shortcut) then ``attn_shortcut_Q`` as (empty)
  parameters, so state-dict keys and order match the ``.pt``.
- What rotation and calibration use (``rotate``, ``model_utils``, ``gpu_utils``): a layer's
  hidden states are argument 0 of its forward and item 0 of its output
  (``hidden_states_args_position`` / ``hidden_states_output_position``), ``get_updated_args``
  swaps new hidden states into caught arguments, ``set_raw_layer_at`` puts any module (the
  calibration catcher) in a layer's place, ``should_bake_mean_into_linear`` (LayerNorm families)
  and ``no_split_module_classes`` (the original and the compressed layer class, for accelerate).
- The uninitialised model: the official defines a LOCAL class ``Uninitialized<X>ForCausalLM``
  (``<X>ForCausalLM`` with ``_init_weights`` doing nothing) inside each adapter's
  ``_from_uninitialized``, builds it in the default dtype and casts it with ``.to(dtype)`` (which
  also rounds a rotary ``inv_freq`` to fp16). dill pickles such a class BY VALUE, its method with
  the adapter module's ``__dict__`` as globals. ``uninitialized_causal_lm`` builds that class for
  any adapter with the official name, qualname
  (``<Adapter>._from_uninitialized.<locals>.Uninitialized<X>ForCausalLM``), module and globals.
What every official adapter repeats (the model and its config, width, sequence length and
``use_cache``; where its modules are, given as attribute paths; the compressed layer built from
the config and the layer index; the model built from a name, pretrained or uninitialised) lives
once here: the adapters set their family's types, module paths and name test. Config and
weights are only ever read from local files (no Hugging Face downloads).
"""

from __future__ import annotations

import copy
import inspect
import json
import sys
import types
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from operator import attrgetter
from typing import Any

import torch
from torch.nn import Module


class LayerAdapter:
    """Access to one transformer block's norms and linear layers, at the attribute paths its family sets.

    A subclass sets each as dotted attribute names from the block: ``first_layernorm_path``,
    ``second_layernorm_path`` (None where attention and MLP share the first norm),
    ``attention_input_paths``, ``attention_output_path``, ``mlp_input_paths`` and ``mlp_output_path``.
    """

    first_layernorm_path: str
    second_layernorm_path: str | None
    attention_input_paths: tuple[str, ...]
    attention_output_path: str
    mlp_input_paths: tuple[str, ...]
    mlp_output_path: str
    hidden_states_args_position = 0  # in every family's layer forward and its output tuple
    hidden_states_output_position = 0

    def __init__(self, layer: Module) -> None:
        self._layer = layer

    @property
    def layer(self) -> Module:
        return self._layer

    def get_updated_args(self, hidden_states: Any, args: tuple) -> tuple:
        """``args`` (a layer's positional arguments) with ``hidden_states`` in the hidden states' place."""
        position = self.hidden_states_args_position
        return (*args[:position], hidden_states, *args[position + 1 :])

    def get_first_layernorm(self) -> Module:
        return attrgetter(self.first_layernorm_path)(self.layer)

    def get_second_layernorm(self) -> Module | None:
        return None if self.second_layernorm_path is None else attrgetter(self.second_layernorm_path)(self.layer)

    def get_attention_inputs(self) -> list[Module]:
        return [attrgetter(path)(self.layer) for path in self.attention_input_paths]

    def get_attention_output(self) -> Module:
        return attrgetter(self.attention_output_path)(self.layer)

    def get_mlp_inputs(self) -> list[Module]:
        return [attrgetter(path)(self.layer) for path in self.mlp_input_paths]

    def get_mlp_output(self) -> Module:
        return attrgetter(self.mlp_output_path)(self.layer)


def _skip_init_weights(self, _) -> None:
    pass  # weights come from the sliced state dict


def uninitialized_causal_lm(adapter: type[ModelAdapter]) -> type:
    """The official local class of ``adapter._from_uninitialized``: its causal LM, minus weight initialisation."""
    base = adapter.causal_lm_type
    name = f"Uninitialized{base.__name__}"
    qualname = f"{adapter.__qualname__}._from_uninitialized.<locals>.{name}"
    code = _skip_init_weights.__code__.replace(co_name="_init_weights", co_qualname=f"{qualname}._init_weights")
    # The adapter module's globals, as the official's method has: a dill pickle names them ("<module> __dict__").
    init_weights = types.FunctionType(code, vars(sys.modules[adapter.__module__]))
    namespace = {"__module__": adapter.__module__, "__qualname__": qualname, "_init_weights": init_weights}
    return type(name, (base,), namespace)


class ModelAdapter(ABC):
    """Wraps a model; ``slicing_conf`` is set by ``hf_utils.load_sliced_model`` and ``rotate.rotate_and_slice``.

    Subclasses set the family's types as class attributes (``causal_lm_type``,
    ``original_layer_norm_type``, ``layer_adapter_type``, ``compressed_layer_type``;
    ``parallel_blocks`` where attention and MLP run side by side; ``should_bake_mean_into_linear``
    where the norms are LayerNorms, whose mean subtraction the fusion moves into the linears that
    write the residual stream; ``pad_with_eos`` where the tokenizer has no pad token, so
    ``post_init`` makes eos the pad token), where its modules are
    (``layers_path``, ``embedding_paths``, ``pre_head_layernorm_path``: dotted attribute names from
    the model) and which model names they accept (``accepts_name``).
    """

    causal_lm_type: type
    original_layer_norm_type: type
    layer_adapter_type: type[LayerAdapter]
    compressed_layer_type: type
    parallel_blocks = False
    should_bake_mean_into_linear = False
    pad_with_eos = False
    layers_path: str
    embedding_paths: tuple[str, ...]
    pre_head_layernorm_path: str

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

    @property
    def original_layer_type(self) -> type:
        return self.compressed_layer_type.__base__  # each compressed layer subclasses its family's layer

    @property
    def no_split_module_classes(self) -> list[str]:
        return [self.original_layer_type.__name__, self.compressed_layer_type.__name__]

    def get_layers(self) -> list[LayerAdapter]:
        return [self.layer_adapter_type(layer) for layer in attrgetter(self.layers_path)(self.model)]

    def get_raw_layer_at(self, index: int) -> Module:
        return attrgetter(self.layers_path)(self.model)[index]

    def set_raw_layer_at(self, index: int, new_layer: Module) -> None:
        attrgetter(self.layers_path)(self.model)[index] = new_layer

    def get_embeddings(self) -> list[Module]:
        return [attrgetter(path)(self.model) for path in self.embedding_paths]

    def get_pre_head_layernorm(self) -> Module:
        return attrgetter(self.pre_head_layernorm_path)(self.model)

    def get_lm_head(self) -> Module:
        return self.model.lm_head

    def compute_output_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def _new_compressed_layer(self, layer_idx: int | None) -> Module:
        return self.compressed_layer_type(self.config, layer_idx)

    def convert_layer_to_compressed(self, layer: Module, layer_idx: int | None) -> Module:
        new_layer = self._new_compressed_layer(layer_idx).to(self.config.torch_dtype)
        new_layer.load_state_dict(layer.state_dict(), strict=True)
        return new_layer

    def convert_layer_to_compressed_and_register_buffers(self, layer: Module, layer_idx: int | None) -> Module:
        new_layer = self.convert_layer_to_compressed(layer, layer_idx)
        if not self.parallel_blocks:
            new_layer.register_parameter("mlp_shortcut_Q", None)
        new_layer.register_parameter("attn_shortcut_Q", None)
        return new_layer

    def post_init(self, tokenizer) -> None:
        if self.pad_with_eos:
            tokenizer.pad_token = tokenizer.eos_token
            self.config.pad_token_id = tokenizer.pad_token_id

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
    def accepts_name(cls, model_name: str) -> bool:
        """The official adapter's test of the model name (the only thing it decides by)."""

    @classmethod
    def _from_pretrained(cls, model_name, model_path, *, dtype=torch.float16, local_files_only=False, token=None):
        if not cls.accepts_name(model_name):
            return None
        model = cls.causal_lm_type.from_pretrained(model_path, torch_dtype=dtype, token=token, local_files_only=True)
        model.config.torch_dtype = dtype
        return cls(model)

    @classmethod
    def _from_uninitialized(cls, model_name, model_path, *, dtype=torch.float16, local_files_only=False, token=None):
        if not cls.accepts_name(model_name):
            return None
        config_type = cls.causal_lm_type.config_class
        config = config_type.from_pretrained(model_path, torch_dtype=dtype, token=token, local_files_only=True)
        return cls(uninitialized_causal_lm(cls)(config).to(dtype=dtype))


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
