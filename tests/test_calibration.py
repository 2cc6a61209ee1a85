"""Local calibration text (``slicebridge.model.calibration``): reading, splitting and sampling.

What is held: a text file gives its blank-line-separated paragraphs, a ``.jsonl`` its lines'
``text`` fields, a directory its visible regular files in name order (no subdirectories, no
symlinks); what cannot be used (a missing path, an empty directory, binary or non-UTF-8 bytes, a
bad ``.jsonl`` line, no text at all, a file or a directory over the byte bound or the entry bound)
is refused in one sentence naming it, a too-big file before a byte of it is read. The held-out
split takes the last examples. The sampling is deterministic by seed, seeds and draws torch's
global RNG as the official ``prepare_dataloader`` does, re-tokenizes each sample (a tokenizer
that adds a BOS gets it at the start of every row, within ``max_seqlen``), and refuses too few
samples before slicing.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from helpers.paths import SHARED_FIXTURES

from slicebridge.model import calibration
from slicebridge.model.calibration import (
    CalibrationError,
    check_enough,
    read_calibration,
    sample_calibration_ids,
    split_held_out,
)
from slicebridge.model.sample_text import embedded_text
from slicebridge.settings import SettingInvalid

BASE = SHARED_FIXTURES / "slicegpt-llama-tiny" / "base"
BOS_ID = 1  # <s> in every fixture tokenizer


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def refused(path: Path) -> str:
    with pytest.raises(CalibrationError) as raised:
        read_calibration(path)
    message = str(raised.value)
    assert message.count(". ") == 0 and "\n" not in message, message  # one sentence
    return message


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BASE))


@pytest.fixture(scope="module")
def bos_tokenizer(tmp_path_factory):
    """The fixture's tokenizer with a post-processor that puts ``<s>`` before every sequence."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("bos")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).write_bytes((BASE / name).read_bytes())
    spec = json.loads((BASE / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [BOS_ID], "tokens": ["<s>"]}},
    }
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    return AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def sentences() -> list[str]:
    """The embedded English text's sentences (~60 examples, no newlines)."""
    return [s.strip() + "." for s in re.split(r"\.\s", embedded_text().replace("\n", " ")) if s.strip()]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def test_a_text_file_gives_its_paragraphs(tmp_path):
    content = "\ufeff  First line\r\nsecond line  \r\n\r\n \t \n\n\nSecond paragraph.\n   \nThird\n"
    path = write(tmp_path / "notes.md", content)
    text = read_calibration(path)
    assert text.examples == ["First line\nsecond line", "Second paragraph.", "Third"]
    assert text.source == str(path.absolute()) and text.files == [str(path.absolute())]


def test_a_jsonl_file_gives_its_lines_texts(tmp_path):
    rows = [{"text": "  keep my spaces "}, {"text": ""}, None, {"text": "   "}, {"text": "two\n\nparagraphs", "id": 4}]
    content = "\r\n".join("  " if row is None else json.dumps(row) for row in rows)  # a blank line, CRLF ends
    path = write(tmp_path / "rows.JSONL", content + "\n")
    assert read_calibration(path).examples == ["  keep my spaces ", "two\n\nparagraphs"]


@pytest.mark.parametrize("bad", ["not json", '["a list"]', '{"txt": "no text"}', '{"text": 5}', "[" * 100000])
def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path, bad):
    path = write(tmp_path / "rows.jsonl", '{"text": "fine"}\n\n' + bad + "\n")
    assert refused(path) == f'{path}:3 is not a JSON object with a string "text" field'


def test_a_directory_gives_its_visible_regular_files_in_name_order(tmp_path):
    outside = write(tmp_path / "outside.txt", "never read")
    directory = tmp_path / "data"
    write(directory / "b.jsonl", json.dumps({"text": "from b"}))
    write(directory / "a.txt", "from a\n\nagain a")
    write(directory / ".hidden.txt", "hidden")
    write(directory / "sub" / "c.txt", "in a subdirectory")
    (directory / "link.txt").symlink_to(outside)
    text = read_calibration(directory)
    assert text.examples == ["from a", "again a", "from b"]
    assert text.files == [str(directory / "a.txt"), str(directory / "b.jsonl")]
    assert text.source == str(directory)


