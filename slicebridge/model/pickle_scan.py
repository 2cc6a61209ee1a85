"""Reading a torch ``.bin``'s pickle without unpickling it: what it would import, and what it holds.

``pickletools.genops`` walks the pickle's opcodes; nothing in the file is imported or
called. Two readings are built on it:

- ``referenced_globals``: every ``GLOBAL`` / ``STACK_GLOBAL`` / ``INST`` target (what ``OBJ``,
  ``REDUCE`` and ``NEWOBJ`` call is pushed by one of those), enough to tell in the
  caller's env why a ``.bin`` made the seed's way will not load here (``diagnose_seed_bin``:
  the three failures measured on the shared fixture). Whether a named class still exists
  is looked up without importing anything: ``find_spec`` of the top-level package, then a
  search of the module's source text.
- ``read_inert``: the pickle's object graph with every call left undone. Classes and
  functions stay ``Global`` names, calls stay ``Call`` records (with the state ``BUILD``
  would give them), tensor storages stay ``Persistent`` ids. ``model.seed_bin`` reads the
  seed's model object out of it.
"""

from __future__ import annotations

import importlib.util
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slicebridge.errors import SlicebridgeError
from slicebridge.model import request_scope
from slicebridge.model.guards import require_regular_file

MAX_PICKLE_BYTES = 256 * 1024**2  # the seed's data.pkl for an 8B model is a few MB
# A compressed data.pkl (torch.save stores it uncompressed) may inflate this much, and no more.
MAX_INFLATION = 16
MIN_INFLATED_LIMIT = 16 * 1024**2
# The seed's pickle of an 8B model is well under 100k opcodes; bounds the time a hostile file costs.
MAX_PICKLE_OPS = 2_000_000
_CANCEL_CHECK_EVERY = 1 << 16
# How deep a dict key or set item may nest before the reader drops it (hashing deeper ones recurses in C).
_MAX_KEY_DEPTH = 16

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING"}
_MEMO_PUT = {"BINPUT", "LONG_BINPUT", "PUT"}
_MEMO_GET = {"BINGET", "LONG_BINGET", "GET"}


class UnreadablePickle(SlicebridgeError, ValueError):
    """The file is not a pickle (or torch zip of one) that can be read op by op."""


def pickle_bytes(path: str | Path) -> bytes:
    """The pickle stream of a torch zip file (``*/data.pkl``), or the file itself if it is a raw pickle."""
    path = require_regular_file(path, UnreadablePickle)  # a FIFO would block the reader forever
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            infos = [i for i in archive.infolist() if i.filename.endswith("data.pkl")]
            if not infos:
                raise UnreadablePickle(f"{path} is a zip file without a data.pkl: not a torch file")
            record = infos[0]
            limit = MAX_PICKLE_BYTES
            if record.compress_type != zipfile.ZIP_STORED:  # a deflate bomb costs its inflated size in opcodes
                limit = min(limit, max(MIN_INFLATED_LIMIT, MAX_INFLATION * record.compress_size))
            with archive.open(record) as stream:
                data = stream.read(limit + 1)
    else:
        limit = MAX_PICKLE_BYTES
        with path.open("rb") as stream:
            data = stream.read(limit + 1)
    if len(data) > limit:
        raise UnreadablePickle(f"{path}'s pickle is over {limit >> 20} MiB: not a model .bin")
    return data


def _ops(data: bytes):
    """The pickle's opcodes, at most ``MAX_PICKLE_OPS``; a served request's cancellation is noticed as they go."""
    try:
        for count, op in enumerate(pickletools.genops(data)):
            if count >= MAX_PICKLE_OPS:
                raise UnreadablePickle(f"the pickle has over {MAX_PICKLE_OPS:,} opcodes: not a model .bin")
            if count % _CANCEL_CHECK_EVERY == 0:
                request_scope.check_cancelled()
            yield op
    except ValueError as exc:
        if isinstance(exc, UnreadablePickle):
            raise
        raise UnreadablePickle(f"not a readable pickle: {exc}") from None


