"""Test stand-in for the official ``slicegpt`` package (microsoft/TransformerCompression @ 6b12cde).

NOT the real package (which is not on PyPI): a small re-implementation, used only by
slicebridge's tests, of the module tree and the behaviour that matter for LOADING a sliced
checkpoint of any of the four official families (Llama-2/3, OPT, Phi-2, Phi-3) under
transformers 4.41 -- ``hf_utils.load_sliced_model`` (old and new signatures, see
``hf_utils``), the name-based adapter choice, the ``Compressed*DecoderLayer`` classes and
``RMSN`` -- and for SLICING a dense model with the official call sequence of
``experiments/run_slicegpt.py`` (``tests/standin/run_slicegpt.py`` is its stand-in):
``config`` (device), ``data_utils`` (datasets, calibration and perplexity loaders),
``layernorm_fusion`` (replace_layers, fuse_modules), ``rotate`` (rotate_and_slice,
slice_rotated_model), ``model_utils`` (calibration signals), ``gpu_utils`` (evaluate_ppl,
distribute_model) and ``utils``. So (1) the server can load a checkpoint "through the official
loader", (2) it can slice "with the official code", and (3) a model object pickled with dill
from the real package unpickles here. Like the official ``__init__``, importing the package
registers every adapter.
"""

__version__ = "0.1.0+standin"
STANDIN = True

from .adapters.llama_adapter import LlamaModelAdapter  # noqa: E402
from .adapters.opt_adapter import OPTModelAdapter  # noqa: E402
from .adapters.phi2_adapter import Phi2ModelAdapter  # noqa: E402
from .adapters.phi3_adapter import Phi3ModelAdapter  # noqa: E402
from .data_utils import get_dataset, prepare_dataloader  # noqa: E402
from .gpu_utils import distribute_model, evaluate_ppl  # noqa: E402
from .hf_utils import get_model_and_tokenizer, load_sliced_model  # noqa: E402
from .layernorm_fusion import fuse_modules, replace_layers  # noqa: E402
from .model_adapter import LayerAdapter, ModelAdapter, SlicingConfig  # noqa: E402
from .rotate import rotate_and_slice  # noqa: E402

__all__ = [
    "adapters",
    "config",
    "data_utils",
    "gpu_utils",
    "hf_utils",
    "layernorm_fusion",
    "model_adapter",
    "model_utils",
    "modules",
    "rotate",
    "slicing_scheduler",
    "utils",
]
