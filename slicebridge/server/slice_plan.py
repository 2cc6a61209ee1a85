"""The ``slice`` request checked before any work: what a sweep will read, compute and write.

``plan_sweep`` turns a ``SliceArgs`` into a ``SweepPlan`` or refuses it in one sentence: the
dense model (a directory of a family SliceGPT slices), the model name (one the family's official
adapter takes), every sparsity and option, the slicer and device, and every output (no clobber
without ``overwrite``). ``slice_service.read_calibration`` then reads, splits and counts the
calibration text. Only then does the sweep load the dense model; a refused request has written
nothing and loaded nothing.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slicebridge.bridge import protocol
from slicebridge.bridge.server_loop import HandlerError
from slicebridge.errors import InputNotFound
from slicebridge.model.atomic import OutputError, OutputExists, check_output
from slicebridge.model.errors import UnsupportedArchitecture
from slicebridge.model.families import Family, family_of_config, family_of_official_name, official_model_name
from slicebridge.server.convert import require_absolute
from slicebridge.server.loaders import LOADERS, DeviceUnavailable, resolve_device, resolve_loader

log = logging.getLogger(__name__)

# run_slicegpt's --dtype values, and the torch names convert uses, to one torch dtype name.
DTYPES = {"fp16": "float16", "float16": "float16", "fp32": "float32", "float32": "float32"}
ORIENTATIONS = ("random", "pca")
NAMED_DATASETS = ("wikitext2", "ptb", "c4", "alpaca")
Report = Callable[[int, int], None]  # a slicer's progress: (layers done, layers in all)
MAX_SPARSITIES = 64  # one request's sweep; more is a batch of sweeps


class SliceRequestInvalid(HandlerError):
    """A ``slice`` request that cannot be carried out as asked (said before any work)."""

    error_type = "BadRequest"


@dataclass
class Calibration:
    """The calibration text of a sweep: the examples that calibrate and the held-out ones for perplexity."""

    source: str  # a local path, or the name of a dataset slicegpt loads
    train: list[str]
    held_out: list[str]
    samples: int = 0  # what the sampling yields (checked against cal_nsamples)
    ids: Any = None  # those samples' token ids [samples, seqlen], as slicebridge's maker takes them
    dataset: Any = None  # the DatasetDict slicegpt's get_dataset returned, for a named dataset

    def digest(self) -> str:
        """A short hash of the held-out text (the dense model's perplexity depends on it)."""
        sha = hashlib.sha256()
        for text in self.held_out:
            sha.update(text.encode("utf-8", "surrogatepass") + b"\0")
        return sha.hexdigest()[:16]

    def facts(self, args: protocol.SliceArgs) -> dict[str, Any]:
        return {
            "source": self.source,
            "examples": len(self.train) + len(self.held_out),
            "held_out": len(self.held_out),
            "samples": self.samples,
            "seqlen": args.cal_max_seqlen,
        }


@dataclass
class SweepPlan:
    args: protocol.SliceArgs
    base_dir: Path
    output_dir: Path
    base_config: dict[str, Any]
    family: Family
    model_name: str
    slicer: str  # official | builtin
    device: str
    dtype: str  # float16 | float32
    stems: dict[float, str] = field(default_factory=dict)  # sparsity -> {name}_{sparsity}
    calibration: Calibration | None = None

    @property
    def hidden_size(self) -> int:
        return int(self.base_config["hidden_size"])

    def width(self, sparsity: float) -> int:
        """run_slicegpt's new embedding dimension: rounded down to a multiple of round_interval."""
        width = int((1 - sparsity) * self.hidden_size)
        return width - width % self.args.round_interval

    def outputs(self, sparsity: float) -> list[tuple[Path, bool]]:
        """Each output of one sparsity and whether it is a directory."""
        stem = self.output_dir / self.stems[sparsity]
        paths = [(stem.with_name(stem.name + ".pt"), False), (stem.with_name(stem.name + ".json"), False)]
        if self.args.convert:
            paths.append((stem.with_name(stem.name + ".bin"), False))
        if self.args.export:
            paths.append((stem, True))
        return paths


def plan_sweep(args: protocol.SliceArgs) -> SweepPlan:
    """Check everything a sweep needs that can be checked without loading the model."""
    require_absolute(base_model=args.base_model, output_dir=args.output_dir, calibration=args.calibration)
    _check_options(args)
    base_dir, config, family = _dense_model(args.base_model)
    model_name = args.model_name or official_model_name(family, config, base_dir.name)
    _check_model_name(model_name, family)
    plan = SweepPlan(
        args,
        base_dir,
        Path(args.output_dir),
        config,
        family,
        model_name,
        resolve_loader(args.slicer, what="slicer"),
        _device(args),
        DTYPES[args.dtype],
        stems={s: f"{Path(model_name).name}_{float(s)}" for s in args.sparsities},
    )
    _check_slicer(plan)
    _check_sizes(plan)
    _check_outputs(plan)
    return plan


def _check_options(args: protocol.SliceArgs) -> None:
    def refuse(message: str) -> None:
        raise SliceRequestInvalid(message)

    if not args.sparsities:
        refuse("name at least one sparsity")
    if len(args.sparsities) > MAX_SPARSITIES:
        refuse(f"{len(args.sparsities)} sparsities in one sweep; at most {MAX_SPARSITIES} (send several sweeps)")
    for s in args.sparsities:
        if not (isinstance(s, (int, float)) and math.isfinite(s) and 0 < s < 1):
            refuse(f"sparsity {s!r} is outside (0, 1): it is the fraction of the hidden size sliced off")
    if len(set(map(float, args.sparsities))) != len(args.sparsities):
        refuse(f"sparsities {args.sparsities} name one value twice")
    if args.round_interval < 1:
        refuse(f"round_interval must be at least 1, not {args.round_interval}")
    for name in ("cal_nsamples", "cal_batch_size", "cal_max_seqlen", "ppl_eval_batch_size"):
        if getattr(args, name) < 1:
            refuse(f"{name} must be at least 1, not {getattr(args, name)}")
    if args.ppl_eval_seqlen < 2:
        refuse(f"ppl_eval_seqlen must be at least 2 (windows predict their next tokens), not {args.ppl_eval_seqlen}")
    if not 0 <= args.seed < 2**32:
        refuse(f"seed must be in [0, 2**32) (torch's and numpy's seeds), not {args.seed}")
    if args.slicer not in LOADERS:
        refuse(f"slicer must be one of {', '.join(LOADERS)}, not {args.slicer!r}")
    if args.final_orientation not in ORIENTATIONS:
        refuse(f"final_orientation must be one of {', '.join(ORIENTATIONS)}, not {args.final_orientation!r}")
    if args.dtype not in DTYPES:
        refuse(f"dtype must be fp16 or fp32 (run_slicegpt's --dtype), not {args.dtype!r}")
    if not 0 <= args.held_out < 1:
        refuse(f"held_out must be in [0, 1) (the fraction kept for perplexity), not {args.held_out}")
    if (args.calibration is None) == (args.cal_dataset is None):
        refuse("give exactly one of calibration (local text) and cal_dataset (a dataset slicegpt loads)")
    if args.cal_dataset is not None and args.cal_dataset not in NAMED_DATASETS:
        refuse(f"cal_dataset must be one of {', '.join(NAMED_DATASETS)}, not {args.cal_dataset!r}")


def _check_model_name(name: str, family: Family) -> None:
    """A name the files can be named by, and that slicegpt's adapter for this model's family takes."""
    stem = Path(name).name
    if not stem or stem in (".", "..") or stem.startswith(".") or any(c in name for c in "\0\n\r"):
        raise SliceRequestInvalid(f"model_name {name!r} does not give a file name ({{name}}_{{sparsity}}.pt)")
    named = family_of_official_name(name)
    if named is not None and named is not family:
        raise SliceRequestInvalid(
            f"model_name {name!r} is a {named.title} name, and the model is a {family.title}; slicegpt would load "
            f"it into the wrong adapter: pass a name like {family.official_names}"
        )


def _dense_model(path: str) -> tuple[Path, dict[str, Any], Family]:
    base_dir = Path(path)
    if not base_dir.exists():
        raise InputNotFound(f"the base model {base_dir} does not exist")
    if not base_dir.is_dir():
        raise SliceRequestInvalid(f"the base model {base_dir} is not a directory; pass the dense model's directory")
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise InputNotFound(f"{base_dir} holds no config.json; pass a Hugging Face model directory")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SliceRequestInvalid(f"{config_path} cannot be read as JSON ({exc})") from None
    family = family_of_config(config) if isinstance(config, dict) else None
    if family is None or str(config.get("model_type", "")).startswith("sliced_"):
        model_type = config.get("model_type") if isinstance(config, dict) else None
        raise UnsupportedArchitecture(repr(model_type), str(config_path))
    return base_dir, config, family


def _device(args: protocol.SliceArgs) -> str:
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise SliceRequestInvalid(str(exc)) from None
    if args.distribute_model and not device.startswith("cuda"):
        raise DeviceUnavailable("distribute_model spreads the model over GPUs, and the server has none (device cpu)")
    if args.distribute_model and args.slicer == "builtin":
        raise SliceRequestInvalid("distribute_model is slicegpt's (accelerate); slicer='builtin' does not offer it")
    return device


def _check_slicer(plan: SweepPlan) -> None:
    if plan.slicer == "builtin" and plan.args.varied_seqlen:
        raise SliceRequestInvalid(
            "varied_seqlen calibrates on rows of unequal length, which slicegpt pads and masks; slicebridge's "
            "maker takes equal-length rows: use slicer='official' (slicegpt in the server's env) for it"
        )


def _check_sizes(plan: SweepPlan) -> None:
    args, config = plan.args, plan.base_config
    positions = int(config.get("max_position_embeddings") or 0)
    for name in ("cal_max_seqlen", "ppl_eval_seqlen"):
        if positions and getattr(args, name) > positions and (name == "cal_max_seqlen" or args.eval_ppl):
            raise SliceRequestInvalid(
                f"{name}={getattr(args, name)} exceeds the model's max_position_embeddings ({positions}); "
                f"pass {name} <= {positions}"
            )
    for s in args.sparsities:
        if plan.width(s) < 1:
            raise SliceRequestInvalid(
                f"sparsity {s} with round_interval {args.round_interval} leaves no width of hidden size "
                f"{plan.hidden_size}"
            )


def _check_outputs(plan: SweepPlan) -> None:
    """Every output writable and, without overwrite, new; base files already there must be the same. A missing
    output_dir is made only when the first checkpoint is written."""
    if plan.output_dir.exists() and not plan.output_dir.is_dir():
        raise OutputError(f"output_dir {plan.output_dir} is a file, not a directory")
    if not plan.output_dir.exists():
        ancestor = next(parent for parent in plan.output_dir.parents if parent.exists())
        if not (ancestor.is_dir() and os.access(ancestor, os.W_OK | os.X_OK)):
            raise OutputError(f"cannot create the output directory {plan.output_dir}: {ancestor} is not writable")
        return
    for s in plan.args.sparsities:
        for path, directory in plan.outputs(s):
            check_output(path, plan.args.overwrite, directory=directory)
    if plan.args.overwrite or plan.output_dir.resolve() == plan.base_dir.resolve():
        return
    from slicebridge.model.slicing import base_files

    for source in base_files(plan.base_dir):
        name, there = source.name, plan.output_dir / source.name
        if there.exists() and not (there.is_file() and filecmp.cmp(there, source, shallow=False)):
            raise OutputExists(
                f"{there} already exists and differs from the base model's {name}; pass overwrite=True "
                "(--overwrite) to replace it, or another output_dir"
            )
