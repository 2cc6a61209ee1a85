"""Perplexity as the official run_slicegpt measures it (``slicebridge.model.perplexity``).

What is held: the held-out text is cut as ``prepare_test_dataloader`` cuts it (joined by
``"\\n\\n"``, tokenized once, whole windows only) and too little of it is refused in a sentence;
the number is ``evaluate_ppl``'s formula (per-window mean NLL over the labels that are not the
pad token, a pad id of 0 ignoring nothing, ``exp`` of the mean over windows), checked against a
hand computation, against transformers' own loss on the dense fixture models, and against the
official model's logits for the portable sliced model; and it is the same under transformers
4.41 (the slicegpt env) as under 5.x.
"""

from __future__ import annotations

import json
import math
import subprocess
from types import SimpleNamespace

import pytest
import torch
from helpers.paths import FIXTURE, REPO, SHARED_FIXTURES, slicegpt_env_path
from torch import nn

from slicebridge.model.calibration import CalibrationError, paragraphs
from slicebridge.model.checkpoint import read_checkpoint
from slicebridge.model.perplexity import evaluate_perplexity, perplexity_windows
from slicebridge.model.sample_text import embedded_text
from slicebridge.model.slicing import DenseCheckpoint, dense_model

SEQLEN = 64

# Run by the slicegpt env's interpreter (transformers 4.41): the same windows and perplexities.
IN_441 = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch, transformers
from transformers import AutoTokenizer
from slicebridge.model.calibration import paragraphs
from slicebridge.model.checkpoint import read_checkpoint
from slicebridge.model.perplexity import evaluate_perplexity, perplexity_windows
from slicebridge.model.sample_text import embedded_text
from slicebridge.model.slicing import DenseCheckpoint, dense_model
fixtures, seqlen = sys.argv[2], int(sys.argv[3])
out = {"transformers": transformers.__version__}
for family in ("llama", "opt"):
    base = f"{fixtures}/slicegpt-{family}-tiny/base"
    windows = perplexity_windows(paragraphs(embedded_text())[:3], AutoTokenizer.from_pretrained(base), seqlen)
    model = dense_model(DenseCheckpoint.load(base), torch.float32)
    out[family] = {"windows": windows.tolist(), "ppl": evaluate_perplexity(model, windows, batch_size=3,
                   pad_token_id=model.config.pad_token_id)}
sliced = read_checkpoint(f"{fixtures}/slicegpt-llama-tiny/sliced").build_model(dtype=torch.float32)
windows = torch.tensor(out["llama"]["windows"])
out["sliced"] = evaluate_perplexity(sliced, windows, batch_size=2, pad_token_id=None)
print(json.dumps(out))
"""


class TableModel(nn.Module):
    """A causal LM whose logits at a position are a fixed row per (token, position): enough to
    compute the formula by hand. Records what it was called with."""

    def __init__(self, vocab: int, seqlen: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(5)
        self.table = nn.Parameter(torch.randn(vocab, seqlen, vocab, generator=generator, dtype=torch.float64))
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        self.calls.append({"shape": tuple(input_ids.shape), "mask": attention_mask, "training": self.training})
        positions = torch.arange(input_ids.shape[1])
        return SimpleNamespace(logits=self.table[input_ids, positions].to(torch.float16))


def hand_perplexity(logits: torch.Tensor, ids: torch.Tensor, ignored: int | None) -> float:
    """exp of the mean over rows of each row's mean -log p(next token), by plain loops."""
    means = []
    for row_logits, row in zip(logits.tolist(), ids.tolist(), strict=True):
        nlls = []
        for position in range(len(row) - 1):
            label, scores = row[position + 1], row_logits[position]
            if label == ignored:
                continue
            top = max(scores)
            log_total = top + math.log(sum(math.exp(score - top) for score in scores))
            nlls.append(log_total - scores[label])
        means.append(sum(nlls) / len(nlls))
    return math.exp(sum(means) / len(means))


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return paragraphs(embedded_text())


def tokenizer_of(family: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SHARED_FIXTURES / f"slicegpt-{family}-tiny" / "base"))


