"""The pickle-free Hugging Face export: a directory ``AutoModelForCausalLM`` loads anywhere.

``export_model`` writes, atomically (the directory appears whole or not at all):

- ``model.safetensors``, or ``model-0000K-of-0000N.safetensors`` shards plus
  ``model.safetensors.index.json`` (transformers' index format) above ``max_shard_size``.
  The files are written here, byte for byte as ``safetensors.torch.save_file`` writes them (metadata
  ``{"format": "pt"}``), not with ``save_pretrained``, so their bytes are the same whichever
  transformers runs the export; but in one stream straight from the tensors' memory (a memory-mapped
  checkpoint's pages included), with the disk writing behind it (``atomic.StreamFile``).
- ``config.json``: the family's sliced config (``SlicedLlamaConfig``, ``SlicedOPTConfig``, ...) with
  ``architectures``, ``auto_map`` and both ``torch_dtype`` (4.x) and ``dtype`` (5.x), in one
  canonical form under 4.41 and 5.x (only ``transformers_version`` differs).
- the remote code for ``trust_remote_code=True``, copied verbatim from this package: the shared
  ``configuration_sliced.py`` and ``sliced_decoder.py`` and the family's
  ``configuration_sliced_<family>.py`` and ``modeling_sliced_<family>.py``, which import each other
  relatively and otherwise only torch and transformers.
- the tokenizer files given, and ``generation_config.json`` (given, or a minimal one).
- ``slicebridge.json``: the provenance, machine-readable; ``README.md``: a model card with it.

Nothing in the directory is a pickle; that is checked before the directory is put in place.

``load_export`` reads such a directory back WITHOUT remote code: it uses this package's own
classes (through ``portable``) and ``safetensors.torch.load_file``.
``slicebridge.load(directory)`` dispatches here.

Like the rest of ``slicebridge.model`` this module runs in the slicegpt env (transformers 4.41,
where the server writes exports) and in the base env (transformers 5.x, where they are read).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slicebridge.dtypes import dtype_name
from slicebridge.errors import SlicebridgeError

from .atomic import StreamFile, atomic_directory, check_output
from .families import FAMILIES, Family, family_named

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .checkpoint import SlicedWidths, SliceGPTCheckpoint
    from .configuration_sliced import SlicedConfig
    from .sliced_decoder import SlicedForCausalLM

logger = logging.getLogger(__name__)

FORMAT = "slicebridge.export"
FORMAT_VERSION = 1

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
PROVENANCE_NAME = "slicebridge.json"
README_NAME = "README.md"
MODEL_TYPES = tuple(family.sliced_model_type for family in FAMILIES)
SAFETENSORS_METADATA = {"format": "pt"}


def remote_code_files(family: Family) -> tuple[str, ...]:
    """The model code an export of ``family`` ships: the shared modules and the family's own."""
    return (
        "configuration_sliced.py",
        f"{family.config_module}.py",
        "sliced_decoder.py",
        f"{family.modeling_module}.py",
    )


def auto_map(family: Family) -> dict[str, str]:
    """``config.json``'s ``auto_map``: where ``AutoConfig`` / ``AutoModelForCausalLM`` find the classes."""
    return {
        "AutoConfig": f"{family.config_module}.{family.config_class}",
        "AutoModelForCausalLM": f"{family.modeling_module}.{family.model_class}",
    }


DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3

