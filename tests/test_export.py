"""The pickle-free Hugging Face export: files, no pickles, remote-code loading under transformers
5.x (this interpreter) and 4.41 (the slicegpt env, without slicebridge), loading without remote
code, sharding, exports written by 4.41, atomicity, and the model card."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from helpers import family_check
from helpers.paths import FIXTURE, REPO, slicegpt_env_path

import slicebridge
from slicebridge.model import export, portable
from slicebridge.model.atomic import OutputExists
from slicebridge.model.binfile import tokenizer_files
from slicebridge.model.checkpoint import read_checkpoint
from slicebridge.model.compare import logit_metrics, nmse, top1_agreement
from slicebridge.model.export import (
    ExportError,
    checkpoint_provenance,
    export_model,
    load_export,
    remote_code_files,
)
from slicebridge.model.families import BY_KEY

MODEL_SOURCES = REPO / "slicebridge" / "model"

NMSE_LIMIT = 1e-8
SMALL_SHARD = 500_000
SAMPLE_TEXT = "SliceGPT deletes rows and columns of the weight matrices: the quick brown fox, 12 times!"
EXPECTED_FILES = {
    "README.md",
    "config.json",
    "configuration_sliced.py",
    "configuration_sliced_llama.py",
    "generation_config.json",
    "model.safetensors",
    "modeling_sliced_llama.py",
    "sliced_decoder.py",
    "slicebridge.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
VERIFICATION = {"nmse": 1.7e-11, "top1_agreement": 1.0, "passed": True, "reference": {"dtype": "float32"}}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def slicegpt_python() -> Path:
    env = slicegpt_env_path()
    python = env / "bin" / "python"
    if not python.exists():
        pytest.fail(f"the stand-in slicegpt env is missing at {env}: run `make test`, which builds it")
    return python


def run_in_slicegpt_env(script: str, *args: str, tmp: Path, timeout: float = 240) -> Any:
    """Run ``script`` isolated (``python -I``) in the slicegpt env; returns its last stdout line as JSON."""
    path = tmp / "script.py"
    path.write_text(script)
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(tmp / "hf-modules"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    completed = subprocess.run(
        [str(slicegpt_python()), "-I", str(path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(tmp),
        stdin=subprocess.DEVNULL,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def fp32_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.float()(ids).logits


def assert_matches_reference(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    for ids, expected in (("probe_ids", "logits_fp32"), ("text_ids", "text_logits_fp32")):
        logits = fp32_logits(model, reference[ids])
        assert nmse(logits, reference[expected]) <= NMSE_LIMIT, (ids, nmse(logits, reference[expected]))
        assert top1_agreement(logits, reference[expected]) == 1.0, ids


def pickle_or_zip_files(directory: Path) -> list[str]:
    """Files whose first bytes are a pickle protocol 2-5 header or a zip (torch.save) header."""
    found = []
    for path in directory.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:4]
            if (head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5) or head.startswith(b"PK\x03\x04"):
                found.append(path.name)
    return found


def export_fixture(model, out: Path, **kwargs: Any):
    checkpoint = read_checkpoint(FIXTURE / "sliced")
    kwargs.setdefault("tokenizer_files", tokenizer_files(FIXTURE / "sliced"))
    kwargs.setdefault("provenance", checkpoint_provenance(checkpoint, loader="builtin"))
    return export_model(model, out, **kwargs)


# The 4.41 side: loads each export with remote code only (slicebridge must not be importable).
LOAD_SCRIPT_441 = r"""
import importlib.util, json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

assert importlib.util.find_spec("slicebridge") is None, "slicebridge leaked into the isolated interpreter"
reference = torch.load(sys.argv[1], weights_only=True)
base_tokenizer = AutoTokenizer.from_pretrained(sys.argv[2])
text = sys.argv[3]

