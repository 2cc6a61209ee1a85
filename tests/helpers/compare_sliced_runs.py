"""Compare two run_slicegpt save dirs of one model and sparsity through slicegpt's own loader.

Run in an env where ``import slicegpt`` works:
``python compare_sliced_runs.py MODEL_NAME DIR_A DIR_B SPARSITY REFERENCE_PT``. Both checkpoints are
loaded with ``hf_utils.load_sliced_model`` (their fp32 values put back in) and run on the fixture's
``probe_ids``; prints
one JSON line: the NMSE of B's logits against A's, whether the state dicts have the same keys and
shapes, whether the SlicingConfigs are equal, and whether the shapes are the official fixture's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from slicegpt import hf_utils


def load(model_name: str, directory: str, sparsity: float, state: dict):
    """slicegpt's loader's model, holding the checkpoint's exact fp32 values (the loader builds it in fp16,
    whose rounding of two differently oriented checkpoints alone differs by ~1e-6 NMSE)."""
    adapter, _ = hf_utils.load_sliced_model(model_name, directory, sparsity=sparsity, round_interval=8)
    model = adapter.model.float()
    model.load_state_dict(state)
    return model.eval()


def main(model_name: str, dir_a: str, dir_b: str, sparsity: str, reference: str) -> None:
    value = float(sparsity)
    stem = f"{Path(model_name).name}_{value}"
    states = [torch.load(Path(d) / f"{stem}.pt", weights_only=True) for d in (dir_a, dir_b)]
    configs = [json.loads((Path(d) / f"{stem}.json").read_text()) for d in (dir_a, dir_b)]
    official = torch.load(next((Path(reference).parent / "sliced").glob("*.pt")), weights_only=True)
    ids = torch.load(reference, weights_only=True)["probe_ids"]
    with torch.no_grad():
        a, b = (
            load(model_name, d, value, state)(input_ids=ids).logits
            for d, state in zip((dir_a, dir_b), states, strict=True)
        )
    nmse = float(((a - b) ** 2).sum() / (a**2).sum())
    shapes = [{k: tuple(v.shape) for k, v in state.items()} for state in states]
    print(
        json.dumps(
            {
                "nmse": nmse,
                "same_keys": list(states[0]) == list(states[1]),
                "same_shapes": shapes[0] == shapes[1],
                "same_slicing_config": configs[0] == configs[1],
                "shapes_like_fixture": shapes[0] == {k: tuple(v.shape) for k, v in official.items()},
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