def test_what_cannot_be_read_is_refused_in_a_sentence_naming_it(tmp_path):
    missing = tmp_path / "missing.txt"
    assert refused(missing) == f"{missing} does not exist; pass a text file, a .jsonl file or a directory of them"
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert refused(empty_dir) == f"{empty_dir} is empty; put text or .jsonl files in it"
    only_links = tmp_path / "links"
    only_links.mkdir()
    (only_links / "a.txt").symlink_to(write(tmp_path / "real.txt", "text"))
    write(only_links / ".hidden", "text")
    assert refused(only_links) == (
        f"{only_links} holds no calibration file, only 2 hidden files, subdirectories or symlinks (which are "
        "skipped); put text or .jsonl files directly in it"
    )

    binary = write(tmp_path / "weights.txt", b"abc\x00\x01\x02")
    assert refused(binary) == f"{binary} is binary (it holds NUL bytes), not UTF-8 text"
    latin = write(tmp_path / "latin.txt", "caf\u00e9".encode("latin-1"))
    assert refused(latin) == f"{latin} is not UTF-8 text (invalid byte at offset 3)"
    in_dir = write(tmp_path / "mixed" / "b.bin", b"\xff\xfe")
    write(tmp_path / "mixed" / "a.txt", "good text")
    assert refused(tmp_path / "mixed") == f"{in_dir} is not UTF-8 text (invalid byte at offset 0)"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert refused(fifo) == f"{fifo} is not a regular file or a directory"
    for name, content in (("empty.txt", ""), ("blank.txt", " \n\t\n\n "), ("blank.jsonl", '{"text": " "}\n\n')):
        path = write(tmp_path / name, content)
        assert refused(path) == f"{path} holds no calibration text (it is empty or whitespace only)"


def test_an_unreadable_file_is_refused_in_a_sentence(tmp_path, monkeypatch):
    locked = write(tmp_path / "locked" / "a.txt", "text")

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "open", denied)  # as chmod 0 would, for anyone but root
    assert refused(locked.parent) == f"cannot read {locked}: Permission denied"


def test_files_over_the_byte_bound_are_refused_before_they_are_read(tmp_path, monkeypatch):
    monkeypatch.setenv("SLICEBRIDGE_CALIBRATION_MAX_BYTES", "100")
    big = write(tmp_path / "one" / "big.txt", "x" * 101)
    small = write(tmp_path / "small.txt", "y" * 100)
    directory = tmp_path / "two"
    write(directory / "a.txt", "a" * 60)
    write(directory / "b.txt", "b" * 60)
    assert read_calibration(small).examples == ["y" * 100]

    def no_reading(*args, **kwargs):
        raise AssertionError("a file over the bound was opened")

    monkeypatch.setattr(Path, "open", no_reading)
    assert refused(big) == (
        f"{big} is 101 bytes, over the 100-byte calibration limit (SLICEBRIDGE_CALIBRATION_MAX_BYTES)"
    )
    assert refused(directory) == (
        f"the calibration files in {directory} add up to more than the 100-byte limit "
        "(SLICEBRIDGE_CALIBRATION_MAX_BYTES)"
    )


class RecordedReads:
    """A file handle whose ``read`` sizes are recorded."""

    def __init__(self, handle, sizes: list[int]) -> None:
        self.handle, self.sizes = handle, sizes

    def __enter__(self) -> RecordedReads:
        return self

    def __exit__(self, *exc_info) -> None:
        self.handle.close()

    def read(self, size: int = -1) -> bytes:
        self.sizes.append(size)
        return self.handle.read(size)