report, logits = {"transformers": transformers.__version__, "exports": {}}, {}
for directory in sys.argv[5:]:
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, torch_dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    entry = {"class": type(model).__module__ + "." + type(model).__name__, "dtype": str(model.dtype)}
    model = model.float().eval()
    with torch.no_grad():
        logits[directory] = {"probe": model(reference["probe_ids"]).logits, "text": model(reference["text_ids"]).logits}
        generated = model.generate(reference["probe_ids"][:, :12], max_new_tokens=8, do_sample=False, pad_token_id=0)
    entry["generated"] = generated.tolist()
    entry["tokens_match_base"] = tokenizer(text)["input_ids"] == base_tokenizer(text)["input_ids"]
    report["exports"][directory] = entry
torch.save(logits, sys.argv[4])  # compared in the test, with slicebridge's own metrics
print(json.dumps(report))
"""

# The 4.41 side of production: export there (repo put on sys.path explicitly), read here.
EXPORT_SCRIPT_441 = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import transformers
from slicebridge.model.binfile import tokenizer_files
from slicebridge.model.checkpoint import read_checkpoint
from slicebridge.model.export import checkpoint_provenance, export_model

fixture, out = sys.argv[2], sys.argv[3]
checkpoint = read_checkpoint(fixture + "/sliced")
summary = export_model(checkpoint.build_model(), out, tokenizer_files=tokenizer_files(fixture + "/sliced"),
                       provenance=checkpoint_provenance(checkpoint, loader="builtin"))
print(json.dumps({"transformers": transformers.__version__, "files": summary.files}))
"""


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def portable_model():
    return read_checkpoint(FIXTURE / "sliced").build_model()


@pytest.fixture(scope="module")
def export_dir(portable_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "tiny-sliced"
    summary = export_fixture(portable_model, out)
    assert not summary.sharded and summary.shards == ["model.safetensors"]
    return out


@pytest.fixture(scope="module")
def sharded_dir(portable_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "tiny-sliced"
    summary = export_fixture(portable_model, out, max_shard_size=SMALL_SHARD, verification=VERIFICATION)
    assert summary.sharded and len(summary.shards) > 1
    return out


@pytest.fixture(scope="module")
def report_441(export_dir, sharded_dir, tmp_path_factory, reference) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("load441")
    report = run_in_slicegpt_env(
        LOAD_SCRIPT_441,
        str(FIXTURE / "reference.pt"),
        str(FIXTURE / "base"),
        SAMPLE_TEXT,
        str(tmp / "logits.pt"),
        str(export_dir),
        str(sharded_dir),
        tmp=tmp,
    )
    logits = torch.load(tmp / "logits.pt", weights_only=True)
    for directory, entry in report["exports"].items():
        entry["probe"] = logit_metrics(logits[directory]["probe"], reference["logits_fp32"])
        entry["text"] = logit_metrics(logits[directory]["text"], reference["text_logits_fp32"])
    return report


@pytest.fixture(scope="module")
def base_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURE / "base")


# --------------------------------------------------------------------------------------------
# What is written
# --------------------------------------------------------------------------------------------


def test_file_list_and_no_pickles(export_dir):
    assert {path.name for path in export_dir.iterdir()} == EXPECTED_FILES
    assert pickle_or_zip_files(export_dir) == []
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in os.listdir(export_dir))
    for name in remote_code_files(BY_KEY["llama"]):
        assert (export_dir / name).read_bytes() == (MODEL_SOURCES / name).read_bytes()
    for name, data in tokenizer_files(FIXTURE / "sliced").items():
        assert (export_dir / name).read_bytes() == data


