"""What a ``.bin`` made the seed's way holds, read from its pickle's opcodes: nothing is unpickled.

The seed pickled the slicegpt model object with dill: a class made on the fly
(``UninitializedLlamaForCausalLM``, a subclass of transformers' ``LlamaForCausalLM``),
its modules, their parameters (``torch._utils._rebuild_tensor_v2`` records that name a
storage in the zip, its dtype, offset, shape and stride) and the ``LlamaConfig``'s
attributes. ``pickle_scan.read_inert`` gives that graph with every call left undone;
here we walk it for the tensor shapes and the base config, and derive the same facts
``info`` gives for a checkpoint. Unpickling the file would run code it carries (dill
pickles functions' bytecode), so ``info`` and ``verify`` only ever read it this way.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slicebridge.errors import SlicebridgeError
from slicebridge.model.facts import ArtifactInfo
from slicebridge.model.guards import require_regular_file
from slicebridge.model.pickle_scan import Call, Global, Persistent, UnreadablePickle, read_inert, referenced_globals

_STORAGE_DTYPES = {
    "HalfStorage": "float16",
    "FloatStorage": "float32",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
}
_TENSOR_REBUILDERS = {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"}
_PARAMETER_REBUILDERS = {"torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"}
_MAX_DEPTH = 32  # module nesting; a Llama is 4 deep
_MAX_CONFIG_NODES = 100_000  # values walked in a pickled config: a LlamaConfig has about a hundred
_BYTECODE = {"dill._dill._create_code", "dill._dill._create_function"}
# What the seed's files import: the model's own packages, and dill's helpers for the class it makes.
_MODEL_NAMESPACES = (
    "torch.",
    "transformers.",
    "tokenizers.",
    "slicegpt.",
    "dill._dill.",
    "collections.OrderedDict",
    "_codecs.encode",
    "__builtin__.setattr",
    "builtins.setattr",
    "copyreg._reconstructor",
)


class NotASeedModel(SlicebridgeError, ValueError):
    """The file's pickle does not hold a model object the way the seed's files do."""


@dataclass(frozen=True)
class TensorRecord:
    """A tensor as the pickle describes it: enough for widths and parameter counts."""

    shape: tuple[int, ...]
    dtype: str

    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


def _qualified(value: Any) -> str | None:
    return value.qualified if isinstance(value, Global) else None


def _tensor(value: Any) -> TensorRecord | None:
    """The shape and dtype of a pickled tensor or parameter, or None if ``value`` is not one."""
    if isinstance(value, Call) and _qualified(value.func) in _PARAMETER_REBUILDERS and value.args:
        value = value.args[0]
    if not (isinstance(value, Call) and _qualified(value.func) in _TENSOR_REBUILDERS and len(value.args) >= 3):
        return None
    storage, _offset, shape = value.args[:3]
    if not isinstance(storage, Persistent) or not isinstance(shape, tuple):
        return None
    if not all(isinstance(size, int) and size >= 0 for size in shape):
        return None
    pid = storage.pid if isinstance(storage.pid, tuple) else ()
    storage_type = _qualified(pid[1]) if len(pid) > 1 else None
    dtype = _STORAGE_DTYPES.get((storage_type or "").rpartition(".")[2], "unknown")
    return TensorRecord(tuple(shape), dtype)


def _state(obj: Any) -> dict:
    """The attribute dict BUILD would give ``obj`` (a (dict, slots) pair counts its dict)."""
    state = obj.state if isinstance(obj, Call) else None
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
        state = state[0]
    return state if isinstance(state, dict) else {}


def _entries(container: Any) -> dict:
    """A module's ``_parameters``/``_modules`` mapping: a dict, or an OrderedDict call with items."""
    if isinstance(container, dict):
        return container
    return container.items if isinstance(container, Call) else {}


def _name_set(value: Any) -> set[str]:
    """The names in a pickled set: a set, or a call building one from a list (as dill pickles sets)."""
    if isinstance(value, Call) and len(value.args) == 1:
        value = value.args[0]
    return {name for name in value if isinstance(name, str)} if isinstance(value, (set, frozenset, list)) else set()


def named_tensors(module: Any) -> dict[str, TensorRecord]:
    """``state_dict``-style names of a pickled module's parameters and persistent buffers, read off the
    graph (buffers a module registered as non-persistent, such as rotary caches, are left out, as
    ``state_dict`` leaves them out)."""
    found: dict[str, TensorRecord] = {}
    pending = [("", module, 0)]
    seen: set[int] = set()
    while pending:
        prefix, current, depth = pending.pop()
        if id(current) in seen or depth > _MAX_DEPTH:
            continue
        seen.add(id(current))
        state = _state(current)
        transient = _name_set(state.get("_non_persistent_buffers_set"))
        for kind in ("_parameters", "_buffers"):
            for name, value in _entries(state.get(kind)).items():
                record = _tensor(value)
                if record is not None and isinstance(name, str) and not (kind == "_buffers" and name in transient):
                    found[prefix + name] = record
        for name, child in reversed(list(_entries(state.get("_modules")).items())):
            if isinstance(name, str):
                pending.append((f"{prefix}{name}.", child, depth + 1))
    return found


def _class_of(obj: Any) -> tuple[str, list[str]]:
    """The class name of a pickled object (made by NEWOBJ, as objects are) and its bases' qualified names."""
    cls = obj.func if isinstance(obj, Call) and obj.new else None
    if isinstance(obj, Call) and _qualified(obj.func) == "copyreg._reconstructor" and obj.args:
        cls = obj.args[0]
    if isinstance(cls, Global):
        return cls.name, []
    if isinstance(cls, Call) and _qualified(cls.func) == "dill._dill._create_type" and len(cls.args) >= 3:
        name, bases = cls.args[1], cls.args[2]
        if not isinstance(name, str):  # never str() a structure of the file's (it may nest a million deep)
            return "", []
        return name, [b.qualified for b in bases if isinstance(b, Global)] if isinstance(bases, tuple) else []
    return "", []


