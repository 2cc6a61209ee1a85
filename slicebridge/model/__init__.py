"""The portable sliced model: torch + transformers only, runs in the base env and the slicegpt env.

- ``families``: the model families SliceGPT slices (Llama, OPT, Phi-2, Phi-3), as one table.
- ``sliced_decoder`` / ``configuration_sliced`` and, per family, ``modeling_sliced_<family>`` /
  ``configuration_sliced_<family>``: transformers causal LMs for SliceGPT-sliced models (work with
  transformers 4.41 and 5.x; copied verbatim into exported directories as remote code).
  ``portable`` finds a family's classes and builds a model from a state dict without random init.
- ``checkpoint``: ``read_checkpoint`` finds, loads and validates what run_slicegpt wrote.
- ``errors``: the ``CheckpointError`` family the reader raises.
- ``export``: ``export_model`` writes the pickle-free Hugging Face directory (safetensors, config,
  remote code, tokenizer, model card); ``load_export`` reads it back without remote code.
- ``loading``: ``load``, the dispatch ``slicebridge.load`` re-exports (a ``.bin`` or an export dir).
- ``atomic`` writes every output whole or not at all; ``request_scope`` is what a served request
  asks of the work done for it (notice cancellation, a last check before an output appears).

Names are imported on first use, so ``import slicebridge.model`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FAMILIES": "families",
    "Family": "families",
    "SlicedConfig": "configuration_sliced",
    "SlicedForCausalLM": "sliced_decoder",
    "SlicedParameterCount": "sliced_decoder",
    "count_sliced_parameters": "sliced_decoder",
    "build_model": "portable",
    "SlicedLlamaConfig": "configuration_sliced_llama",
    "SlicedLlamaModel": "modeling_sliced_llama",
    "SlicedLlamaForCausalLM": "modeling_sliced_llama",
    "SliceGPTCheckpoint": "checkpoint",
    "SlicedWidths": "checkpoint",
    "read_checkpoint": "checkpoint",
    "sliced_width": "checkpoint",
    "ExportError": "export",
    "ExportSummary": "export",
    "export_model": "export",
    "load_export": "export",
    "load": "loading",
    "CheckpointError": "errors",
    "CheckpointNotFound": "errors",
    "AmbiguousCheckpoint": "errors",
    "NotASliceGPTCheckpoint": "errors",
    "TruncatedCheckpoint": "errors",
    "BaseConfigMissing": "errors",
    "BaseConfigMismatch": "errors",
    "SlicingConfigMismatch": "errors",
    "SparsityMismatch": "errors",
    "UnsupportedArchitecture": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'slicebridge.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