def test_windows_are_whole_seqlen_cuts_of_the_joined_text(texts):
    tokenizer = tokenizer_of("llama")
    ids = tokenizer("\n\n".join(texts))["input_ids"]
    windows = perplexity_windows(texts, tokenizer, SEQLEN)
    assert windows.dtype == torch.long and windows.shape == (len(ids) // SEQLEN, SEQLEN)
    assert windows.flatten().tolist() == ids[: windows.numel()] and len(ids) % SEQLEN
    assert torch.equal(perplexity_windows(texts, tokenizer, len(ids)), torch.tensor([ids]))
    with pytest.raises(CalibrationError) as raised:
        perplexity_windows(texts, tokenizer, len(ids) + 1)
    assert str(raised.value) == (
        f"the held-out text has {len(ids)} tokens, fewer than ppl_eval_seqlen={len(ids) + 1}; "
        "add text (or hold more of it out), or lower ppl_eval_seqlen"
    )


def test_the_formula_is_the_official_one_by_hand():
    vocab, seqlen = 7, 6
    model = TableModel(vocab, seqlen).train()
    ids = torch.tensor([[0, 3, 3, 1, 3, 6], [5, 4, 3, 2, 1, 0], [2, 2, 2, 3, 4, 5]])
    logits = model(ids).logits.float()
    model.calls.clear()
    for pad, ignored in ((3, 3), (0, None), (None, None)):  # a pad id of 0 is falsy: nothing ignored
        ppl = evaluate_perplexity(model, ids, batch_size=2, pad_token_id=pad)
        assert ppl == pytest.approx(hand_perplexity(logits, ids, ignored), rel=1e-6), pad
    assert ppl != pytest.approx(hand_perplexity(logits, ids, 3), rel=1e-3)  # ignoring the pad matters
    assert [call["shape"] for call in model.calls[:2]] == [(2, 6), (1, 6)]
    assert all(torch.equal(call["mask"], torch.ones(call["shape"], dtype=torch.long)) for call in model.calls)
    assert not any(call["training"] for call in model.calls)

    done = []
    one_by_one = evaluate_perplexity(model, ids, batch_size=1, pad_token_id=3, progress=lambda *a: done.append(a))
    assert one_by_one == pytest.approx(evaluate_perplexity(model, ids, batch_size=3, pad_token_id=3), rel=1e-6)
    assert done == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(ValueError, match="batch_size must be positive"):
        evaluate_perplexity(model, ids, batch_size=0, pad_token_id=None)


@pytest.mark.parametrize("family", ["llama", "opt"])
@torch.no_grad()
def test_dense_fixture_perplexity_is_transformers_own_loss(texts, family):
    """With equal windows and no label ignored, the mean of the windows' means is the mean over
    all tokens: transformers' own causal-LM loss."""
    from transformers import AutoModelForCausalLM

    base = SHARED_FIXTURES / f"slicegpt-{family}-tiny" / "base"
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    windows = perplexity_windows(texts[:4], tokenizer_of(family), SEQLEN)
    pad = model.config.pad_token_id
    assert pad is None or not (windows[:, 1:] == pad).any()  # OPT's pad (1) is not in the text
    ours = evaluate_perplexity(model, windows, batch_size=4, pad_token_id=pad)
    theirs = math.exp(model(input_ids=windows, labels=windows).loss.item())
    assert ours == pytest.approx(theirs, rel=1e-4) and 1 < ours < 2 * model.config.vocab_size
    rebuilt = dense_model(DenseCheckpoint(base), torch.float32)
    assert evaluate_perplexity(rebuilt, windows, batch_size=5, pad_token_id=pad) == pytest.approx(ours, rel=1e-6)


def test_a_portable_sliced_model_gives_the_official_models_perplexity():
    reference = torch.load(FIXTURE / "reference.pt", weights_only=True)
    ids = reference["text_ids"]
    model = read_checkpoint(FIXTURE / "sliced").build_model(dtype=torch.float32)
    ours = evaluate_perplexity(model, ids, batch_size=1, pad_token_id=None)
    assert ours == pytest.approx(hand_perplexity(reference["text_logits_fp32"], ids, None), rel=1e-5)
    half = read_checkpoint(FIXTURE / "sliced").build_model(dtype=torch.float16)
    assert evaluate_perplexity(half, ids, batch_size=1, pad_token_id=None) == pytest.approx(ours, rel=1e-2)


def test_the_same_under_transformers_441(texts, tmp_path):
    python = slicegpt_env_path() / "bin" / "python"
    if not python.exists():
        pytest.fail(f"the stand-in slicegpt env is missing at {python.parent.parent}: run `make test`")
    done = subprocess.run(
        [str(python), "-c", IN_441, str(REPO), str(SHARED_FIXTURES), str(SEQLEN)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert theirs["transformers"].startswith("4.41")
    for family in ("llama", "opt"):
        windows = perplexity_windows(texts[:3], tokenizer_of(family), SEQLEN)
        assert windows.tolist() == theirs[family]["windows"] and len(windows) > 3, family
        base = SHARED_FIXTURES / f"slicegpt-{family}-tiny" / "base"
        model = dense_model(DenseCheckpoint.load(base), torch.float32)
        ours = evaluate_perplexity(model, windows, batch_size=3, pad_token_id=model.config.pad_token_id)
        assert ours == pytest.approx(theirs[family]["ppl"], rel=1e-5), family
    sliced = read_checkpoint(FIXTURE / "sliced").build_model(dtype=torch.float32)
    windows = torch.tensor(theirs["llama"]["windows"])
    ours = evaluate_perplexity(sliced, windows, batch_size=2, pad_token_id=None)
    assert ours == pytest.approx(theirs["sliced"], rel=1e-5)