def referenced_globals(path: str | Path) -> list[str]:
    """Every ``module.name`` the pickle would import, in order of first use."""
    found: dict[str, None] = {}
    memo: dict[int, str | None] = {}
    last_values: list[str | None] = []  # the most recent pushed values, strings or None
    next_memo = 0
    for opcode, arg, _pos in _ops(pickle_bytes(path)):
        name = opcode.name
        if name in _STRING_OPS:
            last_values.append(arg if isinstance(arg, str) else None)
        elif name in ("GLOBAL", "INST"):  # INST imports its class as GLOBAL does, then calls it
            module, _, attr = arg.partition(" ")
            found[f"{module}.{attr}"] = None
            last_values.append(None)
        elif name == "STACK_GLOBAL":
            if len(last_values) >= 2 and all(isinstance(v, str) for v in last_values[-2:]):
                found[f"{last_values[-2]}.{last_values[-1]}"] = None
            last_values.append(None)
        elif name in _MEMO_PUT:
            memo[arg] = last_values[-1] if last_values else None
        elif name == "MEMOIZE":
            memo[next_memo] = last_values[-1] if last_values else None
            next_memo += 1
        elif name in _MEMO_GET:
            last_values.append(memo.get(arg))
        else:
            last_values.append(None)
        last_values = last_values[-4:]
    return list(found)


# ---------------------------------------------------------------------------------- the inert graph


