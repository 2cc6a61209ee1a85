"""The public surface, pinned: what ``slicebridge`` and ``slicebridge.client`` export, the error
tree (every public error, its bases, and that every exception class slicebridge defines derives
from ``SlicebridgeError``), and the layering that keeps the server's copy of the code small."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import pkgutil
import sys
import threading

import pytest
from helpers.paths import REPO
from helpers.run import run_python

import slicebridge
import slicebridge.client
from slicebridge.errors import PUBLIC_ERRORS, SlicebridgeError

PACKAGE = REPO / "slicebridge"

# name -> its bases, by name: the whole public error tree
ERROR_TREE = {
    "SlicebridgeError": ("Exception",),
    "InputNotFound": ("SlicebridgeError", "FileNotFoundError"),
    "SettingInvalid": ("SlicebridgeError",),
    "EnvNotFound": ("SlicebridgeError",),
    "EnvNotUsable": ("SlicebridgeError",),
    "EnvMissingPackages": ("EnvNotUsable",),
    "ConnectionFileError": ("SlicebridgeError",),
    "ServerEnvMismatch": ("ConnectionFileError",),
    "ServerStartFailed": ("SlicebridgeError",),
    "ServerDied": ("SlicebridgeError",),
    "ServerKeepsDying": ("ServerDied",),
    "ServerNotRunning": ("SlicebridgeError",),
    "RequestTimeout": ("SlicebridgeError",),
    "MessageTooLarge": ("SlicebridgeError",),
    "ProtocolError": ("SlicebridgeError",),
    "RemoteError": ("SlicebridgeError",),
    "BadRequest": ("RemoteError",),
    "RequestCancelled": ("RemoteError",),
    "RemoteOutOfMemory": ("RemoteError",),
    "CheckpointError": ("SlicebridgeError",),
    "CheckpointNotFound": ("CheckpointError", "FileNotFoundError"),
    "AmbiguousCheckpoint": ("CheckpointError",),
    "NotASliceGPTCheckpoint": ("CheckpointError",),
    "TruncatedCheckpoint": ("CheckpointError",),
    "CorruptCheckpoint": ("CheckpointError",),
    "ImplausibleCheckpoint": ("CheckpointError",),
    "BaseConfigMissing": ("CheckpointError",),
    "BaseConfigMismatch": ("CheckpointError",),
    "SlicingConfigMismatch": ("CheckpointError",),
    "SparsityMismatch": ("CheckpointError",),
    "UnsupportedArchitecture": ("CheckpointError",),
    "OutputError": ("SlicebridgeError",),
    "OutputExists": ("OutputError",),
    "DiskFull": ("OutputError",),
    "BinFileError": ("SlicebridgeError",),
    "ImplausibleBinFile": ("BinFileError",),
    "UnsafeBinFile": ("BinFileError",),
    "ExportError": ("SlicebridgeError",),
    "UnreadablePickle": ("SlicebridgeError", "ValueError"),
    "NotASeedModel": ("SlicebridgeError", "ValueError"),
    "CalibrationError": ("SlicebridgeError",),
    "SweepIncomplete": ("SlicebridgeError",),
    "PoolError": ("SlicebridgeError",),
    "RayUnavailable": ("PoolError",),
}
# Exception classes that are not slicebridge errors, on purpose.
NOT_SLICEBRIDGE_ERRORS = {
    "slicebridge.server.faults.OutOfMemoryError",  # stands in for torch.cuda.OutOfMemoryError (a RuntimeError)
}
LOWER_LAYERS = ("bridge", "model")
TOP_MODULES = sorted(path.name for path in PACKAGE.glob("*.py"))  # staged into every server: stdlib only


def test_the_package_exports():
    assert set(slicebridge.__all__) == {"__version__", "Bridge", "client", "load", *ERROR_TREE}
    for name in slicebridge.__all__:
        assert getattr(slicebridge, name) is not None, name
    from slicebridge import Bridge, SparsityMismatch, load  # as execnet and pyzmq allow

    assert Bridge is slicebridge.client.Bridge and SparsityMismatch.__module__ == "slicebridge.model.errors"
    assert load is importlib.import_module("slicebridge.model.loading").load
    assert slicebridge.__version__ == importlib.metadata.version("slicebridge")


def test_the_client_exports():
    assert slicebridge.client.__all__ == [
        "Bridge",
        "convert",
        "export",
        "verify",
        "info",
        "upgrade",
        "slice",
        "bridge_for",
        "pool",
        "close",
        "ServerKeepsDying",
    ]
    for name in slicebridge.client.__all__:
        assert callable(getattr(slicebridge.client, name)), name


def test_importing_slicebridge_stays_cheap():
    done = run_python(
        "import sys, slicebridge; print(sorted(m for m in ('torch', 'zmq', 'transformers', "
        "'slicebridge.client', 'slicebridge.model') if m in sys.modules))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(ERROR_TREE))
def test_the_error_tree(name):
    cls = getattr(slicebridge, name)
    assert tuple(base.__name__ for base in cls.__bases__) == ERROR_TREE[name]
    assert issubclass(cls, SlicebridgeError)
    assert cls.__module__ in PUBLIC_ERRORS and name in PUBLIC_ERRORS[cls.__module__]


def test_every_exception_slicebridge_defines_is_a_slicebridge_error():
    """Imports every module (the server's too) and checks each exception class defined in it."""
    strays = []
    for module_info in pkgutil.walk_packages([str(PACKAGE)], prefix="slicebridge."):
        module = importlib.import_module(module_info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            qualified = f"{cls.__module__}.{cls.__qualname__}"
            if (
                cls.__module__ == module.__name__
                and issubclass(cls, BaseException)
                and not issubclass(cls, SlicebridgeError)
                and qualified not in NOT_SLICEBRIDGE_ERRORS
            ):
                strays.append(qualified)
    assert strays == []


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", LOWER_LAYERS)
def test_lower_layers_never_import_higher_ones(layer):
    upward = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in (PACKAGE / layer).rglob("*.py")
        for name in _imports(path)
        if name.startswith(("slicebridge.client", "slicebridge.server"))
    }
    if layer == "model":  # the model layer needs nothing of the bridge either (atomic used to, for /proc)
        upward |= {
            f"{path.relative_to(PACKAGE)}: {name}"
            for path in (PACKAGE / "model").rglob("*.py")
            for name in _imports(path)
            if name.startswith("slicebridge.bridge")
        }
    assert upward == set()


@pytest.mark.parametrize("module", TOP_MODULES)
def test_the_top_modules_are_stdlib_only(module):
    """The staged server gets them; they import nothing beyond the standard library and each other."""
    own = {"slicebridge", *(f"slicebridge.{name.removesuffix('.py')}" for name in TOP_MODULES)}
    imported = {name for name in _imports(PACKAGE / module) if name not in ("__future__",)}
    assert {name for name in imported if name.startswith("slicebridge")} <= own
    assert {name.split(".")[0] for name in imported if not name.startswith("slicebridge")} <= sys.stdlib_module_names


def test_the_server_gets_the_top_modules_and_the_maker_but_not_the_client():
    from slicebridge.bridge.launcher import stage_server_code

    staged = stage_server_code() / "slicebridge"
    for name in (*TOP_MODULES, "model/sample_text.py", "model/export.py", "server/main.py", "model/dense.py"):
        assert (staged / name).is_file(), name
    makers = {path.name for path in (REPO / "slicebridge" / "model").glob("slicing*.py")}
    assert makers and {path.name for path in (staged / "model").glob("slicing*.py")} == makers  # it slices
    assert (REPO / "slicebridge" / "client").is_dir() and not (staged / "client").exists()


def test_a_request_scope_holds_for_its_own_block_only(tmp_path):
    """The server's checks on the work of a request are scoped (per request, i.e. per thread and
    block), not module attributes: a writer outside the block publishes while one inside is refused."""
    from slicebridge.model import atomic, request_scope

    class Refused(Exception):
        pass

    def refuse(path):
        raise Refused(str(path))

    inside_waiting, outside_done, results = threading.Event(), threading.Event(), {}

    def inside():
        try:
            with request_scope.serving(lambda: None, refuse), atomic.atomic_file(tmp_path / "inside.bin") as tmp:
                tmp.write_bytes(b"x")
                inside_waiting.set()
                outside_done.wait(30)
        except Refused:
            results["inside"] = "refused"

    thread = threading.Thread(target=inside)
    thread.start()
    assert inside_waiting.wait(30)
    with atomic.atomic_file(tmp_path / "outside.bin") as tmp:
        tmp.write_bytes(b"y")
    outside_done.set()
    thread.join(30)
    assert results == {"inside": "refused"}
    assert not (tmp_path / "inside.bin").exists() and (tmp_path / "outside.bin").read_bytes() == b"y"
    assert not hasattr(atomic, "before_publish")
    request_scope.check_cancelled()  # outside any request: nothing to notice