def test_a_file_that_grows_while_it_is_read_is_not_read_past_the_bound(tmp_path, monkeypatch):
    """Sizes are checked, then a file grows: no read asks for more than what is left of the bound."""
    monkeypatch.setenv("SLICEBRIDGE_CALIBRATION_MAX_BYTES", "100")
    directory = tmp_path / "growing"
    write(directory / "a.txt", "a" * 60)
    second = write(directory / "b.txt", "b" * 30)
    check_sizes = calibration._check_sizes

    def then_grow(*args) -> None:
        check_sizes(*args)
        with open(second, "w") as handle:  # not Path.open, which records reads
            handle.write("b" * 10_000)

    sizes: list[int] = []
    real_open = Path.open
    monkeypatch.setattr(calibration, "_check_sizes", then_grow)
    monkeypatch.setattr(
        Path, "open", lambda path, *args, **kwargs: RecordedReads(real_open(path, *args, **kwargs), sizes)
    )
    assert refused(directory) == f"{second} grew past the 100-byte calibration limit while it was read"
    assert sizes == [101, 41]


def test_a_huge_sparse_file_is_refused_at_the_default_bound_without_reading_it(tmp_path):
    huge = tmp_path / "huge.txt"
    with huge.open("wb") as handle:
        handle.truncate((1 << 30) + 1)  # sparse: nothing is written
    assert refused(huge) == (
        f"{huge} is {(1 << 30) + 1} bytes, over the {1 << 30}-byte calibration limit "
        "(SLICEBRIDGE_CALIBRATION_MAX_BYTES)"
    )


def test_a_bad_byte_bound_setting_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SLICEBRIDGE_CALIBRATION_MAX_BYTES", "lots")
    with pytest.raises(SettingInvalid, match="SLICEBRIDGE_CALIBRATION_MAX_BYTES='lots'"):
        read_calibration(write(tmp_path / "a.txt", "text"))


def test_a_directory_over_the_entry_bound_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "MAX_DIRECTORY_ENTRIES", 3)
    for index in range(4):
        write(tmp_path / "many" / f"{index}.txt", "text")
    assert refused(tmp_path / "many") == (
        f"{tmp_path / 'many'} holds more than 3 entries; pass a smaller directory or one file"
    )
    os.remove(tmp_path / "many" / "3.txt")
    assert len(read_calibration(tmp_path / "many").examples) == 3


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def test_the_last_examples_are_held_out():
    examples = [f"e{index}" for index in range(30)]
    assert split_held_out(examples, 0.0) == (examples, [])
    assert split_held_out(examples, 0.1) == (examples[:27], examples[27:])  # 0.1 * 30 is 3.0000000000000004
    assert split_held_out(examples[:10], 0.25) == (examples[:7], examples[7:10])  # ceil(2.5)
    assert split_held_out(examples[:2], 0.01) == (examples[:1], examples[1:2])
    with pytest.raises(CalibrationError, match="holding out 1 of 1 calibration examples leaves none"):
        split_held_out(examples[:1], 0.5)
    for fraction in (1.0, -0.1):
        with pytest.raises(CalibrationError, match=r"held_out must be in \[0, 1\)"):
            split_held_out(examples, fraction)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_concatenated_samples_are_deterministic_by_seed_and_full_length(tokenizer, sentences):
    options = dict(max_seqlen=32, nsamples=4, varied_seqlen=False)
    first = sample_calibration_ids(sentences, tokenizer, seed=42, **options)
    assert first.shape == (4, 32) and first.dtype == torch.long
    assert torch.equal(first, sample_calibration_ids(sentences, tokenizer, seed=42, **options))
    assert not torch.equal(first, sample_calibration_ids(sentences, tokenizer, seed=7, **options))

    # The first sample drawn: the examples from a seeded random start, joined by "\n\n", cut at
    # 32 tokens, made a string and tokenized again; it is where the seeded randperm puts index 0.
    torch.manual_seed(42)
    start = int(torch.randint(0, len(sentences), (1,)))
    tokens = tokenizer.tokenize("\n\n".join(sentences[start : start + 8]))[:32]
    wanted = tokenizer(tokenizer.convert_tokens_to_string(tokens))["input_ids"]
    torch.manual_seed(42)
    position = torch.randperm(4).tolist().index(0)
    assert first[position].tolist() == wanted