def test_config_and_safetensors_layout(export_dir, portable_model):
    config = json.loads((export_dir / "config.json").read_text())
    assert config["architectures"] == ["SlicedLlamaForCausalLM"]
    assert config["model_type"] == "sliced_llama"
    assert config["auto_map"] == {
        "AutoConfig": "configuration_sliced_llama.SlicedLlamaConfig",
        "AutoModelForCausalLM": "modeling_sliced_llama.SlicedLlamaForCausalLM",
    }
    assert config["torch_dtype"] == config["dtype"] == "float16"
    assert config["hidden_size"] == 128 and config["embedding_dimension"] == 96
    assert config["attention_input_dimensions"] == [96] * 4
    assert config["mlp_output_dimensions"] == [96, 96, 96, 128]
    assert config["sparsity"] == 0.25 and config["round_interval"] == 8

    with safetensors.safe_open(str(export_dir / "model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        names = set(handle.keys())
    assert names == set(portable_model.state_dict())
    stored = safetensors.torch.load_file(str(export_dir / "model.safetensors"))
    for name, tensor in portable_model.state_dict().items():
        assert torch.equal(stored[name], tensor), name


def test_weights_are_written_byte_for_byte_as_save_file_writes_them(tmp_path):
    """Every dtype safetensors and torch share, in an order that is neither safetensors' nor by name, with
    scalars and empty tensors; a tensor that is a view into a memory-mapped file is written from the mapping."""
    generator = torch.Generator().manual_seed(0)
    dtypes = [torch.float16, torch.bool, torch.float64, torch.uint8, torch.bfloat16, torch.int64, torch.int8]
    dtypes += [torch.float32, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.uint64]
    dtypes += [torch.float8_e5m2, torch.float8_e4m3fn]
    tensors = {
        f"layers.{(index * 7 + shape_index * 3) % 11}.{dtype}.{shape_index}": (
            torch.randn(shape, generator=generator) * 10
        ).to(dtype)
        for index, dtype in enumerate(dtypes)
        for shape_index, shape in enumerate([(3, 5), (), (0,), (7,)])
    }
    torch.save(tensors["layers.0.torch.float16.0"], tmp_path / "mapped.pt")
    tensors["mapped"] = torch.load(tmp_path / "mapped.pt", mmap=True, weights_only=True)
    safetensors.torch.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    export._save_safetensors(tensors, tmp_path / "ours.safetensors")
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    with pytest.raises(ExportError, match="complex64"):
        export._save_safetensors({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "complex.safetensors")


def test_provenance_json_and_model_card(export_dir, sharded_dir):
    provenance = json.loads((export_dir / "slicebridge.json").read_text())
    assert provenance["base_model"] == "sliced"  # by name: no path of this machine (issue 11, item 17)
    assert provenance["checkpoint"] == "Meta-Llama-3-tiny_0.25.pt"
    assert provenance["sparsity"] == 0.25 and provenance["round_interval"] == 8
    assert provenance["params"] == {"dense": 982_144, "sliced": 855_552, "shortcut_q": 76_800}
    assert provenance["actual_ratio"] == pytest.approx(1 - 855_552 / 982_144)
    assert provenance["loader"] == "builtin"
    assert provenance["producer"]["transformers"].startswith("5.")
    assert provenance["verification"] is None
    assert provenance["widths"] == read_checkpoint(FIXTURE / "sliced").widths.as_slicing_config(128)

    card = (export_dir / "README.md").read_text()
    front_matter = card.split("---\n")[1]
    assert "library_name: transformers" in front_matter
    assert all(f"- {tag}" in front_matter for tag in ("slicegpt", "sliced", "slicebridge"))
    for expected in (
        "982,144",
        "855,552",
        "76,800",
        "0.1289",
        "| sparsity | 0.25 |",
        "| round_interval | 8 |",
        "Meta-Llama-3-tiny_0.25.pt",
        "| base model | `sliced` |",
        "| loader used | builtin |",
        "Constant sliced width 96 of 128",
        "trust_remote_code=True",
        "slicebridge.load(",
        "Not verified",
        f"| transformers | {provenance['producer']['transformers']} |",
    ):
        assert expected in card, expected

    verified = json.loads((sharded_dir / "slicebridge.json").read_text())["verification"]
    assert verified == VERIFICATION
    verified_card = (sharded_dir / "README.md").read_text()
    assert "Not verified" not in verified_card
    assert "| `nmse` | 1.7e-11 |" in verified_card and "| `reference.dtype` | float32 |" in verified_card


def test_minimal_generation_config_when_none_given(portable_model, tmp_path):
    from transformers import GenerationConfig

    files = {k: v for k, v in tokenizer_files(FIXTURE / "sliced").items() if k != "generation_config.json"}
    export_fixture(portable_model, tmp_path / "out", tokenizer_files=files)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["bos_token_id"] == 1 and generation["eos_token_id"] == 2
    assert GenerationConfig.from_pretrained(tmp_path / "out").eos_token_id == 2


# --------------------------------------------------------------------------------------------
# Loading: remote code under 5.x and 4.41, and slicebridge's own classes
# --------------------------------------------------------------------------------------------


def test_remote_code_in_transformers_5(export_dir, reference, base_tokenizer):
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert transformers.__version__.startswith("5.")
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)
    assert type(model).__name__ == "SlicedLlamaForCausalLM"
    assert type(model).__module__.startswith("transformers_modules.")  # the copied file, not slicebridge's
    assert model.dtype == torch.float16
    assert_matches_reference(model, reference)

    prompt = reference["probe_ids"][:, :12]
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generated.shape == (2, 20) and torch.equal(generated[:, :12], prompt)

    tokenizer = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
    assert tokenizer(SAMPLE_TEXT)["input_ids"] == base_tokenizer(SAMPLE_TEXT)["input_ids"]


def test_remote_code_in_transformers_4_41_without_slicebridge(report_441, export_dir, sharded_dir, reference):
    assert report_441["transformers"] == "4.41.0"
    for directory in (export_dir, sharded_dir):
        entry = report_441["exports"][str(directory)]
        assert entry["class"].startswith("transformers_modules.") and entry["dtype"] == "torch.float16"
        for name in ("probe", "text"):
            assert entry[name]["nmse"] <= NMSE_LIMIT and entry[name]["top1"] == 1.0, (name, entry[name])
        assert entry["tokens_match_base"]
    # greedy decoding in 4.41 gives the tokens our own classes give here
    expected = (
        load_export(export_dir)["model"]
        .float()
        .generate(reference["probe_ids"][:, :12], max_new_tokens=8, do_sample=False, pad_token_id=0)
    )
    assert report_441["exports"][str(export_dir)]["generated"] == expected.tolist()


def test_slicebridge_load_without_remote_code(export_dir, reference, base_tokenizer):
    loaded = slicebridge.load(export_dir)
    assert set(loaded) == {"model", "tokenizer", "config", "provenance"}
    model = loaded["model"]
    assert type(model).__module__ == "slicebridge.model.modeling_sliced_llama"
    assert model.dtype == torch.float16 and loaded["config"].model_type == "sliced_llama"
    assert loaded["provenance"]["params"]["sliced"] == 855_552
    assert loaded["tokenizer"](SAMPLE_TEXT)["input_ids"] == base_tokenizer(SAMPLE_TEXT)["input_ids"]
    assert_matches_reference(model, reference)

    as_fp32 = load_export(export_dir, dtype=torch.float32)["model"]
    assert as_fp32.dtype == torch.float32
    assert torch.equal(as_fp32(reference["probe_ids"]).logits, fp32_logits(model, reference["probe_ids"]))


def test_load_export_refuses_what_is_not_an_export(tmp_path):
    with pytest.raises(ExportError, match=r"model_type 'llama', expected one of sliced_llama, sliced_opt"):
        load_export(FIXTURE / "base")
    with pytest.raises(ExportError, match=r"no config\.json and no model\.safetensors"):
        load_export(tmp_path)
    with pytest.raises(ExportError, match="not a directory"):
        load_export(tmp_path / "missing")
    with pytest.raises(ExportError, match="not a slicebridge export"):
        slicebridge.load(FIXTURE / "sliced")  # a SliceGPT output dir: no sliced_llama config.json


def test_load_export_names_missing_shards(sharded_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sharded_dir, broken)
    sorted(broken.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(ExportError, match="missing the weight shard"):
        load_export(broken)


# --------------------------------------------------------------------------------------------
# Sharding
# --------------------------------------------------------------------------------------------


def test_sharded_export_has_valid_index_and_same_logits(sharded_dir, export_dir, reference):
    from transformers import AutoModelForCausalLM

    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    shards = sorted(path.name for path in sharded_dir.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (sharded_dir / "model.safetensors").exists()
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", name) for name in shards)
    assert sorted(set(index["weight_map"].values())) == shards
    assert pickle_or_zip_files(sharded_dir) == []

    stored: dict[str, torch.Tensor] = {}
    for name in shards:
        assert (sharded_dir / name).stat().st_size <= SMALL_SHARD + 64 * 1024 or len(
            safetensors.torch.load_file(str(sharded_dir / name))
        ) == 1
        part = safetensors.torch.load_file(str(sharded_dir / name))
        assert all(index["weight_map"][key] == name for key in part)
        stored.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    unsharded = safetensors.torch.load_file(str(export_dir / "model.safetensors"))
    assert stored.keys() == unsharded.keys()
    assert all(torch.equal(stored[key], unsharded[key]) for key in stored)

    ids = reference["probe_ids"]
    expected = fp32_logits(load_export(export_dir)["model"], ids)
    assert torch.equal(fp32_logits(load_export(sharded_dir)["model"], ids), expected)
    remote = AutoModelForCausalLM.from_pretrained(sharded_dir, trust_remote_code=True)
    assert torch.equal(fp32_logits(remote, ids), expected)


# --------------------------------------------------------------------------------------------
# Written by transformers 4.41, read by 5.x
# --------------------------------------------------------------------------------------------


def _without_versions(directory: Path, name: str) -> bytes:
    data = (directory / name).read_bytes()
    if name == "config.json":
        config = json.loads(data)
        config.pop("transformers_version")
        return json.dumps(config, sort_keys=True).encode()
    provenance = json.loads((directory / "slicebridge.json").read_text())
    if name == "slicebridge.json":
        provenance.pop("producer")
        return json.dumps(provenance, sort_keys=True).encode()
    if name == "README.md":
        text = data.decode()
        for package, version in provenance["producer"].items():
            text = text.replace(f"| {package} | {version} |", f"| {package} | <version> |")
        return text.encode()
    return data


def test_export_written_by_transformers_4_41_loads_in_5(export_dir, reference, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "from441" / export_dir.name  # same name: the card names the directory
    out.parent.mkdir()
    written = run_in_slicegpt_env(EXPORT_SCRIPT_441, str(REPO), str(FIXTURE), str(out), tmp=tmp_path)
    assert written["transformers"] == "4.41.0"
    assert sorted(written["files"]) == sorted(EXPECTED_FILES)
    assert json.loads((out / "slicebridge.json").read_text())["producer"]["transformers"] == "4.41.0"

    for name in sorted(EXPECTED_FILES):
        assert _without_versions(out, name) == _without_versions(export_dir, name), name
    assert (out / "model.safetensors").read_bytes() == (export_dir / "model.safetensors").read_bytes()

    ids = reference["probe_ids"]
    expected = fp32_logits(load_export(export_dir)["model"], ids)
    assert torch.equal(fp32_logits(slicebridge.load(out)["model"], ids), expected)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(fp32_logits(remote, ids), expected)


# --------------------------------------------------------------------------------------------
# Tied embeddings
# --------------------------------------------------------------------------------------------


def test_tied_embeddings_saved_once_and_tied_again(tmp_path):
    from transformers import AutoModelForCausalLM

    config = family_check.variant_config("llama")
    model = portable.build_model(family_check.random_sliced_tensors(config), config)
    summary = export_model(model, tmp_path / "tied", tokenizer_files={}, provenance={"loader": "test"})
    assert summary.dropped_tied == ["lm_head.weight"]
    stored = safetensors.torch.load_file(str(tmp_path / "tied" / "model.safetensors"))
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored

    ids = torch.randint(3, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    loaded = load_export(tmp_path / "tied")
    assert loaded["tokenizer"] is None
    assert loaded["model"].lm_head.weight is loaded["model"].model.embed_tokens.weight
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "tied", trust_remote_code=True)
    assert remote.lm_head.weight.data_ptr() == remote.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded["model"](ids).logits, expected)
        assert torch.equal(remote(ids).logits, expected)


# --------------------------------------------------------------------------------------------
# Atomicity
# --------------------------------------------------------------------------------------------


def _partials(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".partial")]


def test_existing_output_is_refused_and_left_untouched(portable_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExists):
        export_fixture(portable_model, out)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert _partials(tmp_path) == []


@pytest.mark.parametrize("failing_call", [1, 3])
def test_failure_midway_leaves_nothing(portable_model, tmp_path, monkeypatch, failing_call):
    calls = []
    real_save = export._save_safetensors

    def failing_save(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == failing_call:
            raise RuntimeError("simulated failure while writing weights")
        real_save(*args, **kwargs)

    monkeypatch.setattr(export, "_save_safetensors", failing_save)
    with pytest.raises(RuntimeError, match="simulated failure"):
        export_fixture(portable_model, tmp_path / "out", max_shard_size=SMALL_SHARD if failing_call > 1 else 5 << 30)
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_previous_export(portable_model, export_dir, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(export_dir, out)
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    def failing_save(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("simulated failure while writing weights")

    monkeypatch.setattr(export, "_save_safetensors", failing_save)
    with pytest.raises(RuntimeError):
        export_fixture(portable_model, out, overwrite=True)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert _partials(tmp_path) == []


def test_overwrite_replaces_an_export(portable_model, sharded_dir, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(sharded_dir, out)
    export_fixture(portable_model, out, overwrite=True)
    assert {path.name for path in out.iterdir()} == EXPECTED_FILES
    assert _partials(tmp_path) == []


def test_bad_tokenizer_file_names_are_refused_before_writing(portable_model, tmp_path):
    for name in ("../evil.json", "config.json", "extra.bin"):
        with pytest.raises(ExportError):
            export_fixture(portable_model, tmp_path / "out", tokenizer_files={name: b"{}"})
    with pytest.raises(ExportError, match="pickle"):
        export_fixture(portable_model, tmp_path / "out", tokenizer_files={"vocab.json": b"\x80\x04K\x01."})
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- through the server


def test_export_through_the_server_loads_both_ways(bridge, tmp_path):
    from transformers import AutoModelForCausalLM

    import slicebridge

    out = tmp_path / "exported"
    result = bridge.export(FIXTURE / "sliced", out)
    assert result.output == str(out) and not result.sharded and result.loader == "builtin"
    assert "model.safetensors" in result.files and "modeling_sliced_llama.py" in result.files
    assert result.params == {"dense": 982144, "sliced": 855552, "shortcut_q": 76800}
    assert result.verification["status"].startswith("not checked here")
    reference = torch.load(FIXTURE / "reference.pt", weights_only=True)
    for model in (slicebridge.load(out)["model"], AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)):
        with torch.no_grad():
            logits = model.float()(reference["probe_ids"]).logits
        want = reference["logits_fp32"]
        assert nmse(logits, want) <= 1e-8
    assert slicebridge.model.export.find_pickles(out) == []


def test_export_uses_the_warm_model_and_verify_passes_on_it(bridge, tmp_path):
    bridge.convert(FIXTURE / "sliced", tmp_path / "warm.bin")
    result = bridge.export(FIXTURE / "sliced", tmp_path / "warm-export")
    assert result.cache_hit is True
    report = bridge.verify(tmp_path / "warm-export", FIXTURE / "sliced")
    assert report.passed and report.kind == "export"


def test_export_in_the_official_env_records_its_check_in_the_card(official_env, tmp_path):
    from slicebridge import Bridge

    with Bridge(env=str(official_env), attach=False) as b:
        result = b.export(FIXTURE / "sliced", tmp_path / "official-export")
    assert result.loader == "official"
    assert result.verification["status"] == "passed"
    assert result.verification["inputs"]["probe"]["nmse"] <= 1e-6
    card = (tmp_path / "official-export" / "README.md").read_text()
    assert "passed" in card and "official" in card


def test_export_refuses_an_existing_dir_before_loading(bridge, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    before = bridge.cache_info().misses
    with pytest.raises(OutputExists):
        bridge.export(FIXTURE / "sliced", tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert bridge.cache_info().misses == before