# Files the export writes itself: a tokenizer file of the same name is refused.
_OWN_FILES = frozenset(
    {WEIGHTS_NAME, WEIGHTS_INDEX_NAME, CONFIG_NAME, PROVENANCE_NAME, README_NAME}
    | {name for family in FAMILIES for name in remote_code_files(family)}
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_ZIP_MAGIC = b"PK\x03\x04"


class ExportError(SlicebridgeError):
    """A directory is not a slicebridge export, or an export cannot be written as asked."""


# --------------------------------------------------------------------------------------------
# What an export reports
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSummary:
    """What ``export_model`` wrote (sizes in bytes; ``total_size`` counts tensor data only)."""

    path: str
    files: list[str]
    shards: list[str]
    total_size: int
    dtype: str
    sharded: bool
    dropped_tied: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        """Size of the whole directory on disk."""
        return sum((Path(self.path) / name).stat().st_size for name in self.files)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------------------------


def checkpoint_provenance(checkpoint: SliceGPTCheckpoint, *, loader: str = "builtin") -> dict[str, Any]:
    """The provenance of a model built from a SliceGPT checkpoint, as ``export_model`` takes it."""
    return {
        "base_model": str(checkpoint.base_dir),
        "checkpoint": str(checkpoint.checkpoint_path),
        "sparsity": checkpoint.sparsity,
        "round_interval": checkpoint.round_interval,
        "loader": loader,
        "params": checkpoint.params(),
    }


def complete_provenance(
    model: SlicedForCausalLM, provenance: Mapping[str, Any], verification: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The caller's provenance with what the model itself tells filled in.

    Keys read: ``base_model``, ``checkpoint`` (or ``slicegpt_model``), ``sparsity``,
    ``round_interval``, ``loader``, ``params`` (``dense``/``sliced``/``shortcut_q``),
    ``producer``; other keys are kept as given (a ``widths`` entry as
    ``source_widths``: ``widths`` is always read off the exported config). The base model and
    the checkpoint are recorded by name, never by a path of this machine (the README may be
    published). Parameter counts missing from the mapping are computed from the model, and
    ``actual_ratio`` from the counts; producer versions default to this interpreter's.
    """
    from .binfile import producer_versions
    from .checkpoint import SlicedWidths
    from .facts import actual_ratio, dense_base_config, parameter_counts

    given = dict(provenance)
    config = model.config
    given.pop("actual_ratio", None)  # always the one the counts give
    params = {
        **parameter_counts(model, dense_base_config(config.to_dict())),
        **{key: int(value) for key, value in (given.pop("params", None) or {}).items() if value is not None},
    }
    checkpoint = given.pop("checkpoint", None) or given.pop("slicegpt_model", None)
    given.pop("slicegpt_model", None)
    if given.get("widths") is not None:  # the exported config is authoritative; keep the caller's as given
        given["source_widths"] = given.pop("widths")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": "SliceGPT",
        "family": family_named(config.model_type).key,
        "base_model": _public_name(given.pop("base_model", None)),
        "checkpoint": _public_name(checkpoint),
        "sparsity": given.pop("sparsity", getattr(config, "sparsity", None)),
        "round_interval": given.pop("round_interval", getattr(config, "round_interval", None)),
        "actual_ratio": actual_ratio(params),
        "params": params,
        "widths": SlicedWidths.of_config(config).as_slicing_config(config.hidden_size),
        "loader": given.pop("loader", None),
        "dtype": dtype_name(model.lm_head.weight.dtype),
        "producer": given.pop("producer", None) or producer_versions(),
        **given,
        "verification": dict(verification) if verification is not None else None,
    }


def _public_name(path: str | None) -> str | None:
    """A local path's last part (``/home/me/models/Llama-3-8B`` -> ``Llama-3-8B``); a hub name as it is."""
    if path is None:
        return None
    text = os.fspath(path)
    return Path(text).name if os.path.isabs(text) or text.startswith(("~", ".")) else text


# --------------------------------------------------------------------------------------------
# Tensors and shards
# --------------------------------------------------------------------------------------------


def _tied_targets(model: SlicedForCausalLM) -> set[str]:
    """Names transformers leaves out of a checkpoint because they are tied to another tensor."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    keys = getattr(model, "_tied_weights_keys", None) or []
    return set(keys.keys() if isinstance(keys, Mapping) else keys)


def tensors_to_save(model: SlicedForCausalLM) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's tensors on the CPU, contiguous, each owning its storage, in state-dict order.

    Tied targets (``lm_head.weight`` when embeddings are tied) are left out, as transformers
    does: loading ties them again. Any other tensors that share memory are copied apart,
    since safetensors refuses shared storage. Returns the tensors and the names left out.
    """
    tied = _tied_targets(model)
    tensors: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if name in tied:
            dropped.append(name)
            continue
        cpu = tensor.detach().to("cpu").contiguous()
        storage = cpu.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != _tensor_bytes(cpu):
            cpu = cpu.clone()
        seen.add(cpu.untyped_storage().data_ptr())
        tensors[name] = cpu
    return tensors, dropped


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def plan_shards(tensors: Mapping[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    """Split tensor names into consecutive groups of at most ``max_shard_size`` bytes each.

    As transformers does: a tensor larger than the limit gets a shard of its own.
    """
    if max_shard_size <= 0:
        raise ExportError(f"max_shard_size must be positive, not {max_shard_size}")
    shards: list[list[str]] = [[]]
    current = 0
    for name, tensor in tensors.items():
        size = _tensor_bytes(tensor)
        if shards[-1] and current + size > max_shard_size:
            shards.append([])
            current = 0
        shards[-1].append(name)
        current += size
    return shards


def shard_file_name(index: int, count: int) -> str:
    """transformers' shard naming: ``model-00001-of-00003.safetensors`` (1-based)."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def write_weights(tensors: Mapping[str, torch.Tensor], directory: Path, max_shard_size: int) -> list[str]:
    """Write the safetensors file(s) (and the index when sharded); returns the weight file names."""
    groups = plan_shards(tensors, max_shard_size)
    if len(groups) == 1:
        _save_safetensors(dict(tensors), directory / WEIGHTS_NAME)
        return [WEIGHTS_NAME]
    names = [shard_file_name(idx + 1, len(groups)) for idx in range(len(groups))]
    weight_map: dict[str, str] = {}
    for file_name, group in zip(names, groups, strict=True):
        shard = {name: tensors[name] for name in group}
        _save_safetensors(shard, directory / file_name)
        weight_map.update(dict.fromkeys(group, file_name))
    index = {
        "metadata": {"total_size": sum(_tensor_bytes(tensor) for tensor in tensors.values())},
        "weight_map": weight_map,
    }
    _write_json(directory / WEIGHTS_INDEX_NAME, index)
    logger.info("weights split into %d shards of at most %d bytes", len(names), max_shard_size)
    return names


# safetensors' dtype names, in the order of its ``Dtype`` enum: its writer puts tensors in descending
# order of it (wider elements first), then by name.
_SAFETENSORS_DTYPES = {
    "bool": "BOOL",
    "uint8": "U8",
    "int8": "I8",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fn": "F8_E4M3",
    "int16": "I16",
    "uint16": "U16",
    "float16": "F16",
    "bfloat16": "BF16",
    "int32": "I32",
    "uint32": "U32",
    "float32": "F32",
    "float64": "F64",
    "int64": "I64",
    "uint64": "U64",
}
_SAFETENSORS_ORDER = {name: rank for rank, name in enumerate(_SAFETENSORS_DTYPES.values())}


def _safetensors_layout(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[bytes, list[str]]:
    """The header ``safetensors.torch.save_file`` writes for these tensors (length, then JSON padded with
    spaces to 8 bytes), and the tensors' names in the order their bytes follow it."""
    dtypes = {name: _SAFETENSORS_DTYPES.get(dtype_name(tensor.dtype)) for name, tensor in tensors.items()}
    unknown = sorted({str(tensors[name].dtype) for name, dtype in dtypes.items() if dtype is None})
    if unknown:
        raise ExportError(f"cannot export tensors of dtype {', '.join(unknown)} as safetensors here")
    order = sorted(tensors, key=lambda name: (-_SAFETENSORS_ORDER[dtypes[name]], name))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        size = _tensor_bytes(tensors[name])
        header[name] = {
            "dtype": dtypes[name],
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file of contiguous CPU tensors, as ``save_file`` writes it, through one ``StreamFile``
    and from the tensors' own memory: no copy is made (a full disk raises its ``OSError``)."""
    import torch

    header, order = _safetensors_layout(tensors, SAFETENSORS_METADATA)
    with StreamFile(path) as stream:
        stream.write(header)
        for name in order:
            stream.write(tensors[name].reshape(-1).view(torch.uint8).numpy())


# --------------------------------------------------------------------------------------------
# config.json, generation_config.json, remote code, tokenizer
# --------------------------------------------------------------------------------------------


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Indented, sorted JSON with a final newline (as ``save_pretrained`` formats it)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def export_config_dict(config: SlicedConfig, dtype: torch.dtype) -> dict[str, Any]:
    """``config.json`` in one form for transformers 4.41 and 5.x (only ``transformers_version`` differs).

    Starts from the non-default fields, makes every field of the family's config class explicit
    (the two versions disagree on which defaults they leave out), drops private keys
    (``_name_or_path``) and sets the remote-code and dtype keys.
    """
    import transformers

    family = family_named(config.model_type)
    data = {key: value for key, value in config.to_diff_dict().items() if not key.startswith("_")}
    own_fields = [
        name
        for name, parameter in inspect.signature(type(config).__init__).parameters.items()
        if name != "self" and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    for name in own_fields:
        data[name] = getattr(config, name)
    for name in ("torch_dtype", "dtype"):
        data[name] = dtype_name(dtype)
    data.update(
        architectures=[family.model_class],
        auto_map=auto_map(family),
        model_type=family.sliced_model_type,
        transformers_version=transformers.__version__,
    )
    return json.loads(json.dumps(data, default=str))


def minimal_generation_config(config: SlicedConfig) -> dict[str, Any]:
    """What ``GenerationConfig.from_model_config`` keeps: the special token ids."""
    import transformers

    data: dict[str, Any] = {"_from_model_config": True, "transformers_version": transformers.__version__}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(config, key, None)
        if value is not None:
            data[key] = value
    return data


def write_remote_code(directory: Path, family: Family) -> list[str]:
    """Copy the family's configuration and modeling files (and the shared ones), byte for byte."""
    source = Path(__file__).resolve().parent
    names = remote_code_files(family)
    for name in names:
        (directory / name).write_bytes((source / name).read_bytes())
    return list(names)


def _check_tokenizer_file_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith(".") or os.sep in name:
        raise ExportError(f"refusing a tokenizer file named {name!r}: plain file names only")
    if name in _OWN_FILES:
        raise ExportError(f"a tokenizer file may not be named {name!r}: the export writes that file itself")
    if name.lower().endswith(_PICKLE_SUFFIXES):
        raise ExportError(f"refusing tokenizer file {name!r}: the export holds no pickle-format files")


def write_tokenizer_files(directory: Path, files: Mapping[str, bytes]) -> list[str]:
    """Write the given tokenizer files (``generation_config.json`` among them, if given)."""
    for name, data in files.items():
        _check_tokenizer_file_name(name)
        if is_pickle_or_zip(data[:4]):
            raise ExportError(f"tokenizer file {name!r} is a pickle or zip archive; refusing to export it")
        (directory / name).write_bytes(bytes(data))
    return list(files)


# --------------------------------------------------------------------------------------------
# Pickle guard
# --------------------------------------------------------------------------------------------


def is_pickle_or_zip(head: bytes) -> bool:
    """True for bytes that start a pickle (protocol 2-5) or a zip archive (torch.save's format)."""
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head.startswith(_ZIP_MAGIC)


def find_pickles(directory: str | os.PathLike) -> list[str]:
    """Files under ``directory`` that are pickles or zip archives (relative paths)."""
    root = Path(directory)
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as handle:
                if is_pickle_or_zip(handle.read(4)):
                    found.append(str(path.relative_to(root)))
    return found


# --------------------------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _table(header: tuple[str, ...], rows: Iterable[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += [
        "| " + " | ".join(_fmt(cell) if not isinstance(cell, str) else cell for cell in row) + " |" for row in rows
    ]
    return lines


def _width_rows(widths: SlicedWidths) -> list[tuple[str, int, int, int, int]]:
    """Per-layer widths, consecutive identical layers merged into one row."""
    per_layer = list(
        zip(widths.attention_input, widths.attention_output, widths.mlp_input, widths.mlp_output, strict=True)
    )
    rows: list[tuple[str, int, int, int, int]] = []
    start = 0
    for idx in range(1, len(per_layer) + 1):
        if idx == len(per_layer) or per_layer[idx] != per_layer[start]:
            label = f"{start}" if idx - 1 == start else f"{start}–{idx - 1}"
            rows.append((label, *per_layer[start]))
            start = idx
    return rows


def _widths_section(recorded: Mapping[str, Any]) -> list[str]:
    """The model card's widths: a sentence, and a table of the layers (``recorded`` in SlicingConfig form)."""
    from .checkpoint import widths_from_slicing_config

    hidden = recorded["hidden_size"]
    widths = widths_from_slicing_config(recorded, recorded["layers_num"], hidden)
    constant = widths.constant_width()
    if constant is not None:
        summary = (
            f"Constant sliced width {constant} of {hidden} in all "
            f"{widths.num_layers} layers; the LM head reads {widths.lm_head}."
        )
    else:
        summary = (
            f"Per-layer sliced widths (dense width {hidden}); embeddings {widths.embedding}, LM head {widths.lm_head}."
        )
    header = ("layers", "attention in", "attention out", "MLP in", "MLP out")
    return [summary, "", *_table(header, [(label, *map(str, rest)) for label, *rest in _width_rows(widths)])]


def _verification_section(verification: Mapping[str, Any] | None) -> list[str]:
    if verification is None:
        return ["Not verified: this export was written without a verification run."]
    rows = [(f"`{name}`", value) for name, value in _flatten(verification)]
    return ["Logits of this export compared with the reference model:", "", *_table(("metric", "value"), rows)]


def _ratio_text(value: Any) -> str:
    return f"{value:.4f} ({value * 100:.2f} % of the dense parameters removed)" if value is not None else "—"


def model_card(provenance: Mapping[str, Any], name: str) -> str:
    """The README.md: YAML front matter, provenance, widths, how to load, verification."""
    params = provenance.get("params") or {}
    producer = provenance.get("producer") or {}
    family = family_named(provenance["family"])
    facts = [
        ("base model", f"`{provenance.get('base_model')}`"),
        ("SliceGPT checkpoint", f"`{provenance.get('checkpoint')}`"),
        ("sparsity", provenance.get("sparsity")),
        ("round_interval", provenance.get("round_interval")),
        ("actual ratio", _ratio_text(provenance.get("actual_ratio"))),
        ("parameters, dense base", params.get("dense")),
        ("parameters, sliced", params.get("sliced")),
        ("of which shortcut Qs", params.get("shortcut_q")),
        ("weights dtype", provenance.get("dtype")),
        ("loader used", provenance.get("loader")),
    ]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        "- slicegpt",
        "- sliced",
        "- slicebridge",
        "---",
        "",
        f"# {name}: a SliceGPT-sliced {family.title}",
        "",
        f"A {family.releases} model compressed with [SliceGPT](https://github.com/microsoft/TransformerCompression) "
        "(rotated and sliced residual stream, with a shortcut matrix on every residual connection), "
        "exported by slicebridge as safetensors with its own model code. No pickles, and no need "
        "for the `slicegpt` package to load it.",
        "",
        "## Provenance",
        "",
        *_table(("", ""), facts),
        "",
        "## Widths",
        "",
        *_widths_section(provenance["widths"]),
        "",
        "## How to load",
        "",
        "With transformers (4.41 or 5.x) and the model code shipped in this directory:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)',
        "```",
        "",
        f"The weights are {provenance.get('dtype')}: transformers 5.x loads them as they are, 4.x in "
        'float32 unless you pass `torch_dtype="auto"`. `trust_remote_code` on the tokenizer matters '
        "for transformers 5.x only, which reads config.json when loading a tokenizer and would "
        "otherwise ask before running the shipped configuration code.",
        "",
        "With slicebridge installed, without running any code from this directory:",
        "",
        "```python",
        "import slicebridge",
        "",
        f'loaded = slicebridge.load("{name}")  # or slicebridge.model.export.load_export(...)',
        'model, tokenizer = loaded["model"], loaded["tokenizer"]',
        "```",
        "",
        "## Verification",
        "",
        *_verification_section(provenance.get("verification")),
        "",
        "## Produced with",
        "",
        *_table(("package", "version"), sorted((key, _fmt(value)) for key, value in producer.items())),
        "",
        f"Machine-readable provenance: `{PROVENANCE_NAME}`.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Writing an export
# --------------------------------------------------------------------------------------------


def _narrow(directory: Path, max_mode: int | None) -> None:
    if max_mode is not None:
        from .binfile import narrow_permissions

        narrow_permissions(directory, max_mode)


def _json_ready(data: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON round trip: what slicebridge.json will hold (non-JSON values as strings, NaN kept)."""
    return json.loads(json.dumps(data, default=str))


def export_model(
    model: SlicedForCausalLM,
    out_dir: str | os.PathLike,
    *,
    tokenizer_files: Mapping[str, bytes],
    provenance: Mapping[str, Any],
    verification: Mapping[str, Any] | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    max_mode: int | None = None,
) -> ExportSummary:
    """Write ``model`` as a Hugging Face directory at ``out_dir``, atomically; see the module docstring.

    ``tokenizer_files`` maps file names to bytes (``binfile.tokenizer_files(dir)``);
    ``provenance`` is described in ``complete_provenance``; ``verification`` is a metrics dict
    shown in the model card (None: "not verified"). Raises ``OutputExists`` when ``out_dir``
    exists and ``overwrite`` is False, before any work; on any failure nothing is left behind.
    ``max_mode`` (``binfile.widest_mode`` of the files whose bytes it holds) narrows the permissions
    of the directory (before anything is written in it) and of its files.
    """
    out_path = check_output(out_dir, overwrite, directory=True)
    model_type = getattr(model.config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ExportError(
            f"export_model needs a sliced model of slicebridge's ({', '.join(MODEL_TYPES)}), got a "
            f"{type(model).__name__} (model_type {model_type!r})"
        )
    family = family_named(model_type)
    for name in tokenizer_files:
        _check_tokenizer_file_name(name)
    tensors, dropped = tensors_to_save(model)
    dtype = model.lm_head.weight.dtype
    record = _json_ready(complete_provenance(model, provenance, verification))

    with atomic_directory(out_path, overwrite) as tmp:
        _narrow(tmp, max_mode)
        weight_files = write_weights(tensors, tmp, max_shard_size)
        _write_json(tmp / CONFIG_NAME, export_config_dict(model.config, dtype))
        write_remote_code(tmp, family)
        write_tokenizer_files(tmp, tokenizer_files)
        if GENERATION_CONFIG_NAME not in tokenizer_files:
            _write_json(tmp / GENERATION_CONFIG_NAME, minimal_generation_config(model.config))
        _write_json(tmp / PROVENANCE_NAME, record)
        (tmp / README_NAME).write_text(model_card(record, out_path.name), encoding="utf-8")
        pickles = find_pickles(tmp)
        if pickles:
            raise ExportError(f"refusing to write an export containing pickle or zip files: {pickles}")
        files = sorted(path.name for path in tmp.iterdir())
        _narrow(tmp, max_mode)

    summary = ExportSummary(
        path=str(out_path),
        files=files,
        shards=weight_files,
        total_size=sum(_tensor_bytes(tensor) for tensor in tensors.values()),
        dtype=dtype_name(dtype),
        sharded=len(weight_files) > 1,
        dropped_tied=dropped,
        provenance=record,
    )
    logger.info(
        "exported %s: %d files, %d weight file(s), %s bytes of %s tensors",
        out_path,
        len(files),
        len(weight_files),
        f"{summary.total_size:,}",
        summary.dtype,
    )
    return summary


# --------------------------------------------------------------------------------------------
# Reading an export (no remote code)
# --------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ExportError(f"{what} {path} does not hold a JSON object")
    return data


def _check_is_export(directory: Path) -> dict[str, Any]:
    """The directory's config.json dict, after checking the directory is a slicebridge export."""
    if not directory.is_dir():
        raise ExportError(f"{directory} is not a directory; an export is a directory written by export_model")
    missing = [name for name in (CONFIG_NAME,) if not (directory / name).is_file()]
    if not (directory / WEIGHTS_NAME).is_file() and not (directory / WEIGHTS_INDEX_NAME).is_file():
        missing.append(f"{WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME})")
    if missing:
        raise ExportError(f"{directory} is not a slicebridge export: it has no {' and no '.join(missing)}")
    config = _read_json(directory / CONFIG_NAME, "the config")
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        hint = (
            " (a dense model: export a sliced one with slicebridge, or load this with transformers)"
            if any(model_type in family.model_types for family in FAMILIES)
            else ""
        )
        raise ExportError(
            f"{directory} is not a slicebridge export: config.json has model_type "
            f"{model_type!r}, expected one of {', '.join(MODEL_TYPES)}{hint}"
        )
    return config


def _weight_files(directory: Path) -> list[Path]:
    """The export's weight files: each a plain file name in ``directory``, never a path leading out of it."""
    if (directory / WEIGHTS_NAME).is_file():
        names = [WEIGHTS_NAME]
    else:
        index = _read_json(directory / WEIGHTS_INDEX_NAME, "the weights index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ExportError(f"{directory / WEIGHTS_INDEX_NAME} has no weight_map")
        names = sorted(set(map(str, weight_map.values())))
        outside = [name for name in names if name in ("", ".", "..") or Path(name).name != name]
        if outside:
            raise ExportError(
                f"{directory / WEIGHTS_INDEX_NAME} lists weight files outside the export "
                f"({outside[0]!r}); an export's shards are plain file names in it, so it was not read"
            )
    absent = [name for name in names if not (directory / name).is_file()]
    if absent:
        raise ExportError(f"{directory} is missing the weight shard(s) {absent} listed in {WEIGHTS_INDEX_NAME}")
    root = directory.resolve()
    linked_out = [name for name in names if not (directory / name).resolve().is_relative_to(root)]
    if linked_out:
        raise ExportError(f"{directory / linked_out[0]} is a link to a file outside the export; it was not read")
    return [directory / name for name in names]


def load_state_dict(directory: str | os.PathLike, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of an export, sharded or not, with ``safetensors.torch.load_file``."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(directory)):
        tensors.update(load_file(str(path), device=str(device) if device is not None else "cpu"))
    return tensors


def read_export_config(directory: str | os.PathLike) -> SlicedConfig:
    """The export's ``config.json`` as this package's config class of its family."""
    from . import portable

    data = _check_is_export(Path(directory))
    data = {
        key: value
        for key, value in data.items()
        if key not in ("auto_map", "torch_dtype", "dtype", "transformers_version")
    }
    try:
        return portable.config_from_dict(data)
    except (ValueError, TypeError, KeyError, ArithmeticError) as exc:
        where = Path(directory) / CONFIG_NAME
        raise ExportError(f"{where} does not describe a model slicebridge can build: {exc}") from None


def _load_tokenizer(directory: Path, config: SlicedConfig) -> Any:
    """``AutoTokenizer`` on the export, given our config: transformers 5.x would otherwise load
    config.json through AutoConfig, whose ``auto_map`` makes it ask whether to run remote code."""
    from transformers import AutoTokenizer

    if not any(
        (directory / name).is_file()
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    ):
        logger.warning("%s has no tokenizer files; returning no tokenizer", directory)
        return None
    try:  # never code from the directory: transformers would ask whether to run it
        return AutoTokenizer.from_pretrained(str(directory), config=config, trust_remote_code=False)
    except ValueError as exc:
        raise ExportError(
            f"the tokenizer in {directory} does not load without running code from the directory, "
            f"which slicebridge.load never does: {str(exc).splitlines()[0]}"
        ) from None


def load_export(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Load an export with slicebridge's own classes: no ``trust_remote_code``, no pickles.

    Returns ``{"model", "tokenizer", "config", "provenance"}`` (``provenance`` is slicebridge.json,
    empty if absent). ``dtype`` casts floating-point weights (default: as stored); ``device``
    places them (default: CPU). Raises ``ExportError`` naming what is missing when ``path`` is not
    an export of ours.
    """
    from . import portable

    directory = Path(path).expanduser()
    config = read_export_config(directory)
    try:
        model = portable.build_model(load_state_dict(directory, device), config, dtype=dtype, device=device)
    except (ValueError, TypeError, KeyError) as exc:
        raise ExportError(f"the weights in {directory} do not fit its config.json: {exc}") from None
    provenance: dict[str, Any] = {}
    if (directory / PROVENANCE_NAME).is_file():
        provenance = _read_json(directory / PROVENANCE_NAME, "the provenance")
    else:
        logger.warning("%s has no %s: no provenance to return", directory, PROVENANCE_NAME)
    return {
        "model": model,
        "tokenizer": _load_tokenizer(directory, model.config),
        "config": model.config,
        "provenance": provenance,
    }


__all__ = [
    "ExportError",
    "ExportSummary",
    "checkpoint_provenance",
    "export_model",
    "find_pickles",
    "load_export",
    "load_state_dict",
    "read_export_config",
]
