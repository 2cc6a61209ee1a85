"""The ``slice`` request: a sweep of sparsities sliced by the warm server from one dense model.

A sweep is planned and checked before any work (``slice_plan``); its calibration text is read,
split and counted in samples; the dense model comes from the warm cache or is loaded into it
once (``slice_official`` when slicegpt is importable, else ``slice_builtin``); then each sparsity
is sliced from it and saved in run_slicegpt's ``--save-dir`` layout, its ``.pt`` and ``.json``
published together. Each sliced model enters the warm cache as if it had been loaded from its
new files, so ``convert``/``export`` asked in the same request (and later requests naming
those files) start from it. A sparsity that fails (out of memory, ...) is reported and leaves
nothing on disk; the sparsities done are kept and the sweep goes on.
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
        warm, hit = self._warm_dense(plan, ctx)
        done, failed = [], []
        for sparsity in args.sparsities:
            try:
                done.append(self._slice_one(plan, warm, float(sparsity), ctx))
            except Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - one sparsity failing does not lose the others
                failed.append(_failure(float(sparsity), exc))
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
            copied=copied_files(plan) if done else [],
            timings={
                "load": 0.0 if hit else warm.load_seconds,
                "baseline_ppl": 0.0 if hit else warm.baseline_seconds,
                "total": time.perf_counter() - started,
            },
        )

    def _warm_dense(self, plan: SweepPlan, ctx: RequestContext):
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

        return self.cache.get_or_load(DenseKey.of(plan), load, lambda warm: warm.nbytes)

    def _slice_one(self, plan: SweepPlan, warm, sparsity: float, ctx: RequestContext) -> protocol.SlicedCheckpoint:
        """Slice, save, measure and (when asked) convert and export one sparsity; on failure remove what it wrote."""
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = now - clock
            clock = now

        written: list[Path] = []
        try:
            state, slicing_config, official = warm.slice(
                plan, sparsity, lambda done, total: ctx.progress(f"slice {sparsity}", done, total, "layers")
            )
            lap("slice")
            loaded = self._save(plan, sparsity, state, slicing_config, official, written)
            lap("save")
            ppl = warm.sliced_perplexity(plan, official or loaded.model) if plan.args.eval_ppl else None
            lap("ppl")
            extra = self._artifacts(plan, sparsity, loaded, written, ctx)
            lap("artifacts")
        except BaseException:
            _remove(written)
            raise
        params = parameter_counts(loaded.model, plan.base_config)
        timings["total"] = sum(timings.values())
        return protocol.SlicedCheckpoint(
            sparsity=sparsity,
            checkpoint=str(written[0]),
            slicing_config=str(written[1]),
            hidden_size=plan.width(sparsity),
            actual_ratio=actual_ratio(params),
            params=params,
            ppl=ppl,
            timings=timings,
            **extra,
        )

    def _save(self, plan: SweepPlan, sparsity: float, state, slicing_config: str, official, written: list[Path]):
        """Publish the .pt and .json together, copy the base files, and put the sliced model in the warm cache."""
        import torch

        from slicebridge.model import portable
        from slicebridge.model.checkpoint import read_checkpoint
        from slicebridge.model.slicing import copy_base_files
        from slicebridge.server.loaders import _portable_from_official

        stem = make_directories(plan.output_dir) / plan.stems[sparsity]
        pt, config_path = stem.with_name(stem.name + ".pt"), stem.with_name(stem.name + ".json")
        with atomic_file(pt, plan.args.overwrite) as pt_tmp, atomic_file(config_path, plan.args.overwrite) as json_tmp:
            torch.save(state, pt_tmp)
            json_tmp.write_text(slicing_config)
        written += [pt, config_path]
        copy_base_files(plan.base_dir, plan.output_dir)
        checkpoint = read_checkpoint(
            pt, base_dir=plan.output_dir, sparsity=sparsity, round_interval=plan.args.round_interval
        )
        config = checkpoint.sliced_config()
        if official is not None:
            model = _portable_from_official(official.model, config)
        else:
            model = portable.build_model(state, config)
        model = model.to(device=plan.device).eval()
        official_model = official.model if official is not None else None
        loaded = LoadedCheckpoint(
            model, checkpoint, plan.slicer, plan.device, 0.0, official_model, plan.model_name if official else None
        )
        key = CacheKey.for_file(str(pt), str(plan.output_dir), plan.slicer, plan.device, checkpoint.dtype)
        self.cache.put(key, loaded, loaded.nbytes)
        return loaded

    def _artifacts(self, plan: SweepPlan, sparsity: float, loaded, written: list[Path], ctx) -> dict[str, Any]:
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
            written.append(output)
            extra["bin"] = protocol.to_wire(result)
        if plan.args.export:
            result = self.convert.export(protocol.ExportArgs(output=str(stem), **common), ctx)
            written.append(stem)
            extra["export"] = protocol.to_wire(result)
        return extra


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
        train = dataset["train"]
        calibration = Calibration(args.cal_dataset, list(train[train.column_names[0]]), list(dataset["test"]["text"]))
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
    calibration.ids, calibration.samples = ids, int(ids.shape[0])
    cal.check_enough(calibration.samples, args.cal_nsamples, args.cal_max_seqlen)
    if args.eval_ppl:
        perplexity_windows(calibration.held_out, tokenizer, args.ppl_eval_seqlen)
    return calibration


def copied_files(plan: SweepPlan) -> list[str]:
    from slicebridge.model.slicing import base_files

    same = plan.output_dir.resolve() == plan.base_dir.resolve()
    return [] if same else [path.name for path in base_files(plan.base_dir)]


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