def test_the_global_rng_is_seeded_and_drawn_as_the_official_draws_it(tokenizer, sentences):
    """The official seeds torch's RNG, draws a start index per sample, seeds it again and draws one
    randperm: what is left of the RNG afterwards tells whether we drew the same."""
    torch.manual_seed(0)
    sample_calibration_ids(sentences, tokenizer, max_seqlen=32, nsamples=4, seed=42, varied_seqlen=False)
    after_ours = torch.rand(3)
    torch.manual_seed(42)
    torch.randperm(4)
    assert torch.equal(after_ours, torch.rand(3))

    ids = sample_calibration_ids(sentences, tokenizer, max_seqlen=40, nsamples=5, seed=3, varied_seqlen=True)
    torch.manual_seed(3)
    picked = torch.randperm(len(sentences))[:5].tolist()
    rows = tokenizer([sentences[index] for index in picked], max_length=40, truncation=True)["input_ids"]
    length = min(map(len, rows))
    assert ids.tolist() == [row[:length] for row in rows]
    assert ids.shape[1] == length < max(map(len, rows)) <= 40  # rows of several lengths: cut to the shortest


def test_a_tokenizer_that_adds_a_bos_gets_it_in_every_row_within_max_seqlen(tokenizer, bos_tokenizer, sentences):
    """Each sample is re-tokenized with truncation to max_seqlen, special tokens included: with a
    BOS the rows are the same samples, shifted right by the BOS and cut at max_seqlen."""
    plain = sample_calibration_ids(sentences, tokenizer, max_seqlen=24, nsamples=3, seed=1, varied_seqlen=False)
    with_bos = sample_calibration_ids(sentences, bos_tokenizer, max_seqlen=24, nsamples=3, seed=1, varied_seqlen=False)
    assert with_bos.shape == plain.shape == (3, 24)
    assert (with_bos[:, 0] == BOS_ID).all() and BOS_ID not in plain
    assert torch.equal(with_bos[:, 1:], plain[:, :-1])


def test_too_few_samples_are_refused_before_slicing(tokenizer, sentences):
    with pytest.raises(CalibrationError) as raised:
        sample_calibration_ids(sentences[:1], tokenizer, max_seqlen=64, nsamples=8, seed=0, varied_seqlen=False)
    assert str(raised.value) == (
        "the calibration text gives 0 samples of 64 tokens, fewer than cal_nsamples=8; "
        "add text, or lower cal_nsamples or cal_max_seqlen"
    )
    with pytest.raises(CalibrationError, match="gives 5 samples of 64 tokens, fewer than cal_nsamples=8"):
        check_enough(5, 8, 64)
    with pytest.raises(CalibrationError, match="gives 1 sample of 64 tokens, fewer than cal_nsamples=8"):
        check_enough(1, 8, 64)
    with pytest.raises(CalibrationError, match="gives 3 examples, fewer than cal_nsamples=4; add text, or lower"):
        sample_calibration_ids(["a", "", "b", "c"], tokenizer, max_seqlen=8, nsamples=4, seed=0, varied_seqlen=True)
    check_enough(8, 8, 64)
    # The text runs out: the samples that reached 64 tokens are all there is.
    available = len(calibration.concatenated_samples(sentences, tokenizer, max_seqlen=64, nsamples=1000, seed=0))
    assert 10 < available < 40
    ids = sample_calibration_ids(sentences, tokenizer, max_seqlen=64, nsamples=available, seed=0)
    assert ids.shape == (available, 64)
    with pytest.raises(CalibrationError, match=f"gives {available} samples of 64 tokens, fewer than cal_nsamples="):
        sample_calibration_ids(sentences, tokenizer, max_seqlen=64, nsamples=available + 1, seed=0)
