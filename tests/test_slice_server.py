"""The ``slice`` request through real servers: SliceGPT run by the warm server, for every family.

With the stand-in slicegpt in the server's env the server runs slicegpt's own code path (the
checkpoint equals one made by running the stand-in ``run_slicegpt.py`` by hand); without it,
slicebridge's maker slices. Either way a sweep loads the dense model once, writes
run_slicegpt's ``--save-dir`` layout, reports perplexities, and a bad request is refused in a
sentence before any work, with nothing on disk and the server still serving.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import pytest
from helpers.paths import HELPERS, SHARED_FIXTURES, STANDIN

from slicebridge import Bridge
from slicebridge.bridge import protocol
from slicebridge.bridge.errors import BadRequest
from slicebridge.errors import InputNotFound
from slicebridge.model.atomic import OutputError, OutputExists
from slicebridge.model.calibration import CalibrationError
from slicebridge.model.dense import embedded_text
from slicebridge.model.errors import UnsupportedArchitecture
from slicebridge.model.families import FAMILIES

KEYS = [family.key for family in FAMILIES]
STEMS = {"llama": "Meta-Llama-3-tiny", "opt": "opt-tiny", "phi2": "phi-2", "phi3": "Phi-3-mini-4k-instruct"}
SMALL = {
    "cal_nsamples": 8,
    "cal_batch_size": 4,
    "cal_max_seqlen": 64,
    "ppl_eval_seqlen": 64,
    "ppl_eval_batch_size": 4,
    "dtype": "fp32",
    "device": "cpu",
}
COMPARE = HELPERS / "compare_sliced_runs.py"


def fixture_of(key: str):
    return SHARED_FIXTURES / f"slicegpt-{key}-tiny"


@pytest.fixture(scope="module")
def bridges(slicegpt_env, official_env):
    with (
        Bridge(env=str(slicegpt_env), attach=False, debug_ops=True) as builtin,
        Bridge(env=str(official_env), attach=False, debug_ops=True) as official,
    ):
        yield {"builtin": builtin, "official": official}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Each family's dense fixture model, copied under the name ``tiny`` (the fixtures' runs named it so)."""
    root = tmp_path_factory.mktemp("bases")
    made = {}
    for key in KEYS:
        made[key] = root / key / "tiny"
        shutil.copytree(fixture_of(key) / "base", made[key])
    return made


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    path.write_text(embedded_text())
    return path


def slice_args(base, output_dir, calibration, sparsities, **options) -> protocol.SliceArgs:
    values = {**SMALL, **options}
    return protocol.SliceArgs(
        base_model=str(base),
        sparsities=list(sparsities),
        output_dir=str(output_dir),
        calibration=str(calibration) if calibration is not None else None,
        **values,
    )


def run_slice(bridge, base, output_dir, calibration, sparsities, events=None, **options) -> protocol.SliceResult:
    on_event = (lambda kind, body: events.append((kind, body))) if events is not None else None
    return bridge.request("slice", slice_args(base, output_dir, calibration, sparsities, **options), on_event=on_event)


def official_python(official_env) -> str:
    return str(official_env / "bin" / "python")


# ------------------------------------------------------------------------------ the official code path