@dataclass(frozen=True)
class Global:
    """A class or function the pickle names (never imported)."""

    module: str
    name: str

    @property
    def qualified(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
class Call:
    """What unpickling would get by calling ``func(*args)`` (``new``: ``cls.__new__``), left undone."""

    func: Any
    args: Any
    new: bool = False
    state: Any = None  # what BUILD would set
    items: dict = field(default_factory=dict)  # what SETITEM(S) would add
    appended: list = field(default_factory=list)  # what APPEND(S) would add


@dataclass(frozen=True)
class Persistent:
    """A persistent id: in a torch file, a tensor storage record in the zip."""

    pid: Any


class _Mark:
    pass


_MARK = _Mark()
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_VALUE_OPS = _STRING_OPS | {
    "INT",
    "BININT",
    "BININT1",
    "BININT2",
    "LONG",
    "LONG1",
    "LONG4",
    "FLOAT",
    "BINFLOAT",
    "STRING",
    "BINBYTES",
    "SHORT_BINBYTES",
    "BINBYTES8",
    "BYTEARRAY8",
}
_EMPTY = {"EMPTY_LIST": list, "EMPTY_DICT": dict, "EMPTY_TUPLE": tuple, "EMPTY_SET": set}


class _InertReader:
    """A pickle machine whose REDUCE, NEWOBJ, BUILD and GLOBAL only record what they would do."""

    def __init__(self, data: bytes):
        self.data = data
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}

    def run(self) -> Any:
        for opcode, arg, _pos in _ops(self.data):
            name = opcode.name
            if name == "STOP":
                return self.pop()
            try:
                self.step(name, arg)
            except UnreadablePickle:
                raise
            except (IndexError, KeyError, TypeError, ValueError, AttributeError, RecursionError, MemoryError) as exc:
                raise UnreadablePickle(f"malformed pickle at {name}: {type(exc).__name__}") from None
        raise UnreadablePickle("the pickle has no STOP")

    def pop(self) -> Any:
        value = self.stack.pop()
        if value is _MARK:
            raise IndexError("a mark where a value was expected")
        return value

    def pop_mark(self) -> list:
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def step(self, name: str, arg: Any) -> None:  # noqa: C901 - one branch per opcode family
        if name in _VALUE_OPS:
            self.stack.append(arg)
        elif name in _CONSTANTS:
            self.stack.append(_CONSTANTS[name])
        elif name in _EMPTY:
            self.stack.append(_EMPTY[name]())
        elif name == "MARK":
            self.marks.append(len(self.stack))
        elif name in ("PROTO", "FRAME"):
            pass
        elif name == "POP":
            self.stack.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            self.stack.append(self.stack[-1])
        elif name in _MEMO_PUT:
            self.memo[arg] = self.stack[-1]
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.stack[-1]
        elif name in _MEMO_GET:
            self.stack.append(self.memo[arg])
        else:
            self.build(name, arg)

    def build(self, name: str, arg: Any) -> None:  # noqa: C901 - one branch per opcode family
        if name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            items = [self.pop() for _ in range(count)][::-1]
            self.stack.append(tuple(items))
        elif name in ("TUPLE", "LIST", "FROZENSET"):
            items = self.pop_mark()
            self.stack.append(list(items) if name == "LIST" else tuple(items))  # a frozenset stays a tuple
        elif name == "DICT":
            items = self.pop_mark()
            self.stack.append({})
            self.set_items(items)
        elif name == "APPEND":
            value = self.pop()
            self.append([value])
        elif name == "APPENDS":
            self.append(self.pop_mark())
        elif name == "ADDITEMS":
            items = self.pop_mark()
            target = self.stack[-1]
            if isinstance(target, set):
                target.update(i for i in items if _hashable(i))
        elif name == "SETITEM":
            value, key = self.pop(), self.pop()
            self.set_items([key, value])
        elif name == "SETITEMS":
            self.set_items(self.pop_mark())
        elif name == "GLOBAL":
            module, _, attr = arg.partition(" ")
            self.stack.append(Global(module, attr))
        elif name == "STACK_GLOBAL":
            attr, module = self.pop(), self.pop()
            if not (isinstance(module, str) and isinstance(attr, str)):  # never str() a structure of the file's
                raise TypeError("STACK_GLOBAL of a value that is not a string")
            self.stack.append(Global(module, attr))
        elif name == "INST":  # INST and OBJ call what they name (cls(*args)), whatever it is: not a __new__
            module, _, attr = arg.partition(" ")
            self.stack.append(Call(Global(module, attr), tuple(self.pop_mark())))
        elif name == "OBJ":
            cls, *args = self.pop_mark()
            self.stack.append(Call(cls, tuple(args)))
        elif name == "REDUCE":
            args, func = self.pop(), self.pop()
            self.stack.append(Call(func, args))
        elif name == "NEWOBJ":
            args, cls = self.pop(), self.pop()
            self.stack.append(Call(cls, args, new=True))
        elif name == "NEWOBJ_EX":
            _kwargs, args, cls = self.pop(), self.pop(), self.pop()
            self.stack.append(Call(cls, args, new=True))
        elif name == "BUILD":
            state = self.pop()
            if isinstance(self.stack[-1], Call):
                self.stack[-1].state = state
        elif name == "PERSID":
            self.stack.append(Persistent(arg))
        elif name == "BINPERSID":
            self.stack.append(Persistent(self.pop()))
        elif name in ("EXT1", "EXT2", "EXT4"):
            self.stack.append(Global("copyreg.extension", str(arg)))
        else:  # NEXT_BUFFER, READONLY_BUFFER: out-of-band data, which torch files never use
            raise UnreadablePickle(f"unsupported pickle opcode {name}")

    def append(self, values: list) -> None:
        target = self.stack[-1]
        (target if isinstance(target, list) else target.appended if isinstance(target, Call) else []).extend(values)

    def set_items(self, flat: list) -> None:
        target = self.stack[-1]
        mapping = target if isinstance(target, dict) else target.items if isinstance(target, Call) else {}
        for key, value in zip(flat[::2], flat[1::2], strict=False):  # an odd count: a malformed file
            if _hashable(key):
                mapping[key] = value


def _hashable(value: Any) -> bool:
    """Whether ``value`` can be a dict key here: scalars, names, and tuples of them at most ``_MAX_KEY_DEPTH``
    deep (checked without recursion: hashing a deeper tuple recurses in C, and a 1M-deep one crashes)."""
    pending = [(value, 0)]
    seen = 0
    while pending:
        item, depth = pending.pop()
        seen += 1
        if seen > 4096 or depth > _MAX_KEY_DEPTH:
            return False
        if isinstance(item, Persistent):
            pending.append((item.pid, depth + 1))
        elif isinstance(item, tuple):
            pending.extend((child, depth + 1) for child in item)
        elif not (item is None or isinstance(item, (str, bytes, int, float, bool, Global))):
            return False
    return True


