"""The wire protocol: the single source of truth for what travels between client and server.

A message is a ZeroMQ multipart message::

    [MAGIC, signature, header, buffer_0, buffer_1, ...]

- ``MAGIC`` names the protocol and its version (``b"SLB1"``).
- ``signature`` is the hex HMAC-SHA256 of the header and every buffer (see ``signing``).
- ``header`` is a msgpack map: ``v`` (protocol version), ``kind``, ``id`` (unique per
  message, for replay protection), ``rid`` (the request it belongs to), ``ts``
  (sender's wall clock), ``body`` (a msgpack value) and ``tensors`` (one
  ``{dtype, shape, nbytes}`` entry per buffer).
- Tensors inside ``body`` are msgpack extension values that point at a buffer;
  their bytes travel as separate raw frames, never pickled. On one machine, tensors of
  1 MiB or more travel through shared memory instead (``shm`` in their spec; see
  ``bridge.shm``).

Kinds: a client sends ``request``, ``cancel`` and ``heartbeat``; the server answers a
``request`` with any number of ``progress`` and ``log`` events and then exactly one
``result`` or ``error``, and answers every ``heartbeat`` with a ``heartbeat``.

Operations (``request`` bodies) and their argument and result types are the
dataclasses at the bottom of this module, registered in :data:`OPERATIONS`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import struct
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from slicebridge.bridge.errors import MessageTooLarge, ProtocolError
from slicebridge.dtypes import dtype_name

PROTOCOL_VERSION = 1
MAGIC = b"SLB1"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024**3
_TENSOR_EXT = 1

# Message kinds.
REQUEST = "request"
CANCEL = "cancel"
HEARTBEAT = "heartbeat"
PROGRESS = "progress"
LOG = "log"
RESULT = "result"
ERROR = "error"
CLIENT_KINDS = frozenset({REQUEST, CANCEL, HEARTBEAT})
SERVER_KINDS = frozenset({PROGRESS, LOG, RESULT, ERROR, HEARTBEAT})
FINAL_KINDS = frozenset({RESULT, ERROR})

# Element sizes of the dtypes a tensor may have on the wire (torch's names).
DTYPE_SIZES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


# --------------------------------------------------------------------------- tensors


@dataclass
class TensorFrame:
    """A tensor as it travels: dtype name, shape and the raw bytes (C order, no copy)."""

    dtype: str
    shape: tuple[int, ...]
    data: Any  # a buffer: bytes, memoryview, zmq.Frame buffer, numpy array

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for d in self.shape:
            n *= d
        return n

    @classmethod
    def from_tensor(cls, tensor: Any) -> TensorFrame:
        """Wrap a torch tensor or numpy array without copying (after making it contiguous on CPU)."""
        module = type(tensor).__module__
        if module.startswith("torch"):
            t = tensor.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()
            dtype = dtype_name(t.dtype)
            if dtype not in DTYPE_SIZES:
                raise ProtocolError(f"tensors of dtype {dtype} cannot travel over the bridge")
            raw = t.reshape(-1).view(_torch().uint8).numpy() if t.numel() else b""
            return cls(dtype, tuple(t.shape), raw)
        if module.startswith("numpy"):
            import numpy as np

            a = np.ascontiguousarray(tensor)
            dtype = "bool" if a.dtype == np.bool_ else str(a.dtype)
            if dtype not in DTYPE_SIZES:
                raise ProtocolError(f"arrays of dtype {dtype} cannot travel over the bridge")
            return cls(dtype, tuple(a.shape), a.reshape(-1).view(np.uint8))
        raise ProtocolError(f"cannot send an object of type {type(tensor).__name__} as a tensor")

    def to_torch(self):
        """The tensor as a torch tensor that shares the received buffer (no copy)."""
        torch = _torch()
        dtype = getattr(torch, self.dtype)
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=dtype)
        import warnings

        with warnings.catch_warnings():
            # Received buffers are read-only; torch warns but shares them, which is what we want.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self.data, dtype=torch.uint8)
        return flat.view(dtype).reshape(self.shape)

    def to_numpy(self):
        import numpy as np

        if self.dtype == "bfloat16":
            raise ProtocolError("numpy has no bfloat16: use to_torch()")
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype)).reshape(self.shape)


def _torch():
    import torch

    return torch


# Values that hold nothing to walk: the conversions below return them at once.
_PLAIN_TYPES = frozenset({str, int, float, bool, bytes, type(None)})


def received_tensors(value: Any) -> Any:
    """A decoded value with its tensor frames turned into torch tensors (numpy arrays when this
    interpreter has no torch): maps, lists and dataclass fields are walked, nothing is copied."""
    if type(value) in _PLAIN_TYPES:
        return value
    if isinstance(value, TensorFrame):
        try:
            return value.to_torch()
        except ImportError:
            return value.to_numpy()
    if isinstance(value, dict):
        return {k: received_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [received_tensors(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if type(item) not in _PLAIN_TYPES:
                setattr(value, f.name, received_tensors(item))
    return value


def is_tensor_like(obj: Any) -> bool:
    module = type(obj).__module__
    return (module.startswith("torch") and type(obj).__name__ in ("Tensor", "Parameter")) or (
        module.startswith("numpy") and type(obj).__name__ == "ndarray"
    )


# --------------------------------------------------------------------------- envelopes

# Message and request ids: a random prefix per process and a counter, unique without a
# uuid4 per message (which costs more than the rest of a ping's encoding).
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count()


def new_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):x}"


@dataclass
class Message:
    """One decoded message (kind, ids, body with tensors restored)."""

    kind: str
    request_id: str
    body: Any = None
    msg_id: str = field(default_factory=new_id)
    ts: float = field(default_factory=time.time)


_SHM_KEY = msgpack.packb("shm")


def encode(
    message: Message,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    shared: Callable[[Any], str] | None = None,
    shared_threshold: int = 1 << 20,
) -> list:
    """Header and buffer frames of a message (without MAGIC and signature).

    With ``shared`` (see ``bridge.shm.put``), tensors of ``shared_threshold`` bytes or more
    are handed to it instead of becoming frames, and their spec carries the returned name
    (a tensor it returns None for, finding no room, becomes a frame after all).
    """
    frames: list[TensorFrame] = []

    def default(obj):
        if isinstance(obj, TensorFrame):
            frames.append(obj)
        elif is_tensor_like(obj):
            frames.append(TensorFrame.from_tensor(obj))
        elif isinstance(obj, (tuple, set, frozenset)):
            return list(obj)
        else:
            raise ProtocolError(f"cannot send an object of type {type(obj).__name__}")
        return msgpack.ExtType(_TENSOR_EXT, struct.pack("<I", len(frames) - 1))

    body = msgpack.packb(message.body, default=default, use_bin_type=True)
    total = len(body) + sum(f.nbytes for f in frames) if frames else len(body)
    if total > max_bytes:
        raise MessageTooLarge(
            f"message of {total} bytes exceeds the bridge's maximum of {max_bytes} bytes "
            "(raise max_message_bytes when starting the server)"
        )
    specs, inline = [], []
    for frame in frames:
        spec = {"dtype": frame.dtype, "shape": list(frame.shape), "nbytes": frame.nbytes}
        name = shared(frame.data) if shared is not None and frame.nbytes >= shared_threshold else None
        if name is not None:
            spec["shm"] = name
        else:  # small, or no shared memory (none here, or no room left in it)
            inline.append(frame.data)
        specs.append(spec)
    header = {
        "v": PROTOCOL_VERSION,
        "kind": message.kind,
        "id": message.msg_id,
        "rid": message.request_id,
        "ts": message.ts,
        "body": body,
        "tensors": specs,
    }
    return [msgpack.packb(header, use_bin_type=True), *inline]


def shared_names(header_frames: list) -> list[str]:
    """The shared-memory buffers an encoded message refers to (to discard it unsent)."""
    header_bytes = bytes(header_frames[0])
    if _SHM_KEY not in header_bytes:  # no "shm" anywhere in it: none (a message without is not decoded)
        return []
    header = msgpack.unpackb(header_bytes, raw=False)
    return [spec["shm"] for spec in header["tensors"] if "shm" in spec]


def decode(
    header_bytes: Any,
    buffers: list,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    take_shared: Callable[[str, int], Any] | None = None,
) -> Message:
    """Decode a header and its buffer frames; raises ProtocolError on anything malformed.

    Tensors whose spec names a shared-memory buffer are fetched with ``take_shared``.
    """
    try:
        header = msgpack.unpackb(bytes(header_bytes), raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"malformed header: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a map")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r}, expected {PROTOCOL_VERSION}")
    get = header.get
    kind, msg_id, rid, ts, specs = get("kind"), get("id"), get("rid"), get("ts"), get("tensors")
    if not (isinstance(kind, str) and isinstance(msg_id, str) and isinstance(rid, str)):
        raise ProtocolError("header lacks kind, id or rid")
    if (
        not isinstance(ts, (int, float))
        or not isinstance(specs, list)
        or (specs and not all(isinstance(spec, dict) for spec in specs))
    ):
        raise ProtocolError("header lacks ts or tensors")
    tensors = _tensors(specs, buffers, max_bytes, take_shared) if specs or buffers else []

    def ext_hook(code, data):
        if code != _TENSOR_EXT or len(data) != 4:
            raise ProtocolError(f"unknown extension type {code}")
        (index,) = struct.unpack("<I", data)
        if index >= len(tensors):
            raise ProtocolError(f"tensor reference {index} out of range")
        return tensors[index]

    raw_body = get("body")
    if not isinstance(raw_body, bytes):
        raise ProtocolError("header body is not bytes")
    try:
        body = msgpack.unpackb(raw_body, raw=False, ext_hook=ext_hook, strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"malformed body: {exc}") from None
    return Message(kind=kind, request_id=rid, body=body, msg_id=msg_id, ts=float(ts))


def _tensors(
    specs: list, buffers: list, max_bytes: int, take_shared: Callable[[str, int], Any] | None
) -> list[TensorFrame]:
    """The tensors a header's specs announce, from the inline frames and shared memory, checked."""
    shared = [spec for spec in specs if "shm" in spec]
    if len(specs) - len(shared) != len(buffers):
        raise ProtocolError(f"header announces {len(specs) - len(shared)} inline tensors, {len(buffers)} frames came")
    announced = sum(spec.get("nbytes", 0) for spec in shared if isinstance(spec.get("nbytes"), int))
    if announced > max_bytes:
        raise ProtocolError(f"message announces {announced} bytes of shared tensors, over the maximum")
    if shared and take_shared is None:
        raise ProtocolError("message uses shared memory, which this connection does not")
    inline = iter(buffers)
    tensors = []
    for spec in specs:
        if "shm" in spec:
            nbytes = spec.get("nbytes")
            if not isinstance(nbytes, int) or nbytes < 0:
                raise ProtocolError(f"bad shared tensor size {nbytes!r}")
            tensors.append(_tensor_from_spec(spec, take_shared(spec["shm"], nbytes)))
        else:
            tensors.append(_tensor_from_spec(spec, next(inline)))
    return tensors


