"""The models the benchmarks use, made locally with slicebridge's own maker and cached.

``model_set(cache_dir, preset, sparsities)`` returns a dense model dir and one run_slicegpt-style
save dir per sparsity, making whatever is missing. Every piece is built in a temporary sibling and
renamed into place, so a half-made model is never reused (and two runs racing on the same cache
dir both end up with a complete one). The cache survives between runs (``bench/.cache`` by
default): the ~1B preset takes a minute or two to make and 4 GB of disk.

Presets are slicebridge's Llama presets ("tiny", "small", "1b") and ``SIZES``, the benchmarks' own
shapes of other sizes. "3b" is Llama-3.2-3B's shape with the 1b preset's 32,000-token vocabulary
(the tokenizer is trained on a small embedded text): ~3.0B parameters, 6.0 GB dense and 5.2 GB
sliced at 0.25 in fp16; making it took 15 minutes on a busy 2-core machine, 11 GB of disk and a
6.6 GB peak RSS.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

MODEL_NAME = "meta-llama/Meta-Llama-3-bench"
DTYPE = "float16"
# The benchmarks' own presets: the Llama preset each starts from, and what it changes.
SIZES: dict[str, tuple[str, dict]] = {
    # ~0.12B parameters.
    "0.1b": ("1b", dict(hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=4)),
    # ~0.34B parameters.
    "0.3b": ("1b", dict(hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=16, num_kv_heads=4)),
    # Llama-3.2-3B's shape, 32,000 tokens: ~3.0B parameters.
    "3b": (
        "1b",
        dict(
            hidden_size=3072,
            intermediate_size=8192,
            num_layers=28,
            num_heads=24,
            num_kv_heads=8,
            rope_theta=500000.0,
        ),
    ),
}


@dataclass
class ModelSet:
    preset: str
    dense: Path
    sliced: dict[float, Path] = field(default_factory=dict)  # sparsity -> save dir
    made_seconds: float = 0.0

    def checkpoint(self, sparsity: float) -> Path:
        """The ``.pt`` of one sparsity."""
        (pt,) = sorted(self.sliced[sparsity].glob("*.pt"))
        return pt


def build_atomically(target: Path, build) -> Path:
    if (target / ".complete").is_file():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:6]}.partial")
    try:
        build(tmp)
        (tmp / ".complete").write_text(json.dumps({"made_at": time.time()}))
        try:
            os.rename(tmp, target)
        except OSError:  # someone else finished it first, or a stale incomplete copy is in the way
            if (target / ".complete").is_file():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def model_set(cache_dir: Path, preset: str, sparsities: list[float], log=print) -> ModelSet:
    """The dense ``preset`` model (fp16) and its slicings at ``sparsities``, made if missing."""
    from slicebridge.model.dense import make_dense_preset
    from slicebridge.model.slicing import slice_llama

    started = time.perf_counter()
    root = Path(cache_dir) / "models" / f"{preset}-{DTYPE}"
    root.mkdir(parents=True, exist_ok=True)
    dense = root / "dense"
    if not (dense / ".complete").is_file():
        log(f"   making the dense {preset} model in {dense} ...")
    base, overrides = SIZES.get(preset, (preset, {}))
    build_atomically(dense, lambda tmp: make_dense_preset(tmp, base, dtype=DTYPE, **overrides))
    result = ModelSet(preset, dense)
    for sparsity in sparsities:
        target = root / f"sliced-{sparsity}"
        if not (target / ".complete").is_file():
            log(f"   slicing it at sparsity {sparsity} into {target} ...")
        result.sliced[sparsity] = build_atomically(
            target, lambda tmp, s=sparsity: slice_llama(dense, tmp, sparsity=s, model_name=MODEL_NAME)
        )
    result.made_seconds = time.perf_counter() - started
    return result


if __name__ == "__main__":  # python bench/models.py CACHE_DIR PRESET SPARSITY...
    import sys

    made = model_set(Path(sys.argv[1]), sys.argv[2], [float(s) for s in sys.argv[3:]])
    print(made)
