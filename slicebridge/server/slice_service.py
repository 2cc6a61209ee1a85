"""The ``slice`` request: a sweep of sparsities sliced by the warm server from one dense model.

A sweep is planned and checked before any work (``slice_plan``); its calibration text is read,
split and counted in samples; the dense model comes from the warm cache or is loaded into it
once (``slice_official`` when slicegpt is importable, else ``slice_builtin``); then each sparsity
is sliced from it and saved in run_slicegpt's ``--save-dir`` layout (its ``.json``, then its
``.pt``, each atomically, no more readable than the dense model's files). When ``convert`` or
``export`` is asked, the sliced model enters the warm cache as if it had been loaded from its new
files, so they start from it; the dense model stays the most recently used entry. A sparsity
that fails (out of memory, ...) is reported and removes the outputs it had made new (files it
replaced under ``overwrite`` stay replaced); the sparsities done are kept and the sweep goes
on. A request that slices nothing also removes the base files and the output directory it made.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slicebridge.bridge import protocol
from slicebridge.bridge.server_loop import Cancelled, RequestContext, is_out_of_memory
from slicebridge.model.atomic import atomic_file, make_directories
from slicebridge.model.facts import actual_ratio, parameter_counts
from slicebridge.server.cache import CacheKey
from slicebridge.server.convert import ConvertService
from slicebridge.server.loaders import LoadedCheckpoint
from slicebridge.server.slice_plan import Calibration, SweepPlan, plan_sweep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseKey:
    """What determines a warm dense model: its files, the slicer, device and dtype, the name the official
    adapter was given, and the held-out text its perplexity was measured on."""

    checkpoint: str  # the base model directory, resolved (named so for cache_info)
    files: tuple  # (name, size, mtime_ns) of config.json and the weights
    loader: str  # the slicer: official | builtin
    device: str
    dtype: str
    model_name: str
    perplexity: tuple  # (held-out digest, seqlen, batch size), or () without eval_ppl

    @classmethod
    def of(cls, plan: SweepPlan) -> DenseKey:
        base = Path(os.path.realpath(plan.base_dir))
        files = []
        for path in sorted(base.iterdir()):
            if path.name == "config.json" or path.name.endswith((".safetensors", ".safetensors.index.json")):
                st = path.stat()
                files.append((path.name, st.st_size, st.st_mtime_ns))
        args = plan.args
        ppl = (plan.calibration.digest(), args.ppl_eval_seqlen, args.ppl_eval_batch_size) if args.eval_ppl else ()
        return cls(str(base), tuple(files), plan.slicer, plan.device, plan.dtype, plan.model_name, ppl)


class SliceService:
    """Serves ``slice`` with the warm cache it shares with convert and export."""

    def __init__(self, convert: ConvertService):
        self.convert = convert
        self.cache = convert.cache
        self.dense_loads = 0  # dense models read from disk by this server, all requests together

    def slice(self, args: protocol.SliceArgs, ctx: RequestContext) -> protocol.SliceResult:
        started = time.perf_counter()
        plan = plan_sweep(args)
        plan.calibration = read_calibration(plan)
        ctx.check_cancelled()
        key = DenseKey.of(plan)
        warm, hit = self._warm_dense(plan, key, ctx)
        outputs = _Outputs(plan)
        done, failed = [], []
        try:
            for sparsity in args.sparsities:
                try:
                    done.append(self._slice_one(plan, warm, float(sparsity), outputs, ctx))
                except Cancelled:
                    raise
                except Exception as exc:  # noqa: BLE001 - one sparsity failing does not lose the others
                    failed.append(_failure(float(sparsity), exc))
                self.cache.touch(key)  # the sweep's own sliced models are evicted before its dense model
        finally:
            if not done:
                outputs.undo_base()
        return protocol.SliceResult(
            output_dir=str(plan.output_dir),
            slicer=plan.slicer,
            family=plan.family.key,
            model_name=plan.model_name,
            device=plan.device,
            dtype=plan.dtype,
            dense={"cache_hit": hit, "load_seconds": 0.0 if hit else warm.load_seconds, "loads": self.dense_loads},
            calibration=plan.calibration.facts(args),
            baseline_ppl=warm.baseline_ppl,
            checkpoints=done,
            failed=failed,
            copied=outputs.copied if done else [],
            timings={
                "load": 0.0 if hit else warm.load_seconds,
                "baseline_ppl": 0.0 if hit else warm.baseline_seconds,
                "total": time.perf_counter() - started,
            },
        )

    def _warm_dense(self, plan: SweepPlan, key: DenseKey, ctx: RequestContext):
        def load():
            ctx.progress("load dense", 0, 1, "models")
            if plan.slicer == "official":
                from slicebridge.server.slice_official import OfficialDense as Dense
            else:
                from slicebridge.server.slice_builtin import BuiltinDense as Dense
            warm = Dense(plan)
            self.dense_loads += 1
            ctx.progress("load dense", 1, 1, "models")
            return warm

        return self.cache.get_or_load(key, load, lambda warm: warm.nbytes)

    def _slice_one(
        self, plan: SweepPlan, warm, sparsity: float, outputs: _Outputs, ctx: RequestContext
    ) -> protocol.SlicedCheckpoint:
        """Slice, save, measure and (when asked) convert and export one sparsity; on failure remove the outputs
        it made new."""
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = now - clock
            clock = now

        new = outputs.new_ones(sparsity)
        try:
            state, slicing_config, official = warm.slice(
                plan, sparsity, lambda done, total: ctx.progress(f"slice {sparsity}", done, total, "layers")
            )
            lap("slice")
            loaded = self._save(plan, sparsity, state, slicing_config, official, outputs)
            lap("save")
            ppl = warm.perplexity(plan, official or loaded.model) if plan.args.eval_ppl else None
            lap("ppl")
            extra = self._artifacts(plan, sparsity, loaded, ctx)
            lap("artifacts")
        except BaseException:
            _remove(new)
            raise
        params = parameter_counts(loaded.model, plan.base_config)
        timings["total"] = sum(timings.values())
        checkpoint = loaded.checkpoint.checkpoint_path
        return protocol.SlicedCheckpoint(
            sparsity=sparsity,
            checkpoint=str(checkpoint),
            slicing_config=str(checkpoint.with_suffix(".json")),
            hidden_size=plan.width(sparsity),
            actual_ratio=actual_ratio(params),
            params=params,
            ppl=ppl,
            timings=timings,
            **extra,
        )

    def _save(self, plan: SweepPlan, sparsity: float, state, slicing_config: str, official, outputs: _Outputs):
        """Publish the .json and the .pt, copy the base files, and (for convert or export) put the sliced model
        in the warm cache."""
        import torch

        from slicebridge.model import portable
        from slicebridge.model.binfile import narrow_permissions
        from slicebridge.model.checkpoint import read_checkpoint
        from slicebridge.model.slicing import copy_base_files
        from slicebridge.server.loaders import _portable_from_official

        stem = make_directories(plan.output_dir) / plan.stems[sparsity]
        pt, config_path = stem.with_name(stem.name + ".pt"), stem.with_name(stem.name + ".json")
        with atomic_file(config_path, plan.args.overwrite) as tmp:
            tmp.write_text(slicing_config)
            narrow_permissions(tmp, outputs.max_mode)
        with atomic_file(pt, plan.args.overwrite) as tmp:
            torch.save(state, tmp)
            narrow_permissions(tmp, outputs.max_mode)
        for name in copy_base_files(plan.base_dir, plan.output_dir):
            narrow_permissions(plan.output_dir / name, outputs.max_mode)
        checkpoint = read_checkpoint(
            pt, base_dir=plan.output_dir, sparsity=sparsity, round_interval=plan.args.round_interval
        )
        config = checkpoint.sliced_config()
        model = _portable_from_official(official.model, config) if official else portable.build_model(state, config)
        model = model.to(device=plan.device).eval()
        official_model = official.model if official is not None else None
        loaded = LoadedCheckpoint(
            model, checkpoint, plan.slicer, plan.device, 0.0, official_model, plan.model_name if official else None
        )
        if plan.args.convert or plan.args.export:
            key = CacheKey.for_file(str(pt), str(plan.output_dir), plan.slicer, plan.device, checkpoint.dtype)
            self.cache.put(key, loaded, loaded.nbytes)
        return loaded

    def _artifacts(self, plan: SweepPlan, sparsity: float, loaded, ctx) -> dict[str, Any]:
        """The .bin and the export directory, made from the warm sliced model, as convert and export make them."""
        common = {
            "slicegpt_model": str(loaded.checkpoint.checkpoint_path),
            "base_model": str(plan.output_dir),
            "sparsity": sparsity,
            "round_interval": plan.args.round_interval,
            "loader": plan.slicer,
            "device": plan.device,
            "overwrite": plan.args.overwrite,
        }
        stem = plan.output_dir / plan.stems[sparsity]
        extra: dict[str, Any] = {}
        if plan.args.convert:
            output = stem.with_name(stem.name + ".bin")
            result = self.convert.convert(protocol.ConvertArgs(output=str(output), **common), ctx)
            extra["bin"] = protocol.to_wire(result)
        if plan.args.export:
            result = self.convert.export(protocol.ExportArgs(output=str(stem), **common), ctx)
            extra["export"] = protocol.to_wire(result)
        return extra


class _Outputs:
    """What a sweep writes, as it found it: which outputs are new, which base files it copies, the widest
    permissions the outputs may have (what every one of the dense model's files allows)."""

    def __init__(self, plan: SweepPlan):
        from slicebridge.model.binfile import widest_mode
        from slicebridge.model.slicing import base_files

        self.plan = plan
        self.made_dir = not plan.output_dir.exists()
        copies = base_files(plan.base_dir)
        self.max_mode = widest_mode(copies + sorted(plan.base_dir.glob("*.safetensors")))
        same = plan.output_dir.resolve() == plan.base_dir.resolve()
        self.copied = [] if same else [path.name for path in copies]  # what run_slicegpt's layout copies in
        self.new_base = [name for name in self.copied if not (plan.output_dir / name).exists()]

    def new_ones(self, sparsity: float) -> list[Path]:
        """The outputs of ``sparsity`` that do not exist yet (what a failure of it removes)."""
        return [path for path, _ in self.plan.outputs(sparsity) if not (path.exists() or path.is_symlink())]

    def undo_base(self) -> None:
        """Remove the base files this request copied, and the output directory if it made it and it is empty."""
        _remove([self.plan.output_dir / name for name in self.new_base])
        if self.made_dir and self.plan.output_dir.is_dir() and not any(self.plan.output_dir.iterdir()):
            self.plan.output_dir.rmdir()


def read_calibration(plan: SweepPlan) -> Calibration:
    """The sweep's calibration text, split, and checked to give cal_nsamples samples and (for perplexity)
    at least one window of held-out text, before any model is loaded."""
    from slicebridge.model import calibration as cal
    from slicebridge.model.perplexity import perplexity_windows
    from slicebridge.server.slice_builtin import load_tokenizer

    args = plan.args
    if args.cal_dataset is not None:
        if plan.slicer != "official":
            raise cal.CalibrationError(
                f"cal_dataset={args.cal_dataset!r} is loaded by slicegpt's data_utils, and the server's env has no "
                "slicegpt; pass calibration=PATH (a text file, .jsonl or directory)"
            )
        from slicebridge.server.slice_official import load_named_dataset

        dataset = load_named_dataset(args.cal_dataset)
        calibration = Calibration(args.cal_dataset, *named_dataset_texts(args.cal_dataset, dataset))
        calibration.dataset = dataset
    else:
        text = cal.read_calibration(args.calibration)
        if args.eval_ppl and args.held_out == 0:
            raise cal.CalibrationError(
                "held_out=0 leaves no text to measure perplexity on; pass held_out > 0, or eval_ppl=False"
            )
        train, held_out = cal.split_held_out(text.examples, args.held_out if args.eval_ppl else 0.0)
        calibration = Calibration(text.source, train, held_out)
    tokenizer = load_tokenizer(plan.base_dir)
    ids = cal.sample_calibration_ids(
        calibration.train,
        tokenizer,
        max_seqlen=args.cal_max_seqlen,
        nsamples=args.cal_nsamples,
        seed=args.seed,
        varied_seqlen=args.varied_seqlen,
    )
    calibration.ids, calibration.samples = ids, int(ids.shape[0])  # too few samples: sampling raised
    if args.eval_ppl:
        perplexity_windows(calibration.held_out, tokenizer, args.ppl_eval_seqlen)
    return calibration


def named_dataset_texts(name: str, dataset) -> tuple[list[str], list[str]]:
    """The train split's texts and the held-out ones (test split, else validation) of a DatasetDict, by each
    split's first column (as prepare_dataloader reads it: ptb's is ``sentence``)."""
    from slicebridge.model.calibration import CalibrationError

    held_out = next((split for split in ("test", "validation") if split in dataset), None)
    if "train" not in dataset or held_out is None:
        raise CalibrationError(f"the {name} dataset has splits {list(dataset)}; calibrating needs train and test")
    texts = []
    for split in ("train", held_out):
        column = dataset[split].column_names[0]
        values = dataset[split][column]
        if not all(isinstance(value, str) for value in values[:100]):
            raise CalibrationError(f"the {name} dataset's {split} split holds no text in its column {column!r}")
        texts.append(list(values))
    return texts[0], texts[1]


def _failure(sparsity: float, exc: BaseException) -> protocol.SliceFailure:
    if is_out_of_memory(exc):
        from slicebridge.server.main import free_memory

        where = "GPU" if type(exc).__name__ == "OutOfMemoryError" or "CUDA" in str(exc) else "host"
        message = f"the server ran out of {where} memory slicing sparsity {sparsity}; it freed what it could"
        del exc
        free_memory()
        log.warning(message)
        return protocol.SliceFailure(sparsity, "OutOfMemory", message)
    error_type = getattr(exc, "error_type", "") or type(exc).__name__
    log.warning("slicing sparsity %s failed: %s: %s", sparsity, error_type, exc, exc_info=exc)
    return protocol.SliceFailure(
        sparsity, error_type, str(exc).strip().splitlines()[0] if str(exc).strip() else error_type
    )


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
