"""One source of truth per concept (issue 11): widths, parameter counts and the actual ratio, the
logit comparison, and the server's seed-.bin and cache parts.

Every form of an artifact (checkpoint, ``.bin``, export) is described by the same code, so they
report the same numbers; verification in the caller's env and the server's check against the
official model compare logits with one routine.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers.paths import FIXTURE, REPO

from slicebridge.client.artifact_info import info
from slicebridge.model.compare import compare, logit_metrics
from slicebridge.model.dense import PRESETS, make_dense_llama
from slicebridge.model.families import BY_KEY
from slicebridge.model.slicing import slice_llama
from slicebridge.server.cache import CacheKey, ModelCache

CHECKPOINT = FIXTURE / "sliced" / "Meta-Llama-3-tiny_0.25.pt"


@pytest.fixture(scope="module")
def tied_run(tmp_path_factory):
    """A run_slicegpt-style directory sliced from a base model whose head is tied to its embeddings."""
    tmp = tmp_path_factory.mktemp("tied")
    dense = make_dense_llama(
        tmp / "Llama-tied", dtype="float32", tie_word_embeddings=True, **dict(PRESETS["tiny"], num_layers=2)
    )
    run = slice_llama(dense, tmp / "run", sparsity=0.25, num_calibration_samples=2, calibration_seq_len=16)
    return next(run.glob("*.pt")), dense


def test_every_form_of_a_tied_model_reports_the_same_counts_widths_and_ratio(bridge, tied_run, tmp_path):
    """The dense count is the base model's (tied head counted once) whether read from the checkpoint,
    a .bin or an export; the ratio is computed from the counts, so all three and the results agree."""
    checkpoint, base = tied_run
    converted = bridge.convert(checkpoint, tmp_path / "tied.bin", base_model=base, loader="builtin")
    exported = bridge.export(checkpoint, tmp_path / "tied-hf", base_model=base, loader="builtin")
    described = [info(checkpoint), info(tmp_path / "tied.bin"), info(tmp_path / "tied-hf")]

    counts = described[0].params
    base_config = json.loads((base / "config.json").read_text())
    assert base_config["tie_word_embeddings"] and counts["dense"] == BY_KEY["llama"].dense_parameters(base_config)
    assert [d.params for d in described] == [counts] * 3
    assert converted.params == exported.params == counts
    ratios = {converted.actual_ratio, exported.actual_ratio, *(d.actual_ratio for d in described)}
    assert ratios == {1 - counts["sliced"] / counts["dense"]}
    assert [d.sliced_width for d in described] == [96] * 3
    assert [d.widths for d in described] == [described[0].widths] * 3
    assert "Constant sliced width 96 of 128 in all 2 layers" in (tmp_path / "tied-hf" / "README.md").read_text()


def test_per_layer_widths_are_said_so_by_info_and_the_card(tmp_path):
    """Layers of different widths: the model card and ``info`` agree that there is no single sliced width."""
    from slicebridge.model.configuration_sliced_llama import SlicedLlamaConfig
    from slicebridge.model.export import export_model
    from slicebridge.model.modeling_sliced_llama import SlicedLlamaForCausalLM

    config = SlicedLlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        embedding_dimension=96,
        attention_input_dimensions=[96, 80],
        attention_output_dimensions=[96, 80],
        mlp_input_dimensions=[96, 80],
        mlp_output_dimensions=[80, 128],
        lm_head_dimension=128,
    )
    export_model(SlicedLlamaForCausalLM(config).eval(), tmp_path / "hf", tokenizer_files={}, provenance={})
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "Per-layer sliced widths (dense width 128); embeddings 96, LM head 128." in card
    assert "| 0 | 96 | 96 | 96 | 80 |" in card and "| 1 | 80 | 80 | 80 | 128 |" in card
    described = info(tmp_path / "hf")
    assert described.sliced_width is None
    assert "attention_input 96/80" in described.table()


def test_logit_metrics_are_the_products():
    """The numbers tests assert on are the ones verification reports: one routine, any dtype."""
    reference = torch.load(FIXTURE / "reference.pt", weights_only=True)
    want = reference["logits_fp32"]
    got = want.half()
    metrics = logit_metrics(got, want)
    assert set(metrics) == {"max_abs_diff", "nmse", "top1"}
    assert 0 < metrics["nmse"] < 1e-6 and metrics["top1"] == 1.0
    comparison = compare({"probe": reference["probe_ids"]}, [got], [want], ["float16", "float32"])
    assert comparison.dtype == "float16" and comparison.passed
    assert {k: comparison.inputs[0].as_dict()[k] for k in metrics} == metrics
    with pytest.raises(ValueError, match="probe: artifact logits"):
        compare({"probe": reference["probe_ids"]}, [got[:, :-1]], [want], ["float32"])


def test_the_export_check_and_verify_report_the_same_comparison(official_env, tmp_path):
    """The server's check against the official model (in the card) and ``verify`` in this env run the
    same comparison: same inputs, metrics, dtype and tolerance."""
    from slicebridge import Bridge

    with Bridge(env=str(official_env), attach=False) as b:
        exported = b.export(CHECKPOINT, tmp_path / "hf", base_model=FIXTURE / "base", loader="official")
        report = b.verify(tmp_path / "hf", CHECKPOINT, base_model=FIXTURE / "base", loader="official")
    check = exported.verification
    assert check["status"] == "passed" and report.passed
    assert (check["dtype"], check["tolerance"]) == (report.compared_dtype, report.tolerance)
    for measured in report.inputs:
        recorded = check["inputs"][measured["name"]]
        assert set(recorded) == set(measured) - {"name"} | {"passed"}
        assert recorded["tokens"] == measured["tokens"] and recorded["top1"] == measured["top1"]
        assert recorded["nmse"] == pytest.approx(measured["nmse"], rel=1e-3, abs=1e-12)


def test_the_cache_lists_its_entries_least_recently_used_first(tmp_path):
    files = []
    for name in "abc":
        (tmp_path / name).write_bytes(name.encode())
        files.append(CacheKey.for_file(str(tmp_path / name), "", "builtin", "cpu", "float32"))
    cache = ModelCache(budget_bytes=25)
    for key in files:
        cache.get_or_load(key, lambda: object(), lambda _: 10)
    cache.get_or_load(files[1], lambda: pytest.fail("a hit loads nothing"), lambda _: 10)
    assert cache.entries() == [(files[2], 10), (files[1], 10)]  # a evicted, b used last


def test_torch_dtype_names_have_one_helper():
    sources = {path: path.read_text() for path in (REPO / "slicebridge").rglob("*.py")}
    stripping = [str(path) for path, text in sources.items() if re.search(r"removeprefix\(.torch\.", text)]
    assert stripping == [str(REPO / "slicebridge" / "dtypes.py")]