@pytest.mark.parametrize("key", KEYS)
def test_the_official_path_gives_the_checkpoint_run_slicegpt_gives_by_hand(
    bridges, bases, calibration, official_env, key, tmp_path
):
    """The same arguments through the server and through the stand-in run_slicegpt.py: both checkpoints,
    loaded by slicegpt's own loader, give the same logits; same files, shapes and SlicingConfig."""
    sparsity = json.loads((fixture_of(key) / "fixture.json").read_text())["sparsity"]
    base = _tokenizer_the_script_runs_with(bases[key], tmp_path / "tiny")
    result = run_slice(bridges["official"], base, tmp_path / "served", calibration, [sparsity])
    assert (result.slicer, result.family, result.failed) == ("official", key, [])
    served = tmp_path / "served"
    stem = f"{STEMS[key]}_{sparsity}"
    assert sorted(p.name for p in served.iterdir()) == sorted(
        [
            f"{stem}.pt",
            f"{stem}.json",
            *(
                p.name
                for p in (fixture_of(key) / "sliced").iterdir()
                if p.suffix == ".json" and not p.name.startswith(STEMS[key])
            ),
        ]
    )

    by_hand = tmp_path / "by_hand"
    _run_slicegpt_by_hand(official_env, base, result.model_name, calibration, sparsity, by_hand, tmp_path)
    report = _compare_through_slicegpt(official_env, result.model_name, served, by_hand, sparsity, key)
    # and the shapes are those of the official fixture's own run
    assert report["shapes_like_fixture"], report


def _compare_through_slicegpt(official_env, model_name, dir_a, dir_b, sparsity, key) -> dict:
    """Both save dirs' checkpoints through slicegpt's loader: same keys, shapes and SlicingConfig, logits
    within fp32 NMSE 1e-6 (``helpers/compare_sliced_runs.py``); its report."""
    command = [official_python(official_env), str(COMPARE), model_name, str(dir_a), str(dir_b), str(sparsity)]
    compared = subprocess.run(
        [*command, str(fixture_of(key) / "reference.pt")], capture_output=True, text=True, timeout=300
    )
    assert compared.returncode == 0, compared.stderr[-3000:]
    report = json.loads(compared.stdout.strip().splitlines()[-1])
    assert report["same_shapes"] and report["same_keys"] and report["same_slicing_config"], report
    assert report["nmse"] <= 1e-6, report
    return report


def _tokenizer_the_script_runs_with(base, copy):
    """The fixture's model with a tokenizer run_slicegpt can calibrate with: a pad token (its EOS) and no
    token_type_ids (the fixtures' tokenizers were saved without either, which the script cannot pad or pass on)."""
    shutil.copytree(base, copy)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(pad_token=config["eos_token"], model_input_names=["input_ids", "attention_mask"])
    config_path.write_text(json.dumps(config))
    return copy