def _tensor_from_spec(spec: Any, buffer: Any) -> TensorFrame:
    if not isinstance(spec, dict):
        raise ProtocolError("tensor spec is not a map")
    dtype, shape = spec.get("dtype"), spec.get("shape")
    if dtype not in DTYPE_SIZES:
        raise ProtocolError(f"unknown tensor dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ProtocolError(f"bad tensor shape {shape!r}")
    frame = TensorFrame(dtype, tuple(shape), buffer)
    size = len(buffer) if isinstance(buffer, (bytes, bytearray)) else memoryview(buffer).nbytes
    if frame.nbytes != size:
        raise ProtocolError(f"tensor of {frame.nbytes} bytes announced, {size} bytes came")
    return frame


def to_wire(value: Any) -> Any:
    """A dataclass as a plain map, recursively, WITHOUT copying what it holds.

    ``dataclasses.asdict`` deep-copies every value, tensors included: a full copy of every
    tensor on every message (150 ms of a 256 MB echo's 380 ms, measured by make bench).
    """
    if type(value) in _PLAIN_TYPES:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {name: to_wire(getattr(value, name)) for name in _field_names(type(value))}
    if isinstance(value, dict):
        return {k: to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_wire(v) for v in value]
    return value


def new_request(op: str, args: Any) -> Message:
    """A request message with a fresh request id."""
    payload = to_wire(args) if dataclasses.is_dataclass(args) else dict(args or {})
    return Message(kind=REQUEST, request_id=new_id(), body={"op": op, "args": payload})


# --------------------------------------------------------------------------- events and errors


@dataclass
class Progress:
    """A step of long work: ``done`` of ``total`` ``unit`` in ``stage``."""

    stage: str
    done: float = 0
    total: float | None = None
    unit: str = ""
    message: str = ""


@dataclass
class LogRecord:
    level: str
    message: str
    logger: str = "slicebridge.server"


@dataclass
class ErrorInfo:
    error_type: str
    message: str
    traceback: str = ""


# --------------------------------------------------------------------------- operations


@dataclass
class PingArgs:
    pass


@dataclass
class PingResult:
    pid: int
    ts: float
    busy: bool
    queued: int


@dataclass
class HelloArgs:
    client_protocol: int = PROTOCOL_VERSION


@dataclass
class HelloResult:
    """What the server tells a client about itself in the handshake."""

    protocol: int
    pid: int
    python: str
    executable: str
    prefix: str
    versions: dict  # package -> version or None: torch, transformers, slicegpt, dill, zmq, msgpack
    module_files: dict  # package -> file it was imported from
    sys_path: list
    device: str  # "cuda" or "cpu": where models are computed by default
    cuda_devices: list  # names of visible CUDA devices
    started_at: float
    detached: bool
    threads: int | None = None  # torch's CPU threads (None: no torch, or a server from before it was reported)


@dataclass
class StatsArgs:
    pass


@dataclass
class StatsResult:
    pid: int
    uptime_s: float
    counters: dict  # requests, replies, dropped_bad_signature, dropped_replay, dropped_malformed, ...
    busy: bool
    queued: int
    detached: bool


@dataclass
class EchoArgs:
    """Send values (tensors included) and get them back unchanged: a transport check."""

    payload: Any = None


@dataclass
class EchoResult:
    payload: Any = None


@dataclass
class SleepArgs:
    """Diagnostic: hold the worker for ``seconds``, emitting progress every ``step``."""

    seconds: float = 1.0
    step: float = 0.1


@dataclass
class SleepResult:
    slept: float
    cancelled: bool = False


@dataclass
class FailArgs:
    """Diagnostic: raise an exception of the named kind inside the handler."""

    kind: str = "RuntimeError"  # RuntimeError | MemoryError | CudaOutOfMemory | KeyboardInterrupt
    message: str = "failure requested by the client"


@dataclass
class ShutdownArgs:
    pass


@dataclass
class ShutdownResult:
    pid: int


@dataclass
class ConvertArgs:
    """Turn a SliceGPT checkpoint into a ``.bin`` in the seed's dict format (paths are absolute)."""

    slicegpt_model: str  # a run_slicegpt output dir, or a .pt file
    output: str  # the .bin to write
    base_model: str | None = None  # base model dir (config, tokenizer); default: beside the checkpoint
    sparsity: float | None = None  # default: from the SlicingConfig or the file name
    round_interval: int | None = None
    loader: str = "auto"  # auto | official | builtin
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str | None = None  # float32 | float16 | bfloat16; default: the checkpoint's own
    overwrite: bool = False
    pickle_module: str = "auto"  # auto (dill when installed, as the seed does) | dill | pickle


@dataclass
class ConvertResult:
    output: str
    bytes: int
    loader: str  # the loader that was used: official | builtin
    cache_hit: bool  # the model came from the server's warm cache
    device: str  # where the model was computed / held in the server
    dtype: str
    sparsity: float
    round_interval: int | None
    actual_ratio: float  # 1 - params(sliced, shortcut Qs included) / params(dense base)
    params: dict  # dense, sliced, shortcut_q
    timings: dict  # seconds: load, save, total
    pickle_module: str
    format_version: int
    family: str = ""  # the model family: llama | opt | phi2 | phi3
    official_name: str | None = None  # the model name slicegpt's adapter was given (official loader)
    placement: dict | None = None  # on a device group (device "cuda:0+cuda:1"): by, devices, official (see loaders)


@dataclass
class ExportArgs:
    """Write a pickle-free Hugging Face directory for a SliceGPT checkpoint (paths are absolute)."""

    slicegpt_model: str
    output: str  # the directory to create
    base_model: str | None = None
    sparsity: float | None = None
    round_interval: int | None = None
    loader: str = "auto"
    device: str = "auto"
    dtype: str | None = None  # as ConvertArgs.dtype
    overwrite: bool = False
    max_shard_size: int = 5 * 1024**3


@dataclass
class ExportResult:
    output: str
    bytes: int
    files: list
    sharded: bool
    loader: str
    cache_hit: bool
    device: str
    dtype: str
    sparsity: float
    round_interval: int | None
    actual_ratio: float
    params: dict
    timings: dict
    verification: dict  # the in-server check written into the model card
    family: str = ""  # the model family: llama | opt | phi2 | phi3
    official_name: str | None = None  # the model name slicegpt's adapter was given (official loader)
    placement: dict | None = None  # on a device group (device "cuda:0+cuda:1"): by, devices, official (see loaders)


@dataclass
class UpgradeArgs:
    """Turn a ``.bin`` made the seed's way (a dill pickle of the slicegpt model) into ours.

    Reading it unpickles it, which runs code from the file: refused unless ``trust_pickle``.
    """

    source: str
    output: str
    overwrite: bool = False
    pickle_module: str = "auto"
    trust_pickle: bool = False


@dataclass
class ReferenceArgs:
    """Logits of the checkpoint's model in the server, for verification in the caller's env."""

    slicegpt_model: str
    inputs: list  # token-id tensors, each [batch, seq]
    base_model: str | None = None
    sparsity: float | None = None
    round_interval: int | None = None
    loader: str = "auto"
    device: str = "auto"
    family: str | None = None  # the artifact's family: a checkpoint of another is refused before any forward pass


@dataclass
class ReferenceResult:
    logits: list  # float32 tensors, one [batch, seq, vocab] per input
    loader: str  # official when slicegpt computed them
    device: str
    dtype: str
    cache_hit: bool
    seconds: float
    versions: dict  # torch, transformers, slicegpt of the server
    family: str = ""  # the model family: llama | opt | phi2 | phi3
    official_name: str | None = None  # the model name slicegpt's adapter was given (official loader)
    placement: dict | None = None  # on a device group (device "cuda:0+cuda:1"): by, devices, official (see loaders)


@dataclass
class InfoArgs:
    """Facts about a seed-format .bin, read from its pickle's opcodes (never unpickled)."""

    path: str


@dataclass
class InfoResult:
    facts: dict  # the fields of slicebridge.model.facts.ArtifactInfo


@dataclass
class SliceArgs:
    """Slice a dense model at each sparsity as ``experiments/run_slicegpt.py`` does, one warm model
    for the whole sweep. Option names are the script's flags, underscored; paths are absolute."""

    base_model: str  # the dense Hugging Face model directory (run_slicegpt's --model-path)
    sparsities: list[float]  # each in (0, 1), in the order they are sliced
    output_dir: str  # run_slicegpt's --save-dir: {name}_{sparsity}.pt / .json per sparsity, base files copied
    calibration: str | None = None  # local text: a .txt / .jsonl file or a directory of them
    cal_dataset: str | None = None  # wikitext2 | ptb | c4 | alpaca, through slicegpt's data_utils
    cal_nsamples: int = 128
    cal_batch_size: int = 16
    cal_max_seqlen: int = 2048
    varied_seqlen: bool = False
    seed: int = 42
    round_interval: int = 8
    final_orientation: str = "random"  # random | pca
    model_name: str | None = None  # the name the official adapter matches; default: derived as convert does
    slicer: str = "auto"  # auto (official when slicegpt is importable) | official | builtin
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "fp16"  # fp16 | fp32 (run_slicegpt's --dtype)
    distribute_model: bool = False  # run_slicegpt's --distribute-model (accelerate over every GPU)
    eval_ppl: bool = True  # perplexity of the dense and of each sliced model on held-out text
    ppl_eval_seqlen: int = 2048
    ppl_eval_batch_size: int = 8
    held_out: float = 0.1  # of a local calibration set's examples, kept apart for perplexity
    overwrite: bool = False
    convert: bool = False  # also write {output_dir}/{name}_{sparsity}.bin from the warm sliced model
    export: bool = False  # also write {output_dir}/{name}_{sparsity}/ (pickle-free HF directory)


@dataclass
class SlicedCheckpoint:
    """One sparsity of a sweep, sliced and saved."""

    sparsity: float
    checkpoint: str  # the .pt
    slicing_config: str  # the .json SlicingConfig
    hidden_size: int  # the sliced embedding dimension
    actual_ratio: float  # 1 - params(sliced, shortcut Qs included) / params(dense)
    params: dict  # dense, sliced, shortcut_q
    ppl: float | None  # perplexity on the held-out text (None without eval_ppl)
    timings: dict  # seconds: calibrate, slice, save, ppl, total
    bin: dict | None = None  # the ConvertResult fields, when convert was asked for
    export: dict | None = None  # the ExportResult fields, when export was asked for


@dataclass
class SliceFailure:
    """One sparsity of a sweep that failed; it removed the outputs it had made new."""

    sparsity: float
    error_type: str
    message: str


@dataclass
class SliceResult:
    output_dir: str
    slicer: str  # the code that sliced: official (slicegpt's rotate_and_slice) | builtin (slicebridge's maker)
    family: str  # llama | opt | phi2 | phi3
    model_name: str  # the name the files are named by (and the official adapter was given)
    device: str
    dtype: str
    dense: dict  # the warm dense model: cache_hit, load_seconds, loads (dense reads from disk by this server)
    calibration: dict  # source, examples, held_out, samples, seqlen
    baseline_ppl: float | None  # the dense model's perplexity on the held-out text
    checkpoints: list[SlicedCheckpoint]  # in the order sliced
    failed: list[SliceFailure]  # sparsities that failed mid-sweep (out of memory, ...)
    copied: list[str]  # base-model files copied into output_dir, as run_slicegpt copies them
    timings: dict  # seconds: load, baseline_ppl, total


@dataclass
class CacheInfoArgs:
    pass


@dataclass
class CacheInfoResult:
    entries: list  # one map per cached model: checkpoint, loader, device, bytes
    used_bytes: int
    budget_bytes: int
    hits: int
    misses: int
    # per CUDA device the server's torch has used: allocated, max_allocated (the peak since start), reserved bytes
    devices: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Operation:
    name: str
    args: type
    result: type
    immediate: bool = False  # answered by the I/O thread at once, never queued
    diagnostic: bool = False  # only served when the server runs with debug operations enabled


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in [
        Operation("ping", PingArgs, PingResult, immediate=True),
        Operation("stats", StatsArgs, StatsResult, immediate=True),
        Operation("shutdown", ShutdownArgs, ShutdownResult, immediate=True),
        Operation("hello", HelloArgs, HelloResult, immediate=True),
        Operation("echo", EchoArgs, EchoResult),
        Operation("convert", ConvertArgs, ConvertResult),
        Operation("export", ExportArgs, ExportResult),
        Operation("upgrade", UpgradeArgs, ConvertResult),
        Operation("reference", ReferenceArgs, ReferenceResult),
        Operation("info", InfoArgs, InfoResult),
        Operation("cache_info", CacheInfoArgs, CacheInfoResult),
        Operation("slice", SliceArgs, SliceResult),
        Operation("sleep", SleepArgs, SleepResult, diagnostic=True),
        Operation("fail", FailArgs, EchoResult, diagnostic=True),
    ]
}


