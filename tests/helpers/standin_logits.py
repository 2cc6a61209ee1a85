"""Load a run_slicegpt save directory with the stand-in official loader and save its logits.

Run by the stand-in slicegpt env's interpreter (transformers 4.41):

    .envs/slicegpt/bin/python tests/helpers/standin_logits.py \
        <save_dir> <model_name> <sparsity> <round_interval> <ids.pt> <logits_out.pt>

It puts ``tests/standin`` on sys.path itself, loads the checkpoint with
``slicegpt.hf_utils.load_sliced_model(model_name, save_dir, sparsity=..., round_interval=...)``,
runs the token ids in ``ids.pt`` (a LongTensor [batch, seq]) through the model as loaded (fp16)
and after ``.float()``, and writes ``{"logits_fp16", "logits_fp32"}`` (float32 tensors) to
``logits_out.pt``. Prints one JSON object describing what was loaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

STANDIN = Path(__file__).resolve().parents[1] / "standin"
if str(STANDIN) not in sys.path:
    sys.path.insert(0, str(STANDIN))

import torch  # noqa: E402
import transformers  # noqa: E402
from slicegpt import hf_utils  # noqa: E402


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def main(
    save_dir: str, model_name: str, sparsity: float, round_interval: int, ids_path: str, out_path: str
) -> dict[str, Any]:
    ids = torch.load(ids_path, weights_only=True)
    adapter, tokenizer = hf_utils.load_sliced_model(
        model_name, save_dir, sparsity=sparsity, round_interval=round_interval
    )
    model = adapter.model
    layer = model.model.layers[0]
    report = {
        "transformers": transformers.__version__,
        "model_class": type(model).__name__,
        "dtype": str(model.dtype),
        "rope_theta": float(model.config.rope_theta),
        "embedding_shape": list(model.model.embed_tokens.weight.shape),
        "attn_shortcut_shape": list(layer.attn_shortcut_Q.shape),
        "last_mlp_shortcut_shape": list(model.model.layers[-1].mlp_shortcut_Q.shape),
        "lm_head_shape": list(model.lm_head.weight.shape),
        "tokenizer_class": type(tokenizer).__name__,
    }
    logits = {"logits_fp16": logits_of(model, ids)}
    model.float()
    logits["logits_fp32"] = logits_of(model, ids)
    torch.save(logits, out_path)
    return report


if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit("usage: standin_logits.py <save_dir> <model_name> <sparsity> <round_interval> <ids.pt> <out.pt>")
    save_dir, model_name, sparsity, interval, ids_path, out_path = sys.argv[1:]
    print(json.dumps(main(save_dir, model_name, float(sparsity), int(interval), ids_path, out_path)))
