"""Local calibration text for slicing, taken as the official ``run_slicegpt.py`` takes a dataset.

``read_calibration(path)`` reads the examples (a dataset's rows) from a text file, a ``.jsonl``
file or a directory of them; ``split_held_out`` keeps the last ones apart for perplexity; and
``sample_calibration_ids`` draws, from the rest, the samples the official
``data_utils.prepare_dataloader`` draws, as token ids for slicebridge's own maker.
``check_enough`` refuses, before any slicing, text that gives fewer samples than asked.

Reading rules:

- a text file (any suffix but ``.jsonl``): one example per paragraph (paragraphs are separated
  by blank lines, as wikitext's rows are), stripped; empty ones are dropped;
- a ``.jsonl`` file: one example per line, its ``text`` field (a string) verbatim; blank lines,
  and texts that are empty or whitespace only, are skipped;
- a directory: its regular files in sorted name order, each read as above. It is not recursed
  into (subdirectories are skipped), hidden files (``.name``) are skipped, and so is every
  symbolic link in it, so nothing outside the directory is read. A directory of more than
  ``MAX_DIRECTORY_ENTRIES`` entries is refused.

Files must be UTF-8 text (a leading BOM is dropped): one with NUL bytes, or bytes that are not
UTF-8, is refused. A file, and all of a directory's files together, may hold at most
``settings.calibration_max_bytes()`` bytes; sizes are checked before anything is read, and no
read goes past the bound. Every refusal is a ``CalibrationError`` of one sentence naming the path.

torch + transformers' tokenizers only (no ``datasets``, no slicegpt): it runs in both envs.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from slicebridge import settings
from slicebridge.errors import SlicebridgeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

JSONL_SUFFIX = ".jsonl"
MAX_DIRECTORY_ENTRIES = 100_000
# The official prepare_dataloader joins the examples of a sample with this separator.
EXAMPLE_SEPARATOR = "\n\n"


class CalibrationError(SlicebridgeError):
    """Calibration text that cannot be used as given: missing, not text, too big, or too little of it."""


@dataclass
class CalibrationText:
    """The examples read from ``source`` (an absolute path), in order, and the files they came from."""

    examples: list[str]
    source: str
    files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_calibration(path: str | os.PathLike[str]) -> CalibrationText:
    """The calibration examples in ``path``: a text file, a ``.jsonl`` file or a directory of them
    (see the module docstring for the rules)."""
    source = Path(path).expanduser().absolute()
    if not source.exists():
        raise CalibrationError(f"{source} does not exist; pass a text file, a .jsonl file or a directory of them")
    if not (source.is_dir() or source.is_file()):
        raise CalibrationError(f"{source} is not a regular file or a directory")
    limit = settings.calibration_max_bytes()
    try:
        files = _directory_files(source) if source.is_dir() else [source]
        _check_sizes(source, files, limit)
        examples = _read_all(files, limit)
    except OSError as exc:  # unreadable (permissions), or gone while being read
        raise CalibrationError(f"cannot read {exc.filename or source}: {exc.strerror or exc}") from None
    if not examples:
        raise CalibrationError(f"{source} holds no calibration text (it is empty or whitespace only)")
    logger.info("read %d calibration examples from %d file(s) in %s", len(examples), len(files), source)
    return CalibrationText(examples=examples, source=str(source), files=[str(file) for file in files])


def _directory_files(directory: Path) -> list[Path]:
    """The regular, visible files directly in ``directory`` (no symlinks), sorted by name."""
    files: list[Path] = []
    skipped = 0
    with os.scandir(directory) as entries:
        for count, entry in enumerate(entries, 1):
            if count > MAX_DIRECTORY_ENTRIES:
                raise CalibrationError(
                    f"{directory} holds more than {MAX_DIRECTORY_ENTRIES} entries; pass a smaller directory or one file"
                )
            if not entry.name.startswith(".") and entry.is_file(follow_symlinks=False):
                files.append(Path(entry.path))
            else:
                skipped += 1
    if not files and not skipped:
        raise CalibrationError(f"{directory} is empty; put text or .jsonl files in it")
    if not files:
        raise CalibrationError(
            f"{directory} holds no calibration file, only {skipped} hidden files, subdirectories or symlinks "
            "(which are skipped); put text or .jsonl files directly in it"
        )
    if skipped:
        logger.info("%s: skipped %d hidden files, subdirectories or symlinks", directory, skipped)
    return sorted(files)


def _check_sizes(source: Path, files: list[Path], limit: int) -> None:
    """Refuse a file, or files together, over ``limit`` bytes (from their sizes, before reading)."""
    variable = settings.CALIBRATION_MAX_BYTES.name
    total = 0
    for file in files:
        size = file.stat().st_size
        if size > limit:
            raise CalibrationError(f"{file} is {size} bytes, over the {limit}-byte calibration limit ({variable})")
        total += size
        if total > limit:
            raise CalibrationError(
                f"the calibration files in {source} add up to more than the {limit}-byte limit ({variable})"
            )


def _read_all(files: list[Path], limit: int) -> list[str]:
    """The examples of ``files`` in order, never reading more than ``limit`` bytes in all (a file
    may have grown since its size was checked)."""
    examples: list[str] = []
    budget = limit
    for file in files:
        with file.open("rb") as handle:
            data = handle.read(budget + 1)
        if len(data) > budget:
            raise CalibrationError(f"{file} grew past the {limit}-byte calibration limit while it was read")
        budget -= len(data)
        examples += _examples(file, data)
    return examples


def _examples(file: Path, data: bytes) -> list[str]:
    """The examples of one file's bytes (``.jsonl``: its lines' texts, else its paragraphs)."""
    if b"\0" in data:
        raise CalibrationError(f"{file} is binary (it holds NUL bytes), not UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{file} is not UTF-8 text (invalid byte at offset {exc.start})") from None
    return _jsonl_examples(file, text) if file.suffix.lower() == JSONL_SUFFIX else paragraphs(text)


def paragraphs(text: str) -> list[str]:
    """The blank-line-separated paragraphs of ``text``, stripped, empty ones dropped."""
    found: list[str] = []
    lines: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.strip():
            lines.append(line)
        elif lines:
            found.append("\n".join(lines).strip())
            lines = []
    return found


def _jsonl_examples(file: Path, text: str) -> list[str]:
    """Each non-blank line's ``text`` field (skipped when empty or whitespace only)."""
    examples = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CalibrationError(f'{file}:{number} is not a JSON object with a string "text" field')
        if record["text"].strip():
            examples.append(record["text"])
    return examples


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def split_held_out(examples: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """``(train, held_out)``: the LAST ``ceil(fraction * n)`` examples held out (none when
    ``fraction`` is 0), the others kept, in order. At least one example must remain to calibrate on."""
    if not 0 <= fraction < 1:
        raise CalibrationError(f"held_out must be in [0, 1) (the fraction kept for perplexity), not {fraction}")
    count = len(examples)
    held = math.ceil(round(fraction * count, 9))  # 0.1 * 30 is 3.0000000000000004, not more than 3
    if count - held < 1:
        raise CalibrationError(
            f"holding out {held} of {count} calibration examples leaves none to calibrate on; "
            "add text, or lower held_out"
        )
    return list(examples[: count - held]), list(examples[count - held :])


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def check_enough(n_available: int, nsamples: int, max_seqlen: int, *, varied_seqlen: bool = False) -> None:
    """Refuse calibration text that gives fewer than ``nsamples`` samples (the official would go
    on with fewer, quietly)."""
    if n_available >= nsamples:
        return
    plural = "" if n_available == 1 else "s"
    what = f"example{plural}" if varied_seqlen else f"sample{plural} of {max_seqlen} tokens"
    limits = "cal_nsamples" if varied_seqlen else "cal_nsamples or cal_max_seqlen"
    raise CalibrationError(
        f"the calibration text gives {n_available} {what}, fewer than cal_nsamples={nsamples}; "
        f"add text, or lower {limits}"
    )


def sample_calibration_ids(
    examples: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_seqlen: int,
    nsamples: int,
    seed: int,
    varied_seqlen: bool = False,
) -> torch.Tensor:
    """``[nsamples, L]`` token ids: the samples the official ``prepare_dataloader`` draws from
    ``examples`` (non-empty ones) with the same arguments, in the order its sampler's indices list them.

    Without ``varied_seqlen`` a sample is examples joined by ``"\\n\\n"`` from a random start,
    tokenized (``tokenizer.tokenize``) until ``max_seqlen`` tokens, turned back into a string
    and tokenized again with truncation to ``max_seqlen`` (as the official's ``set_transform``
    does, which adds whatever special tokens the tokenizer adds, a BOS say); examples used are
    not used again and a sample that falls short is dropped. With ``varied_seqlen`` a sample is
    one example, truncated. Which samples are taken is ``torch.randperm(n)[:nsamples]`` after
    ``torch.manual_seed(seed)``. Torch's global RNG is seeded and drawn from exactly as the
    official does (wrap the call in ``torch.random.fork_rng()`` to keep the caller's state).

    Unlike the official, which pads a batch to its longest row and masks the padding, the rows
    are cut to the shortest one's length ``L``: the maker takes equal-length rows. Too few
    samples raise ``CalibrationError`` (``check_enough``) before the samples are tokenized.
    """
    if max_seqlen < 1 or nsamples < 1:
        raise CalibrationError(f"cal_max_seqlen and cal_nsamples must be positive, not {max_seqlen} and {nsamples}")
    texts = [text for text in examples if len(text) > 0]  # the official's dataset.filter
    if not varied_seqlen:
        texts = concatenated_samples(texts, tokenizer, max_seqlen=max_seqlen, nsamples=nsamples, seed=seed)
    check_enough(len(texts), nsamples, max_seqlen, varied_seqlen=varied_seqlen)
    torch.manual_seed(seed)
    picked = torch.randperm(len(texts))[:nsamples].tolist()
    rows = tokenizer([texts[index] for index in picked], max_length=max_seqlen, truncation=True)["input_ids"]
    length = min(len(row) for row in rows)
    if length == 0:
        raise CalibrationError("a calibration sample tokenizes to no tokens at all; remove the examples that do")
    if length < max(len(row) for row in rows):
        logger.info("calibration rows cut to the shortest one's %d tokens", length)
    return torch.tensor([row[:length] for row in rows], dtype=torch.long)


def concatenated_samples(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, *, max_seqlen: int, nsamples: int, seed: int
) -> list[str]:
    """The official's ``varied_seqlen=False`` samples as strings: from a random start index, the
    unused examples joined by ``"\\n\\n"`` until ``max_seqlen`` tokens, cut there; at most
    ``nsamples`` of them (fewer when the text runs out)."""
    samples: list[str] = []
    torch.manual_seed(seed)
    indices = list(range(len(texts)))
    while len(samples) < nsamples and indices:
        start = int(torch.randint(0, len(indices), (1,)).item())
        stop, tokens = start, []
        while len(tokens) < max_seqlen and stop < len(indices):
            tokens += tokenizer.tokenize((EXAMPLE_SEPARATOR if tokens else "") + texts[indices[stop]])
            stop += 1
        indices = indices[:start] + indices[stop:]
        if len(tokens) >= max_seqlen:
            samples.append(tokenizer.convert_tokens_to_string(tokens[:max_seqlen]))
    return samples
