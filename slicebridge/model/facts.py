"""Facts about a sliced model for ``info``: architecture, widths, parameter counts, dtype, provenance.

Shared by the caller's env (``client.info``) and the server (which reads the seed's
``.bin`` files that only the slicegpt env can unpickle).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ArtifactInfo:
    path: str
    kind: str  # "checkpoint", "bin", "export" or "seed-bin"
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

    def table(self) -> str:
        rows = [("path", self.path), ("kind", self.kind), ("architecture", self.architecture),
                ("layers", str(self.num_layers)),
                ("hidden size", f"{self.hidden_size} → {self.sliced_width}" if self.sliced_width else
                 str(self.hidden_size)),
                ("sparsity", _fmt(self.sparsity)), ("round_interval", _fmt(self.round_interval)),
                ("dtype", self.dtype), ("file size", f"{self.file_bytes / 1e6:.2f} MB")]
        if self.params:
            rows += [("params (dense)", f"{self.params['dense']:,}"),
                     ("params (sliced)", f"{self.params['sliced']:,}"),
                     ("  of which shortcut Qs", f"{self.params['shortcut_q']:,}"),
                     ("actual ratio", f"{self.actual_ratio:.4f}" if self.actual_ratio is not None else "-")]
        if self.widths:
            rows.append(("widths", _widths_summary(self.widths)))
        if self.loader:
            rows.append(("loader", self.loader))
        if self.producer:
            rows.append(("producer", ", ".join(f"{k} {v}" for k, v in self.producer.items() if v)))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:{width}s}  {v}" for k, v in rows]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _fmt(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _widths_summary(widths: dict) -> str:
    parts = []
    for key in ("attention_input_dimensions", "attention_output_dimensions", "mlp_input_dimensions",
                "mlp_output_dimensions"):
        values = list(widths.get(key, {}).values())
        if values:
            shown = str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))
            parts.append(f"{key.replace('_dimensions', '')} {shown}")
    return f"embedding {list(widths.get('embedding_dimensions', {}).values())}, " + ", ".join(parts) + \
        f", head {widths.get('head_dimension')}"


def constant_width(widths: dict) -> int | None:
    values = set(widths.get("embedding_dimensions", {}).values())
    for key in ("attention_input_dimensions", "mlp_input_dimensions"):
        values |= set(widths.get(key, {}).values())
    return values.pop() if len(values) == 1 else None


def file_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def model_info(path: Path, kind: str, model, meta: dict) -> ArtifactInfo:
    from slicebridge.model.modeling_sliced_llama import count_sliced_parameters, dense_llama_parameter_count

    config = model.config
    counted = count_sliced_parameters(model)
    dense = dense_llama_parameter_count(config.to_dict())
    widths = meta.get("widths") or _widths_of_config(config)
    return ArtifactInfo(
        path=str(path), kind=kind, architecture="SlicedLlamaForCausalLM (portable, SliceGPT-sliced Llama)",
        num_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        sliced_width=constant_width(widths), widths=widths,
        params={"dense": dense, "sliced": counted.total, "shortcut_q": counted.shortcut},
        actual_ratio=1 - counted.total / dense, sparsity=meta.get("sparsity"),
        round_interval=meta.get("round_interval"),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."), file_bytes=file_bytes(path),
        producer=meta.get("producer") or {}, loader=meta.get("loader") or "",
    )


def _widths_of_config(config) -> dict:
    def per_layer(values):
        return {str(i): int(v) for i, v in enumerate(values)}

    return {"embedding_dimensions": {"0": config.embedding_dimension},
            "attention_input_dimensions": per_layer(config.attention_input_dimensions),
            "attention_output_dimensions": per_layer(config.attention_output_dimensions),
            "mlp_input_dimensions": per_layer(config.mlp_input_dimensions),
            "mlp_output_dimensions": per_layer(config.mlp_output_dimensions),
            "head_dimension": config.lm_head_dimension}