def _run_slicegpt_by_hand(official_env, base, model_name, calibration, sparsity, save_dir, tmp_path):
    """The stand-in run_slicegpt.py with the server's calibration split, saved as a DatasetDict."""
    from slicebridge.model.calibration import read_calibration, split_held_out

    train, held_out = split_held_out(read_calibration(calibration).examples, 0.1)
    data = tmp_path / "data"
    script = (
        "import datasets, sys, json; t = json.load(open(sys.argv[1])); "
        "d = datasets.DatasetDict({k: datasets.Dataset.from_dict({'text': v}) for k, v in t.items()}); "
        "d.save_to_disk(sys.argv[2])"
    )
    (tmp_path / "split.json").write_text(json.dumps({"train": train, "test": held_out}))
    subprocess.run([official_python(official_env), "-c", script, str(tmp_path / "split.json"), str(data)], check=True)
    flags = [
        "--model", model_name, "--model-path", str(base), "--save-dir", str(save_dir), "--sparsity", str(sparsity),
        "--cal-data-path", str(data), "--cal-nsamples", "8", "--cal-batch-size", "4", "--cal-max-seqlen", "64",
        "--ppl-eval-seqlen", "64", "--ppl-eval-batch-size", "4", "--dtype", "fp32", "--device", "cpu", "--seed", "42",
    ]  # fmt: skip
    ran = subprocess.run(
        [official_python(official_env), str(STANDIN / "run_slicegpt.py"), *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # The script saves, then measures perplexity with windows of 2048 tokens whatever --ppl-eval-seqlen says:
    # more than these tiny models' 256 positions, so it fails there, after saving (the server passes the flag on).
    assert "Saved sliced model" in ran.stderr, ran.stderr[-3000:]


# ------------------------------------------------------------------------------ a sweep, warm


@pytest.mark.parametrize("slicer", ["builtin", "official"])
def test_a_sweep_of_three_loads_the_dense_model_once(bridges, bases, calibration, slicer, tmp_path):
    bridge = bridges[slicer]
    events: list = []
    result = run_slice(bridge, bases["llama"], tmp_path / "out", calibration, [0.2, 0.25, 0.3], events=events)
    loads = result.dense["loads"]
    assert result.slicer == slicer and not result.failed
    assert [c.sparsity for c in result.checkpoints] == [0.2, 0.25, 0.3]
    assert [c.hidden_size for c in result.checkpoints] == [96, 96, 88]  # int((1 - s) * 128), down to a multiple of 8
    for checkpoint in result.checkpoints:
        assert os.path.isfile(checkpoint.checkpoint) and os.path.isfile(checkpoint.slicing_config)
        assert checkpoint.ppl is not None and math.isfinite(checkpoint.ppl) and checkpoint.ppl > 1
        assert 0 < checkpoint.actual_ratio < 1
    assert result.baseline_ppl is not None and math.isfinite(result.baseline_ppl)
    assert "config.json" in result.copied and (tmp_path / "out" / "config.json").is_file()
    layers = [body for kind, body in events if kind == "progress" and str(body["stage"]).startswith("slice 0.25")]
    assert layers and layers[-1]["total"] == 4 and layers[-1]["done"] == 4 and layers[-1]["unit"] == "layers"

    again = run_slice(bridge, bases["llama"], tmp_path / "again", calibration, [0.4])
    assert again.dense["cache_hit"] and again.dense["loads"] == loads  # no dense read from disk for this sweep
    assert again.baseline_ppl == result.baseline_ppl


@pytest.mark.parametrize("key", KEYS)
def test_the_builtin_maker_slices_converts_and_exports_from_the_warm_model(bridges, bases, calibration, key, tmp_path):
    bridge = bridges["builtin"]
    result = run_slice(bridge, bases[key], tmp_path, calibration, [0.25], convert=True, export=True)
    assert (result.slicer, result.family, result.failed) == ("builtin", key, [])
    sliced = result.checkpoints[0]
    assert sliced.bin["cache_hit"] and sliced.export["cache_hit"]  # both made from the sliced model in memory
    assert sliced.bin["family"] == key and os.path.isfile(sliced.bin["output"])
    verdict = bridge.verify(sliced.bin["output"], sliced.checkpoint, base_model=tmp_path, sparsity=0.25)
    assert verdict.passed, verdict.failures
    verdict = bridge.verify(sliced.export["output"], sliced.checkpoint, base_model=tmp_path, sparsity=0.25)
    assert verdict.passed, verdict.failures


# ------------------------------------------------------------------------------ failures


def test_out_of_memory_mid_sweep_keeps_the_done_sparsities_and_leaves_nothing_of_the_failed(
    slicegpt_env, bases, calibration, tmp_path, monkeypatch
):
    monkeypatch.setenv("SLICEBRIDGE_DEBUG_FAULTS", "slice.layer:raise=MemoryError*1")
    with Bridge(env=str(slicegpt_env), attach=False, debug_ops=True) as bridge:
        result = run_slice(bridge, bases["opt"], tmp_path, calibration, [0.2, 0.25, 0.3])
        assert [(f.sparsity, f.error_type) for f in result.failed] == [(0.2, "OutOfMemory")]
        assert "memory" in result.failed[0].message
        assert [c.sparsity for c in result.checkpoints] == [0.25, 0.3]
        names = sorted(p.name for p in tmp_path.iterdir())
        assert not [n for n in names if "_0.2." in n or n.endswith(".partial")], names
        assert bridge.ping() >= 0


def _bad_requests(bases, calibration, tmp_path):
    not_family = tmp_path / "gpt2"
    not_family.mkdir()
    (not_family / "config.json").write_text(json.dumps({"model_type": "gpt2", "hidden_size": 8}))
    sliced_config = tmp_path / "sliced_config"
    sliced_config.mkdir()
    (sliced_config / "config.json").write_text(
        json.dumps({**json.loads((bases["llama"] / "config.json").read_text()), "model_type": "sliced_llama"})
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\x00\x01\x02 not text")
    short = tmp_path / "short.txt"
    short.write_text("one short paragraph.\n\nand another.\n\nand a third one.")
    return {
        "missing base": (dict(base=tmp_path / "nowhere"), InputNotFound, "does not exist"),
        "not a family": (dict(base=not_family), UnsupportedArchitecture, "gpt2"),
        "already sliced": (dict(base=sliced_config), UnsupportedArchitecture, "sliced_llama"),
        "sparsity 0": (dict(sparsities=[0.0]), BadRequest, "(0, 1)"),
        "sparsity 1": (dict(sparsities=[1.0]), BadRequest, "(0, 1)"),
        "sparsity nan": (dict(sparsities=[float("nan")]), BadRequest, "(0, 1)"),
        "duplicate": (dict(sparsities=[0.2, 0.2]), BadRequest, "twice"),
        "round_interval 0": (dict(round_interval=0), BadRequest, "round_interval"),
        "too long calibration": (dict(cal_max_seqlen=100000), BadRequest, "max_position_embeddings"),
        "calibration missing": (dict(calibration=tmp_path / "none.txt"), CalibrationError, "none.txt"),
        "calibration empty": (dict(calibration=empty), CalibrationError, "empty.txt"),
        "calibration binary": (dict(calibration=binary), CalibrationError, "binary.txt"),
        "calibration too small": (dict(calibration=short), CalibrationError, "cal_nsamples"),
        "both calibrations": (dict(cal_dataset="wikitext2"), BadRequest, "exactly one"),
        "unknown orientation": (dict(final_orientation="sideways"), BadRequest, "final_orientation"),
        "unknown dtype": (dict(dtype="int8"), BadRequest, "fp16"),
        "negative seed": (dict(seed=-1), BadRequest, "seed"),
        "one-token windows": (dict(ppl_eval_seqlen=1), BadRequest, "ppl_eval_seqlen"),
        "unknown device": (dict(device="tpu"), BadRequest, "device"),
        "another family's name": (dict(model_name="facebook/opt-tiny"), BadRequest, "Llama"),
        "a name that is no file name": (dict(model_name="meta-llama/.."), BadRequest, "file name"),
        "too many sparsities": (dict(sparsities=[i / 100 for i in range(1, 70)]), BadRequest, "at most"),
        "output_dir a file": (dict(output_dir=empty), OutputError, "is a file"),
    }


@pytest.mark.parametrize("slicer", ["builtin", "official"])
def test_bad_input_is_one_sentence_before_any_work_and_the_server_keeps_serving(
    bridges, bases, calibration, slicer, tmp_path
):
    bridge = bridges[slicer]
    out = tmp_path / "out"
    before = bridge.cache_info().misses
    for name, (change, error, said) in _bad_requests(bases, calibration, tmp_path).items():
        base = change.pop("base", bases["llama"])
        cal = change.pop("calibration", calibration)
        sparsities = change.pop("sparsities", [0.25])
        with pytest.raises(error) as caught:
            run_slice(bridge, base, change.pop("output_dir", out), cal, sparsities, **change)
        message = str(caught.value)
        assert said in message and "Traceback" not in message and len(message.splitlines()) == 1, (name, message)
        assert not out.exists(), name  # nothing written, not even the output directory
    assert bridge.cache_info().misses == before  # and nothing loaded
    assert run_slice(bridge, bases["llama"], out, calibration, [0.25]).checkpoints


def test_existing_outputs_are_not_clobbered_without_overwrite(bridges, bases, calibration, tmp_path):
    bridge = bridges["builtin"]
    first = run_slice(bridge, bases["phi3"], tmp_path, calibration, [0.2]).checkpoints[0]
    stamp = os.stat(first.checkpoint).st_mtime_ns
    with pytest.raises(OutputExists, match="overwrite"):
        run_slice(bridge, bases["phi3"], tmp_path, calibration, [0.3, 0.2])
    assert os.stat(first.checkpoint).st_mtime_ns == stamp and not (tmp_path / "Phi-3-mini-4k-instruct_0.3.pt").exists()
    again = run_slice(bridge, bases["phi3"], tmp_path, calibration, [0.3, 0.2], overwrite=True)
    assert [c.sparsity for c in again.checkpoints] == [0.3, 0.2]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    with pytest.raises(OutputExists, match="config.json"):
        run_slice(bridge, bases["phi3"], foreign, calibration, [0.2])


def test_a_relative_path_in_a_hand_made_request_is_refused(bridges, bases, calibration):
    with pytest.raises(BadRequest, match="absolute"):
        run_slice(bridges["builtin"], "relative/base", "/tmp/out", calibration, [0.2])


def test_a_named_dataset_goes_through_slicegpts_get_dataset(official_env, bases, calibration, tmp_path, monkeypatch):
    """cal_dataset="wikitext2" is loaded by slicegpt's data_utils.get_dataset (the stand-in reads a saved copy from
    SLICEGPT_STANDIN_DATASETS, offline); a name it cannot load is one sentence that says what to do instead."""
    from slicebridge.model.calibration import read_calibration

    examples = read_calibration(calibration).examples
    saved = tmp_path / "datasets"
    script = (
        "import datasets, sys, json; e = json.load(open(sys.argv[1])); "
        "d = datasets.DatasetDict({'train': datasets.Dataset.from_dict({'text': e[:10]}), "
        "'test': datasets.Dataset.from_dict({'text': e[10:]})}); d.save_to_disk(sys.argv[2])"
    )
    (tmp_path / "examples.json").write_text(json.dumps(examples))
    subprocess.run(
        [official_python(official_env), "-c", script, str(tmp_path / "examples.json"), str(saved / "wikitext2")],
        check=True,
    )
    monkeypatch.setenv("SLICEGPT_STANDIN_DATASETS", str(saved))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with Bridge(env=str(official_env), attach=False) as bridge:
        result = run_slice(bridge, bases["opt"], tmp_path / "out", None, [0.25], cal_dataset="wikitext2")
        assert result.calibration["source"] == "wikitext2" and result.calibration["held_out"] == len(examples) - 10
        assert result.checkpoints and not result.failed and result.baseline_ppl > 1, result.failed
        with pytest.raises(CalibrationError, match="could not load the ptb dataset.*calibration=PATH"):
            run_slice(bridge, bases["opt"], tmp_path / "ptb", None, [0.25], cal_dataset="ptb")
        assert not (tmp_path / "ptb").exists()


def test_a_named_dataset_needs_slicegpt_in_the_server(bridges, bases, tmp_path):
    with pytest.raises(CalibrationError, match="no slicegpt.*calibration=PATH"):
        run_slice(bridges["builtin"], bases["opt"], tmp_path, None, [0.25], cal_dataset="wikitext2")


def test_the_official_path_is_reproducible_where_the_script_is_not(bridges, bases, calibration, tmp_path):
    """One request gives one checkpoint: the random final orientation draws from numpy's generator, which
    run_slicegpt leaves unseeded and the server seeds with ``seed``."""
    import torch

    first, second = (
        run_slice(bridges["official"], bases["opt"], tmp_path / name, calibration, [0.25]).checkpoints[0]
        for name in ("first", "second")
    )
    a, b = (torch.load(c.checkpoint, weights_only=True) for c in (first, second))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    other = run_slice(bridges["official"], bases["opt"], tmp_path / "other", calibration, [0.25], seed=7).checkpoints[0]
    c = torch.load(other.checkpoint, weights_only=True)
    assert not torch.equal(a["model.decoder.embed_tokens.weight"], c["model.decoder.embed_tokens.weight"])


def test_the_server_threads_wait_passively_unless_told_otherwise(slicegpt_env, monkeypatch):
    """Spinning OpenMP threads make slicing's eigh collapse on a shared CPU: the server's env says PASSIVE."""
    from slicebridge.bridge.envs import find_env
    from slicebridge.bridge.launcher import server_environ

    env = find_env(str(slicegpt_env))
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert server_environ(env)["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert server_environ(env)["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.parametrize("key", KEYS)
def test_both_slicers_give_the_same_model(bridges, bases, calibration, official_env, key, tmp_path):
    """slicebridge's maker calibrates on the samples slicegpt draws and fuses as slicegpt does (embeddings
    centred), so without slicegpt the server gives the model slicegpt would, up to rounding."""
    sparsity = json.loads((fixture_of(key) / "fixture.json").read_text())["sparsity"]
    base = _tokenizer_the_script_runs_with(bases[key], tmp_path / "tiny")
    made = {}
    for slicer in ("official", "builtin"):
        made[slicer] = run_slice(bridges[slicer], base, tmp_path / slicer, calibration, [sparsity], slicer=slicer)
    made_dirs = (tmp_path / "official", tmp_path / "builtin")
    _compare_through_slicegpt(official_env, made["official"].model_name, *made_dirs, sparsity, key)
    ppl = [made[s].checkpoints[0].ppl for s in ("official", "builtin")]
    assert math.isclose(*ppl, rel_tol=1e-3), ppl
    assert math.isclose(made["official"].baseline_ppl, made["builtin"].baseline_ppl, rel_tol=1e-4)


def test_outputs_are_no_more_readable_than_the_dense_model(bridges, bases, calibration, tmp_path):
    private = tmp_path / "private"
    shutil.copytree(bases["opt"], private)
    for path in private.iterdir():
        path.chmod(0o600)
    result = run_slice(bridges["builtin"], private, tmp_path / "out", calibration, [0.25], convert=True)
    made = [p for p in (tmp_path / "out").iterdir() if p.is_file()]
    assert len(made) >= 4 and result.checkpoints[0].bin
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in made} == {p.name: "0o600" for p in made}


def test_a_failure_after_publishing_removes_what_it_made_and_keeps_what_it_replaced(
    slicegpt_env, bases, calibration, tmp_path, monkeypatch
):
    monkeypatch.setenv("SLICEBRIDGE_DEBUG_FAULTS", "publish:raise=RuntimeError*1")
    with Bridge(env=str(slicegpt_env), attach=False, debug_ops=True) as bridge:
        only = run_slice(bridge, bases["opt"], tmp_path / "fresh", calibration, [0.2])
        assert [f.sparsity for f in only.failed] == [0.2] and not only.checkpoints
        assert not (tmp_path / "fresh").exists()  # nothing sliced: its base files and directory went too
        kept = run_slice(bridge, bases["opt"], tmp_path / "kept", calibration, [0.2, 0.25])
        assert [c.sparsity for c in kept.checkpoints] == [0.2, 0.25] and not kept.failed
        before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "kept").iterdir()}
    monkeypatch.setenv("SLICEBRIDGE_DEBUG_FAULTS", "publish:raise=RuntimeError*1")
    with Bridge(env=str(slicegpt_env), attach=False, debug_ops=True) as bridge:
        again = run_slice(bridge, bases["opt"], tmp_path / "kept", calibration, [0.2, 0.3], overwrite=True)
        assert [f.sparsity for f in again.failed] == [0.2] and [c.sparsity for c in again.checkpoints] == [0.3]
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "kept").iterdir()}
    assert {name for name in after if "_0.2." in name} == {name for name in before if "_0.2." in name}
    assert all(after[name] == before[name] for name in before if "_0.2." in name)  # the old 0.2 untouched
    assert not [name for name in after if name.endswith(".partial")]
