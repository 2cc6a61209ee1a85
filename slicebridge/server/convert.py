"""The requests that use the warm model cache: ``convert``, ``export``, ``reference`` and ``cache_info``.

``convert`` loads a checkpoint (from the warm cache when it is there) and writes a
``.bin`` in the seed's dict format (see ``model.binfile``); ``export`` writes the
pickle-free directory (``model.export``), checked against the official model first when
the env has it; ``reference`` runs the checkpoint on the caller's inputs for
``verify``. Convert and export share one preamble: paths checked absolute, the output
checked before anything is loaded, then the load. Outputs are written atomically. The
seed-``.bin`` requests (``upgrade``, ``info``) are in ``server.seed``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from slicebridge.bridge import protocol
from slicebridge.bridge.server_loop import HandlerError, RequestContext
from slicebridge.dtypes import dtype_name
from slicebridge.model.atomic import check_output
from slicebridge.model.facts import actual_ratio, parameter_counts
from slicebridge.model.guards import job_inputs, refuse_output_over_inputs
from slicebridge.model.portable import family_of
from slicebridge.server import runtime_info
from slicebridge.server.cache import CacheKey, ModelCache
from slicebridge.server.loaders import (
    LoadedCheckpoint,
    load_checkpoint,
    resolve_devices,
    resolve_dtype,
    resolve_loader,
)


class RelativePath(HandlerError):
    """Paths must arrive absolute: the server's working directory is not the client's."""

    error_type = "BadRequest"


def require_absolute(**paths: str | None) -> None:
    for name, path in paths.items():
        if path is not None and not os.path.isabs(path):
            raise RelativePath(
                f"{name} must be an absolute path, not {path!r} (the client library sends "
                "absolute paths; a hand-made request must too)"
            )


@dataclass
class _Started:
    """A writing request after its preamble: the model loaded, and when each step ended."""

    loaded: LoadedCheckpoint
    cache_hit: bool
    started: float
    loaded_at: float

    def timings(self) -> dict[str, float]:
        done = time.perf_counter()
        return {
            "load": 0.0 if self.cache_hit else self.loaded.load_seconds,
            "save": done - self.loaded_at,
            "total": done - self.started,
        }


class ConvertService:
    """Holds the warm model cache and serves the requests that use it."""

    def __init__(self, cache: ModelCache | None = None):
        self.cache = cache if cache is not None else ModelCache()

    def load(self, args, ctx: RequestContext) -> tuple[LoadedCheckpoint, bool]:
        """The checkpoint ``args`` names (``slicegpt_model``, ``base_model``, ``sparsity``, ``round_interval``,
        ``loader``, ``device``, ``dtype`` where the request has one), from the cache or loaded into it; and
        whether it was a cache hit. One rule for both loaders: the checkpoint's dtype unless ``dtype`` says.
        ``device`` may be a group (``cuda:0+cuda:1``): the model is spread over it, and cached as such."""
        from slicebridge.model.checkpoint import read_checkpoint

        loader, device = resolve_loader(args.loader), resolve_devices(args.device)
        # The reader is cheap (tensors are memory-mapped) and validates sparsity and
        # round_interval, so it runs on every request, cached or not.
        checkpoint = read_checkpoint(
            args.slicegpt_model, base_dir=args.base_model, sparsity=args.sparsity, round_interval=args.round_interval
        )
        dtype = resolve_dtype(getattr(args, "dtype", None) or checkpoint.dtype)
        key = CacheKey.for_file(str(checkpoint.checkpoint_path), str(checkpoint.base_dir), loader, device, dtype)

        def progress(stage, done, total):
            ctx.progress(stage, done, total, "steps")

        return self.cache.get_or_load(
            key, lambda: load_checkpoint(checkpoint, loader, device, dtype, progress), lambda loaded: loaded.nbytes
        )

    def _start(self, args, ctx: RequestContext, *, directory: bool) -> _Started:
        """The preamble of ``convert`` and ``export``: check the paths and the output, then load."""
        started = time.perf_counter()
        require_absolute(slicegpt_model=args.slicegpt_model, output=args.output, base_model=args.base_model)
        refuse_output_over_inputs(args.output, job_inputs(args.slicegpt_model, args.base_model))
        check_output(args.output, args.overwrite, directory=directory)
        loaded, hit = self.load(args, ctx)
        ctx.check_cancelled()
        return _Started(loaded, hit, started, time.perf_counter())

    def convert(self, args: protocol.ConvertArgs, ctx: RequestContext) -> protocol.ConvertResult:
        from slicebridge.model.binfile import save_bin, tokenizer_files

        run = self._start(args, ctx, directory=False)
        loaded, checkpoint = run.loaded, run.loaded.checkpoint
        ctx.progress("save", 0, 1, "files")
        params = parameter_counts(loaded.model, checkpoint.base_config)
        summary = save_bin(
            args.output,
            model=loaded.model,
            tokenizer_files=tokenizer_files(checkpoint.base_dir),
            pruning_ratio=checkpoint.sparsity if checkpoint.sparsity is not None else 0.0,
            actual_ratio=actual_ratio(params),
            config={
                "base_model": str(checkpoint.base_dir),
                "slicegpt_model": str(checkpoint.checkpoint_path),
                "sparsity": checkpoint.sparsity,
                "round_interval": checkpoint.round_interval,
            },
            extra={
                "loader": loaded.loader,
                "params": params,
                "widths": checkpoint.widths.as_slicing_config(checkpoint.hidden_size),
            },
            overwrite=args.overwrite,
            pickle_module=args.pickle_module,
            max_mode=_copied_sources_mode(checkpoint),
        )
        ctx.progress("save", 1, 1, "files")
        return convert_result(
            args.output,
            loaded.model,
            summary,
            params,
            loader=loaded.loader,
            cache_hit=run.cache_hit,
            device=loaded.device,
            sparsity=checkpoint.sparsity,
            round_interval=checkpoint.round_interval,
            timings=run.timings(),
            official_name=loaded.official_name,
            placement=loaded.placement,
        )

    def export(self, args: protocol.ExportArgs, ctx: RequestContext) -> protocol.ExportResult:
        from slicebridge.model.binfile import producer_versions, tokenizer_files
        from slicebridge.model.export import checkpoint_provenance, export_model

        run = self._start(args, ctx, directory=True)
        loaded, checkpoint = run.loaded, run.loaded.checkpoint
        ctx.progress("check", 0, 1, "steps")
        verification = _check_against_official(loaded)
        ctx.progress("check", 1, 1, "steps")
        ctx.progress("write", 0, 1, "dirs")
        provenance = {**checkpoint_provenance(checkpoint, loader=loaded.loader), "producer": producer_versions()}
        summary = export_model(
            loaded.model,
            args.output,
            tokenizer_files=tokenizer_files(checkpoint.base_dir),
            provenance=provenance,
            verification=verification,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            max_mode=_copied_sources_mode(checkpoint),
        )
        ctx.progress("write", 1, 1, "dirs")
        return protocol.ExportResult(
            output=str(summary.path),
            bytes=summary.size_bytes,
            files=list(summary.files),
            sharded=summary.sharded,
            loader=loaded.loader,
            cache_hit=run.cache_hit,
            device=loaded.device,
            dtype=summary.dtype,
            sparsity=float(checkpoint.sparsity or 0.0),
            round_interval=checkpoint.round_interval,
            actual_ratio=summary.provenance["actual_ratio"],
            params=summary.provenance["params"],
            timings=run.timings(),
            verification=verification,
            family=checkpoint.family.key,
            official_name=loaded.official_name,
            placement=loaded.placement,
        )

    def reference(self, args: protocol.ReferenceArgs, ctx: RequestContext) -> protocol.ReferenceResult:
        """Run the reference model (the official one when it was loaded officially) on the inputs; none when
        the caller's artifact is of another family (the result's ``family`` says so, with no logits)."""
        from slicebridge.bridge.protocol import TensorFrame
        from slicebridge.model.compare import forward_logits
        from slicebridge.server.runtime_info import package_versions

        started = time.perf_counter()
        require_absolute(slicegpt_model=args.slicegpt_model, base_model=args.base_model)
        for index, ids in enumerate(args.inputs):
            if not isinstance(ids, TensorFrame) or ids.dtype not in ("int64", "int32") or len(ids.shape) != 2:
                raise ValueError(f"inputs[{index}] must be a [batch, seq] integer tensor")
        loaded, hit = self.load(args, ctx)
        model = loaded.official_model if loaded.official_model is not None else loaded.model
        count = len(args.inputs)
        family = loaded.checkpoint.family.key
        logits = []
        if args.family in (None, family):
            logits = forward_logits(
                model,
                [ids.to_torch() for ids in args.inputs],
                loaded.input_device,
                lambda index: ctx.progress("reference", index, count, "inputs"),
            )
        ctx.progress("reference", count, count, "inputs")
        versions, _ = package_versions()
        return protocol.ReferenceResult(
            logits=logits,
            loader=loaded.loader,
            device=loaded.device,
            dtype=dtype_name(next(model.parameters()).dtype),
            cache_hit=hit,
            seconds=time.perf_counter() - started,
            versions={k: versions.get(k) for k in ("torch", "transformers", "slicegpt")},
            family=family,
            official_name=loaded.official_name,
            placement=loaded.placement,
        )

    def cache_info(self, args: protocol.CacheInfoArgs, ctx: RequestContext) -> protocol.CacheInfoResult:
        entries = [
            {"checkpoint": key.checkpoint, "loader": key.loader, "device": key.device, "bytes": size}
            for key, size in self.cache.entries()
        ]
        return protocol.CacheInfoResult(
            entries,
            self.cache.used_bytes,
            self.cache.budget_bytes,
            self.cache.hits,
            self.cache.misses,
            devices=runtime_info.cuda_memory(),
        )


def convert_result(
    output: str,
    model,
    summary: dict,
    params: dict,
    *,
    loader: str,
    cache_hit: bool,
    device: str,
    sparsity: float | None,
    round_interval: int | None,
    timings: dict[str, float],
    official_name: str | None = None,
    placement: dict | None = None,
) -> protocol.ConvertResult:
    """What ``convert`` and ``upgrade`` report about the ``.bin`` they wrote (``summary``: ``save_bin``'s)."""
    return protocol.ConvertResult(
        output=str(output),
        bytes=os.path.getsize(output),
        loader=loader,
        cache_hit=cache_hit,
        device=device,
        dtype=dtype_name(next(model.parameters()).dtype),
        sparsity=float(sparsity) if sparsity is not None else 0.0,
        round_interval=round_interval,
        actual_ratio=actual_ratio(params),
        params=dict(params),
        timings=timings,
        pickle_module=summary["pickle_module"],
        format_version=summary["format_version"],
        family=family_of(model.config).key,
        official_name=official_name,
        placement=placement,
    )


def _check_against_official(loaded: LoadedCheckpoint) -> dict:
    """Compare the portable model with the official one, here, before writing: the model card's check."""
    if loaded.official_model is None:
        return {
            "status": "not checked here: the server's env has no slicegpt (builtin loader); "
            "run `slicebridge verify` on the export"
        }
    from transformers import AutoTokenizer

    from slicebridge.model.compare import compare, forward_logits, verification_inputs

    tokenizer = AutoTokenizer.from_pretrained(loaded.checkpoint.base_dir, trust_remote_code=False)
    inputs = verification_inputs(loaded.model.config.vocab_size, tokenizer)
    ids = list(inputs.values())
    comparison = compare(
        inputs,
        forward_logits(loaded.model, ids, loaded.input_device),
        forward_logits(loaded.official_model, ids, loaded.input_device),
        [next(m.parameters()).dtype for m in (loaded.model, loaded.official_model)],
    )
    return {
        "status": "passed" if comparison.passed else "FAILED",
        "against": "the official slicegpt model, in the slicegpt env",
        "dtype": comparison.dtype,
        "tolerance": comparison.tolerance,
        "inputs": comparison.by_input(),
    }


def _copied_sources_mode(checkpoint) -> int:
    """The widest permissions an output may have that holds the bytes of the checkpoint and tokenizer files."""
    from slicebridge.model.binfile import tokenizer_paths, widest_mode

    return widest_mode([checkpoint.checkpoint_path, *tokenizer_paths(checkpoint.base_dir).values()])
