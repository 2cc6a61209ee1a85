"""Facts about a sliced model for ``info``: architecture, widths, parameter counts, dtype, provenance.

Shared by the caller's env (``client.info``) and the server (which reads the seed's
``.bin`` files that only the slicegpt env can unpickle). The one place parameter counts
and the actual ratio are computed, for ``info``, ``convert``, ``export`` and ``upgrade``
alike; widths are ``checkpoint.SlicedWidths``, recorded in SliceGPT's SlicingConfig form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slicebridge.dtypes import dtype_name

if TYPE_CHECKING:  # pragma: no cover
    from .checkpoint import SlicedWidths


@dataclass
class ArtifactInfo:
    path: str
    kind: str  # "checkpoint", "bin", "export" or "seed-bin"
    family: str = ""  # families.Family.key: llama, opt, phi2, phi3
    architecture: str = ""
    num_layers: int = 0
    hidden_size: int = 0  # the dense model's width
    sliced_width: int | None = None  # the residual width, when every layer has the same
    widths: dict = field(default_factory=dict)  # SlicingConfig-style per-layer widths
    params: dict = field(default_factory=dict)  # dense, sliced, shortcut_q
    actual_ratio: float | None = None
    sparsity: float | None = None
    round_interval: int | None = None
    dtype: str = ""
    file_bytes: int = 0
    producer: dict = field(default_factory=dict)
    loader: str = ""
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def set_widths(self, widths: SlicedWidths, hidden_size: int) -> None:
        """Record ``widths`` (in SliceGPT's SlicingConfig form) and the dense width they slice."""
        self.num_layers, self.hidden_size = widths.num_layers, hidden_size
        self.widths = widths.as_slicing_config(hidden_size)
        self.sliced_width = widths.constant_width()

    def set_params(self, params: Mapping[str, int]) -> None:
        """Record the parameter counts (``dense``, ``sliced``, ``shortcut_q``) and the ratio they give."""
        self.params = {key: int(params[key]) for key in ("dense", "sliced", "shortcut_q")}
        self.actual_ratio = actual_ratio(self.params)

    def table(self) -> str:
        unknown = "unknown (see the notes)"  # facts a seed .bin's opcodes did not yield
        rows = [
            ("path", self.path),
            ("kind", self.kind),
            ("family", _family_title(self.family) or unknown),
            ("architecture", self.architecture or unknown),
            ("layers", str(self.num_layers or unknown)),
            (
                "hidden size",
                f"{self.hidden_size} → {self.sliced_width}" if self.sliced_width else str(self.hidden_size or unknown),
            ),
            ("sparsity", _fmt(self.sparsity)),
            ("round_interval", _fmt(self.round_interval)),
            ("dtype", self.dtype),
            ("file size", f"{self.file_bytes / 1e6:.2f} MB"),
        ]
        if self.params:
            rows += [
                ("params (dense)", f"{self.params['dense']:,}"),
                ("params (sliced)", f"{self.params['sliced']:,}"),
                ("  of which shortcut Qs", f"{self.params['shortcut_q']:,}"),
                ("actual ratio", f"{self.actual_ratio:.4f}" if self.actual_ratio is not None else "-"),
            ]
        if self.widths:
            rows.append(("widths", _widths_summary(self.widths)))
        if self.loader:
            rows.append(("loader", self.loader))
        if self.producer:
            rows.append(("producer", ", ".join(f"{k} {v}" for k, v in self.producer.items() if v)))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:{width}s}  {v}" for k, v in rows]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _family_title(key: str) -> str:
    from .families import BY_KEY

    family = BY_KEY.get(key)
    return f"{family.releases} ({family.key})" if family is not None else key


def _fmt(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _widths_summary(recorded: dict) -> str:
    from .checkpoint import widths_from_slicing_config

    hidden = int(recorded.get("hidden_size") or 0)
    layers = len(recorded.get("attention_input_dimensions") or {})
    widths = widths_from_slicing_config(recorded, layers, hidden, bool(recorded.get("parallel_blocks")))
    constant = widths.constant_width()
    if constant is not None:
        return f"{constant} in all {widths.num_layers} layers, head {widths.lm_head}"
    columns = {
        "attention_input": widths.attention_input,
        "attention_output": widths.attention_output,
        "mlp_input": widths.mlp_input,
        "mlp_output": widths.mlp_output,
    }
    shown = ", ".join(f"{name} {'/'.join(map(str, values))}" for name, values in columns.items())
    return f"embedding {widths.embedding}, {shown}, head {widths.lm_head}"


def actual_ratio(params: Mapping[str, int]) -> float:
    """The fraction of the dense parameters removed: ``1 - sliced / dense`` (shortcut Qs count as kept)."""
    return 1.0 - params["sliced"] / params["dense"]


def parameter_counts(model, base_config: Mapping[str, Any]) -> dict[str, int]:
    """``dense`` (the base model's, from its config), ``sliced`` and ``shortcut_q`` (the model's own)."""
    from .portable import family_of
    from .sliced_decoder import count_sliced_parameters

    counted = count_sliced_parameters(model)
    dense = family_of(model.config).dense_parameters(base_config)
    return {"dense": dense, "sliced": counted.total, "shortcut_q": counted.shortcut}


def file_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def model_info(path: Path, kind: str, model, meta: dict) -> ArtifactInfo:
    """Facts about a loaded portable model (a ``.bin``'s or an export's), with ``meta``'s recorded settings."""
    from .checkpoint import SlicedWidths
    from .portable import family_of

    config = model.config
    family = family_of(config)
    info = ArtifactInfo(
        path=str(path),
        kind=kind,
        family=family.key,
        architecture=f"{type(model).__name__} (portable, SliceGPT-sliced {family.title})",
        sparsity=meta.get("sparsity"),
        round_interval=meta.get("round_interval"),
        dtype=dtype_name(next(model.parameters()).dtype),
        file_bytes=file_bytes(path),
        producer=meta.get("producer") or {},
        loader=meta.get("loader") or "",
    )
    info.set_widths(SlicedWidths.of_config(config), config.hidden_size)
    info.set_params(parameter_counts(model, dense_base_config(config.to_dict())))
    return info


def dense_base_config(sliced_config: Mapping[str, Any]) -> dict[str, Any]:
    """The dense base model's config fields, from a sliced config's copy of them."""
    base = dict(sliced_config)
    base["tie_word_embeddings"] = bool(sliced_config.get("base_tie_word_embeddings", False))
    return base