def read_inert(path: str | Path) -> Any:
    """The pickle's object graph, with nothing imported or called (see the module docstring)."""
    return _InertReader(pickle_bytes(path)).run()


# ---------------------------------------------------------------------------------- seed diagnosis


@dataclass
class SeedDiagnosis:
    """Why a seed-format ``.bin`` does not load in this env, failure by failure."""

    is_seed_format: bool
    failures: list[str] = field(default_factory=list)
    missing_globals: list[str] = field(default_factory=list)

    @property
    def fix(self) -> str:
        return (
            "turn it into a portable .bin in the slicegpt env, if you trust the file (reading it runs "
            "code from it): slicebridge upgrade SEED.bin OUT.bin --env slicegpt --trust-pickle "
            "(or client.upgrade(..., trust_pickle=True))"
        )


def _module_source(module: str) -> str | None:
    """The source text of ``module``, found on disk without importing it or its parents (None: unknown)."""
    parts = module.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    spec = importlib.util.find_spec(parts[0])
    if spec is None:
        return None
    if len(parts) == 1:
        candidates = [Path(spec.origin)] if spec.origin and spec.has_location else []
    else:
        candidates = []
        for root in spec.submodule_search_locations or ():
            base = Path(root).joinpath(*parts[1:])
            candidates += [base.with_suffix(".py"), base / "__init__.py"]
    for candidate in candidates:
        if candidate.suffix == ".py" and candidate.is_file():
            try:
                return candidate.read_text(encoding="utf-8", errors="replace")
            except OSError:
                return None
    return None


def _importable(qualified: str, sources: dict[str, str | None]) -> bool:
    """Whether ``module.attr`` still exists here, judged without importing anything.

    The top-level package must be findable (``find_spec``); when the module's source file is
    found, it must mention the name. A module without a readable source (built in, compiled,
    an alias made at import time) gets the benefit of the doubt.
    """
    module, _, attr = qualified.rpartition(".")
    top = module.split(".")[0]
    if not top.isidentifier():
        return False
    try:
        if importlib.util.find_spec(top) is None:
            return False
    except (ImportError, ValueError):
        return False
    if module not in sources:
        sources[module] = _module_source(module)
    source = sources[module]
    name = attr.split(".")[0]
    return source is None or re.search(rf"\b{re.escape(name)}\b", source) is not None


def diagnose_seed_bin(path: str | Path) -> SeedDiagnosis:
    """Which of the three known failures a seed ``.bin`` meets here (nothing is unpickled or imported)."""
    try:
        names = referenced_globals(path)
    except (ValueError, OSError, zipfile.BadZipFile):  # not a pickle at all: not the seed's format
        return SeedDiagnosis(is_seed_format=False)
    seed = any(n.startswith(("slicegpt.", "dill.")) for n in names)
    diagnosis = SeedDiagnosis(is_seed_format=seed)
    if not seed:
        return diagnosis
    diagnosis.failures.append(
        "torch.load(p) refuses it: since torch 2.6 weights_only=True is the default, and the file pickles "
        "model objects, not just tensors"
    )
    if importlib.util.find_spec("slicegpt") is None:
        diagnosis.failures.append(
            "torch.load(p, pickle_module=dill, weights_only=False) fails with "
            "ModuleNotFoundError: No module named 'slicegpt' (the file pickles slicegpt's classes)"
        )
    sources: dict[str, str | None] = {}
    missing = [
        n
        for n in names
        if not n.startswith(("slicegpt.", "dill.", "__builtin__", "builtins")) and not _importable(n, sources)
    ]
    if missing:
        diagnosis.missing_globals = missing
        diagnosis.failures.append(
            "even with slicegpt installed it fails with AttributeError: Can't get attribute "
            f"{missing[0].rpartition('.')[2]!r}: this env's packages no longer have " + ", ".join(missing)
        )
    return diagnosis