# --------------------------------------------------------------------------- typed (de)serialisation


def from_wire(cls: type, data: Any, ignore_unknown: bool = False) -> Any:
    """Build dataclass ``cls`` from a decoded map, checking every field's type.

    Raises ``TypeError`` (for a request: a BadRequest reply) naming the field at fault. A field
    ``cls`` does not have is refused, or left out with ``ignore_unknown`` (a result from a newer
    server, which may carry fields this client does not know yet).
    """
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__}: expected a map, got {type(data).__name__}")
    hints, fields = _field_types(cls)
    names = hints.keys()
    unknown = sorted(set(data) - names)
    if unknown and not ignore_unknown:
        raise TypeError(f"{cls.__name__}: unknown field(s) {', '.join(map(str, unknown))}")
    values = {}
    for f in fields:
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TypeError(f"{cls.__name__}: missing field {f.name!r}")
            continue
        value = _nested(data[f.name], hints[f.name], ignore_unknown)
        if not _matches(value, hints[f.name]):
            raise TypeError(
                f"{cls.__name__}.{f.name}: expected {_type_name(hints[f.name])}, got {type(value).__name__}"
            )
        values[f.name] = value
    return cls(**values)


def _nested(value: Any, annotation: Any, ignore_unknown: bool) -> Any:
    """A map where the field holds a dataclass (or a list of them) built as that dataclass, checked."""
    item = (
        typing.get_args(annotation)[0]
        if typing.get_origin(annotation) is list and typing.get_args(annotation)
        else None
    )
    if dataclasses.is_dataclass(annotation) and isinstance(value, dict):
        return from_wire(annotation, value, ignore_unknown)
    if item is not None and dataclasses.is_dataclass(item) and isinstance(value, list):
        return [from_wire(item, v, ignore_unknown) if isinstance(v, dict) else v for v in value]
    return value


