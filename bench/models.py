"""The models the benchmarks use, made locally with slicebridge's own maker and cached.

``model_set(cache_dir, preset, sparsities)`` returns a dense model dir and one run_slicegpt-style
save dir per sparsity, making whatever is missing. Every piece is built in a temporary sibling and
renamed into place, so a half-made model is never reused (and two runs racing on the same cache
dir both end up with a complete one). The cache survives between runs (``bench/.cache`` by
default): the ~1B preset takes a minute or two to make and 4 GB of disk.
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
    build_atomically(dense, lambda tmp: make_dense_preset(tmp, preset, dtype=DTYPE))
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
