"""Reading which classes and functions a torch ``.bin`` would import, without unpickling it.

``pickletools`` walks the pickle's opcodes; we collect every ``GLOBAL`` and
``STACK_GLOBAL`` target. That is enough to tell, in the caller's env and without running
any of the file, why a ``.bin`` made the seed's way will not load here: the three
failures measured on the shared fixture.
"""

from __future__ import annotations

import importlib
import importlib.util
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING"}
_MEMO_PUT = {"BINPUT", "LONG_BINPUT", "PUT"}
_MEMO_GET = {"BINGET", "LONG_BINGET", "GET"}


def pickle_bytes(path: str | Path) -> bytes:
    """The pickle stream of a torch zip file (``*/data.pkl``), or the file itself if it is a raw pickle."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not names:
                raise ValueError(f"{path} is a zip file without a data.pkl: not a torch file")
            return archive.read(names[0])
    return path.read_bytes()


def referenced_globals(path: str | Path) -> list[str]:
    """Every ``module.name`` the pickle would import, in order of first use."""
    found: dict[str, None] = {}
    memo: dict[int, str | None] = {}
    last_values: list[str | None] = []  # the most recent pushed values, strings or None
    next_memo = 0
    for opcode, arg, _pos in pickletools.genops(pickle_bytes(path)):
        name = opcode.name
        if name in _STRING_OPS:
            last_values.append(arg if isinstance(arg, str) else None)
        elif name == "GLOBAL":
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


@dataclass
class SeedDiagnosis:
    """Why a seed-format ``.bin`` does not load in this env, failure by failure."""

    is_seed_format: bool
    failures: list[str] = field(default_factory=list)
    missing_globals: list[str] = field(default_factory=list)

    @property
    def fix(self) -> str:
        return ("turn it into a portable .bin in the slicegpt env: "
                "slicebridge upgrade SEED.bin OUT.bin --env slicegpt (or client.upgrade(...))")


def _importable(qualified: str) -> bool:
    module, _, attr = qualified.rpartition(".")
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return False
        obj = importlib.import_module(module)
    except Exception:
        return False
    for part in attr.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def diagnose_seed_bin(path: str | Path) -> SeedDiagnosis:
    """Which of the three known failures a seed ``.bin`` meets here (nothing is unpickled)."""
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
    missing = [n for n in names if not n.startswith(("slicegpt.", "dill.", "__builtin__", "builtins"))
               and not _importable(n)]
    if missing:
        diagnosis.missing_globals = missing
        diagnosis.failures.append(
            "even with slicegpt installed it fails with AttributeError: Can't get attribute "
            f"{missing[0].rpartition('.')[2]!r}: this env's packages no longer have "
            + ", ".join(missing)
        )
    return diagnosis