def result_from_wire(cls: type, data: Any) -> Any:
    """Build a result dataclass from a reply. Replies are signed by the server, so the fast
    path skips the per-field checks; anything that does not fit gets them (and their errors).
    A result with nested dataclasses always takes the checked path, which builds them. Fields
    this client does not know (a newer server's) are left out, so that the result still arrives."""
    if isinstance(data, dict) and _flat(cls):
        try:
            return cls(**data)
        except TypeError:
            pass
    return from_wire(cls, data, ignore_unknown=True)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.cache
def _flat(cls: type) -> bool:
    """Whether no field of dataclass ``cls`` holds a dataclass (its replies take the fast path)."""
    hints, _ = _field_types(cls)
    return not any(map(_holds_dataclasses, hints.values()))


@functools.cache
def _holds_dataclasses(annotation: Any) -> bool:
    return dataclasses.is_dataclass(annotation) or any(map(_holds_dataclasses, typing.get_args(annotation)))


@functools.cache
def _field_types(cls: type) -> tuple[dict, tuple]:
    """Resolved field annotations and fields of a dataclass (resolving them is slow: cache it)."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    return {f.name: hints[f.name] for f in fields}, fields


def _matches(value: Any, annotation: Any) -> bool:
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        return any(_matches(value, a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return (
            isinstance(value, list) and all(_matches(v, typing.get_args(annotation)[0]) for v in value)
            if typing.get_args(annotation)
            else isinstance(value, list)
        )
    if origin is dict:
        return isinstance(value, dict)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (list, tuple):
        return isinstance(value, list)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
