"""Test stand-in for the official ``slicegpt`` package (microsoft/TransformerCompression @ 6b12cde).

NOT the real package (which is not on PyPI): a small re-implementation, used only by
slicebridge's tests, of the module tree and API quirks that matter for loading a sliced
checkpoint of any of the four official families (Llama-2/3, OPT, Phi-2, Phi-3) under
transformers 4.41 -- ``hf_utils.load_sliced_model`` (old and new signatures, see
``hf_utils``), the name-based adapter choice, the ``Compressed*DecoderLayer`` classes and
``RMSN`` -- so that (1) the server can load a checkpoint "through the official loader" and
(2) a model object pickled with dill from the real package unpickles here. Like the official
``__init__``, importing the package registers every adapter.
"""

__version__ = "0.1.0+standin"
STANDIN = True

from .adapters.llama_adapter import LlamaModelAdapter  # noqa: E402
from .adapters.opt_adapter import OPTModelAdapter  # noqa: E402
from .adapters.phi2_adapter import Phi2ModelAdapter  # noqa: E402
from .adapters.phi3_adapter import Phi3ModelAdapter  # noqa: E402
from .hf_utils import fuse_modules, get_model_and_tokenizer, load_sliced_model, replace_layers  # noqa: E402
from .model_adapter import LayerAdapter, ModelAdapter, SlicingConfig  # noqa: E402

__all__ = ["hf_utils", "model_adapter", "modules", "slicing_scheduler", "adapters"]