def _plain(value: Any, budget: list[int] | None = None) -> bool:
    """Whether a config value is plain data (what config.json could hold), at most 8 deep.

    Walked without recursion, visiting at most ``budget[0]`` nodes (shared by the calls that pass one
    list): a value of lists that share references would otherwise cost fan-out ** depth visits.
    """
    budget = budget if budget is not None else [_MAX_CONFIG_NODES]
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        budget[0] -= 1
        if budget[0] < 0:
            return False
        if isinstance(item, (str, int, float, bool)) or item is None:
            continue
        if depth > 8:
            return False
        if isinstance(item, (list, tuple)):
            pending.extend((v, depth + 1) for v in item)
        elif isinstance(item, dict) and all(isinstance(k, str) for k in item):
            pending.extend((v, depth + 1) for v in item.values())
        else:
            return False
    return True


def _architecture(model: Any) -> str:
    name, bases = _class_of(model)
    if not name:
        what = _qualified(model.func if isinstance(model, Call) else model) or type(model).__name__
        raise NotASeedModel(f"its 'model' entry is not a pickled model object (unpickling it would call {what})")
    if bases:
        return f"{name} (slicegpt's subclass of {bases[0].rpartition('.')[2]}, pickled with dill)"
    return f"{name} (a pickled model object)"


def _code_notes(names: list[str]) -> list[str]:
    """What unpickling the file would run, said plainly (from the names its pickle imports)."""
    notes = []
    if any(n in _BYTECODE for n in names):
        notes.append(
            "it carries Python bytecode (dill-pickled functions): unpickling it runs code from the file, "
            "so info and verify only read its opcodes"
        )
    unusual = [n for n in names if not n.startswith(_MODEL_NAMESPACES)]
    if unusual:
        notes.append(
            "unpickling it would also call "
            + ", ".join(unusual[:8])
            + (f" and {len(unusual) - 8} more" if len(unusual) > 8 else "")
            + ", which a model file has no need of"
        )
    return notes


def _model_facts(info: ArtifactInfo, root: dict, path: Path) -> None:
    """Fill ``info`` with the facts of the model object in ``root['model']`` (raises what is wrong)."""
    from slicebridge.model.checkpoint import family_of_base_config, read_state_dict_widths
    from slicebridge.model.families import SUPPORTED, family_of_tensors

    model = root["model"]
    info.architecture = _architecture(model)
    budget = [_MAX_CONFIG_NODES]
    base_config = {
        k: v for k, v in _state(_state(model).get("config")).items() if isinstance(k, str) and _plain(v, budget)
    }
    seed_config = root.get("config") if isinstance(root.get("config"), dict) else {}
    sparsity = seed_config.get("sparsity", root.get("pruning_ratio"))
    round_interval = seed_config.get("round_interval")
    info.sparsity = float(sparsity) if isinstance(sparsity, (int, float)) else None
    info.round_interval = round_interval if isinstance(round_interval, int) else None
    tensors = named_tensors(model)
    # A config that says what it is must name a family we know; one that says nothing (model_type is a
    # class attribute, so a pickled config may carry neither it nor architectures) is known by its tensors.
    named = base_config.get("model_type") is not None or bool(base_config.get("architectures"))
    family = family_of_base_config(base_config, f"{path} (its model's config)") if named else family_of_tensors(tensors)
    if family is None:
        raise NotASeedModel(f"its model is not of a family SliceGPT slices ({SUPPORTED})")
    info.family = family.key
    widths = read_state_dict_widths(tensors, base_config, family, path)
    info.set_widths(widths, int(base_config["hidden_size"]))
    info.set_params(
        {
            "dense": family.dense_parameters(base_config),
            "sliced": sum(t.numel() for t in tensors.values()),
            "shortcut_q": sum(t.numel() for k, t in tensors.items() if k.endswith("_shortcut_Q")),
        }
    )
    info.dtype = tensors[family.token_embedding].dtype


def describe_seed_bin(path: str | Path) -> ArtifactInfo:
    """Facts about a seed-format ``.bin`` from its opcodes: architecture, widths, params, dtype, settings.

    Facts the pickle does not yield (not a model object, not a sliced Llama) are left empty and
    a note says why. Raises ``NotASeedModel`` only when the file is not a readable pickle at all.
    """
    from slicebridge.model.checkpoint import verify_archive_crcs
    from slicebridge.model.errors import CheckpointError

    path = require_regular_file(path, NotASeedModel, ".bin file")
    if zipfile.is_zipfile(path):
        verify_archive_crcs(path)  # a damaged record: CorruptCheckpoint naming it, not facts read from bad bytes
    try:
        root = read_inert(path)
        names = referenced_globals(path)
    except (UnreadablePickle, OSError, zipfile.BadZipFile) as exc:
        raise NotASeedModel(f"{path} is not a readable torch file: {exc}") from None
    info = ArtifactInfo(
        str(path),
        "seed-bin",
        file_bytes=path.stat().st_size,
        loader="read from the pickle's opcodes (not unpickled)",
        notes=_code_notes(names),
    )
    try:
        if not isinstance(root, dict) or "model" not in root:
            raise NotASeedModel("it does not hold the seed's dict (no 'model' entry)")
        _model_facts(info, root, path)
    except KeyError as exc:
        info.notes.insert(0, f"no model facts: the pickled config or state dict lacks {exc}")
    except (CheckpointError, TypeError, ValueError, ArithmeticError) as exc:
        info.notes.insert(0, f"no model facts: {exc}")
    return info
