"""Test stand-in for the official ``slicegpt.data_utils`` (microsoft/TransformerCompression).

Reproduces:
- ``get_dataset(name)``: the four official names (``wikitext2``, ``ptb``, ``c4``, ``alpaca``) through
  ``datasets.load_dataset`` with the official paths, configs and data files, then the official
  post-processing (c4 and alpaca lose their extra columns; alpaca's train split is cut 80/10/10
  into train/test/validation with seed 42). Any other name raises
  ``NotImplementedError("The provided dataset is not supported")``. Offline, a name that is not
  cached fails however ``datasets`` fails (nothing is faked).
  Stand-in extra: when ``$SLICEGPT_STANDIN_DATASETS`` names a directory holding ``<name>/``
  (written by ``DatasetDict.save_to_disk``), that snapshot is read with ``datasets.load_from_disk``
  IN PLACE OF the download, and the official post-processing still runs on it -- so tests can
  take the named-dataset path offline.
- ``prepare_dataloader``: empty examples dropped; unless ``varied_seqlen``, examples are packed:
  with torch seeded, a random start among the unused examples, examples joined with ``"\\n\\n"``
  (``tokenizer.tokenize``, the separator only after the first non-empty piece) until
  ``max_seqlen`` tokens, the used examples dropped, and a pack kept (cut to ``max_seqlen`` tokens,
  ``convert_tokens_to_string``) only if it reached ``max_seqlen`` -- so SHORT TEXT GIVES FEWER
  THAN ``nsamples`` SAMPLES, silently. Batches are tokenised lazily (``set_transform``:
  ``padding="longest"``, truncation to ``max_seqlen``, ``labels`` = ``input_ids``; every key the
  tokenizer returns is kept, e.g. ``token_type_ids``); a ``SubsetRandomSampler`` over the first
  ``nsamples`` of a seeded ``randperm`` draws its ORDER from torch's global RNG when iterated.
- ``prepare_test_dataloader``: the ``text`` column joined with ``"\\n\\n"``, tokenised in one go,
  cut into ``len // seqlen`` rows of ``seqlen`` tokens (the tail dropped), batched in order.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader, Dataset, SubsetRandomSampler
from transformers import PreTrainedTokenizerBase

STANDIN_DATASETS_ENV_VAR = "SLICEGPT_STANDIN_DATASETS"

log = logging.getLogger(__name__)

_DATASETS = {
    "wikitext2": {"path": "wikitext", "config_name": "wikitext-2-raw-v1"},
    "ptb": {"path": "ptb_text_only", "config_name": "penn_treebank"},
    "c4": {
        "path": "allenai/c4",
        "config_name": "allenai--c4",
        "data_files": {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        "cols_to_remove": ["url", "timestamp"],
    },
    "alpaca": {"path": "tatsu-lab/alpaca", "cols_to_remove": ["input", "output", "instruction"]},
}


def _load(name: str, properties: dict) -> datasets.DatasetDict:
    snapshots = os.environ.get(STANDIN_DATASETS_ENV_VAR)
    if snapshots and (Path(snapshots) / name).is_dir():
        return datasets.load_from_disk(str(Path(snapshots) / name))
    return datasets.load_dataset(
        properties["path"], name=properties.get("config_name"), data_files=properties.get("data_files")
    )


def get_dataset(name: str) -> datasets.DatasetDict:
    """The named calibration / perplexity dataset, split as the official experiments use it."""
    log.info("Loading dataset: %s", name)
    if name not in _DATASETS:
        raise NotImplementedError("The provided dataset is not supported")
    properties = _DATASETS[name]
    ds = _load(name, properties)
    if "cols_to_remove" in properties:
        ds = ds.remove_columns(properties["cols_to_remove"])
    if name == "alpaca":  # train/test/validation carved out of alpaca's one split
        ds = ds["train"].train_test_split(test_size=0.2, seed=42)
        held_out = ds.pop("test").train_test_split(test_size=0.5, seed=42)
        ds["test"] = held_out["train"]
        ds["validation"] = held_out["test"]
    log.info("Loading dataset done")
    return ds


class _TestDataset(Dataset):
    """The whole text tokenised once and cut into rows of ``seqlen`` tokens."""

    def __init__(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, seqlen: int = 2048) -> None:
        encoded = tokenizer("\n\n".join(ds["text"]), return_tensors="pt")
        rows = encoded.input_ids.numel() // seqlen
        self.input_ids = encoded.input_ids[0, : rows * seqlen].reshape(rows, seqlen)
        self.attn_mask = encoded.attention_mask[0, : rows * seqlen].reshape(rows, seqlen)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[idx], "attention_mask": self.attn_mask[idx]}

    def __len__(self) -> int:
        return len(self.input_ids)


def prepare_test_dataloader(
    dataset: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, seqlen: int = 2048, batch_size: int = 1
) -> DataLoader:
    """Perplexity batches: the test text in consecutive rows of ``seqlen`` tokens."""
    log.info("Preparing test dataloader")
    loader = DataLoader(_TestDataset(dataset, tokenizer, seqlen), batch_size=batch_size)
    log.info("Preparing test dataloader done")
    return loader


def _packed_texts(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_seqlen: int, nsamples: int, seed: int
) -> list[str]:
    """Up to ``nsamples`` texts of exactly ``max_seqlen`` tokens, each made of consecutive examples."""
    torch.manual_seed(seed)
    unused = list(range(len(texts)))
    packed: list[str] = []
    while len(packed) < nsamples and len(unused) > 0:
        start = torch.randint(0, len(unused), (1,)).item()
        end, tokens = start, []
        while len(tokens) < max_seqlen and end < len(unused):
            tokens += tokenizer.tokenize(("\n\n" if tokens else "") + texts[unused[end]])
            end += 1
        unused = unused[:start] + unused[end:]
        if len(tokens) >= max_seqlen:
            packed.append(tokenizer.convert_tokens_to_string(tokens[:max_seqlen]))
    return packed


def prepare_dataloader(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seqlen: int = 2048,
    batch_size: int = 1,
    nsamples: int = 128,
    varied_seqlen: bool = False,
    seed=42,
) -> DataLoader:
    """Calibration batches of (up to) ``nsamples`` samples of (up to) ``max_seqlen`` tokens."""
    log.info("Preparing dataloader")
    if not varied_seqlen and not nsamples:
        log.warning(
            "varied_seqlen=False, but nsamples is not specified. This will lead to tokenization of the entire "
            "dataset, which will be slow."
        )
    column = dataset.column_names[0]
    ds = dataset.filter(lambda example: len(example[column]) > 0)
    if not varied_seqlen:
        ds = datasets.Dataset.from_dict({column: _packed_texts(ds[column], tokenizer, max_seqlen, nsamples, seed)})

    def tokenize(batch: dict) -> dict:
        encoded = tokenizer(
            batch[column], padding="longest", max_length=max_seqlen, truncation=True, return_tensors="pt"
        )
        encoded["labels"] = encoded["input_ids"].clone()
        return encoded

    ds.set_transform(tokenize)
    torch.manual_seed(seed)
    sampler = SubsetRandomSampler(torch.randperm(len(ds))[:nsamples])
    loader = DataLoader(ds, batch_size=batch_size, sampler=sampler)
    log.info("Preparing dataloader done")
    return loader
