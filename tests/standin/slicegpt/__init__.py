"""Test stand-in for the official ``slicegpt`` package (microsoft/TransformerCompression @ 6b12cde).

NOT the real package (which is not on PyPI): a small re-implementation, used only by
slicebridge's tests, of the module tree and API quirks that matter for loading a sliced
Llama checkpoint under transformers 4.41 -- ``hf_utils.load_sliced_model`` (old and new
signatures, see ``hf_utils``), the name-prefix adapter choice, ``CompressedLlamaDecoderLayer``
and ``RMSN`` -- so that (1) the server can load a checkpoint "through the official loader"
and (2) a model object pickled with dill from the real package unpickles here. Like the
official ``__init__``, importing the package registers the Llama adapter.
"""

__version__ = "0.1.0+standin"
STANDIN = True

from .adapters.llama_adapter import LlamaModelAdapter  # noqa: E402
from .hf_utils import get_model_and_tokenizer, load_sliced_model  # noqa: E402
from .model_adapter import LayerAdapter, ModelAdapter, SlicingConfig  # noqa: E402

__all__ = ["hf_utils", "model_adapter", "modules", "slicing_scheduler", "adapters"]
