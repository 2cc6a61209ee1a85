"""The ``convert``, ``upgrade`` and ``cache_info`` requests.

``convert`` loads a checkpoint (from the warm cache when it is there) and writes a
``.bin`` in the seed's dict format (see ``model.binfile``). ``upgrade`` reads a
``.bin`` made the seed's way — a dill pickle of the slicegpt model object, which only
this env can unpickle — and writes ours from the tensors inside. Unpickling runs code
from the file, so ``upgrade`` is the only request that does it, only for the file named,
and only when the request says ``trust_pickle``; ``info`` reads such a file's opcodes
(``model.seed_bin``). Output paths are checked before anything is loaded, and written
atomically.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import zipfile
from pathlib import Path

from slicebridge.bridge import protocol
from slicebridge.bridge.server_loop import HandlerError, RequestContext
from slicebridge.model.atomic import check_output
from slicebridge.server.cache import CacheKey, ModelCache
from slicebridge.server.loaders import LoadedCheckpoint, load_checkpoint, resolve_device, resolve_loader

log = logging.getLogger("slicebridge.server.convert")


class NotASeedBin(HandlerError):
    """``upgrade`` was given something that is not a .bin made the seed's way."""


class PickleNotTrusted(HandlerError):
    """``upgrade`` would unpickle a file (running code from it) that the user did not say to trust."""


class RelativePath(HandlerError):
    """Paths must arrive absolute: the server's working directory is not the client's."""

    error_type = "BadRequest"


def _require_absolute(**paths: str | None) -> None:
    for name, path in paths.items():
        if path is not None and not os.path.isabs(path):
            raise RelativePath(f"{name} must be an absolute path, not {path!r} (the client library sends "
                               "absolute paths; a hand-made request must too)")


class ConvertService:
    """Holds the warm model cache and serves the requests that use it."""

    def __init__(self, cache: ModelCache | None = None):
        self.cache = cache if cache is not None else ModelCache()

    # ------------------------------------------------------------------ loading through the cache

    def load(self, slicegpt_model: str, base_model: str | None, sparsity: float | None,
             round_interval: int | None, loader: str, device: str,
             ctx: RequestContext) -> tuple[LoadedCheckpoint, bool]:
        loader = resolve_loader(loader)
        device = resolve_device(device)
        from slicebridge.model.checkpoint import read_checkpoint

        # The reader is cheap (tensors are memory-mapped) and validates sparsity and
        # round_interval, so it runs on every request, cached or not.
        checkpoint = read_checkpoint(slicegpt_model, base_dir=base_model, sparsity=sparsity,
                                     round_interval=round_interval)
        key = CacheKey.for_file(str(checkpoint.checkpoint_path), str(checkpoint.base_dir), loader, device)

        def progress(stage, done, total):
            ctx.progress(stage, done, total, "steps")

        def load():
            return load_checkpoint(checkpoint, loader, device, progress)

        return self.cache.get_or_load(key, load, lambda loaded: loaded.nbytes)

    # ------------------------------------------------------------------ requests

    def convert(self, args: protocol.ConvertArgs, ctx: RequestContext) -> protocol.ConvertResult:
        started = time.perf_counter()
        _require_absolute(slicegpt_model=args.slicegpt_model, output=args.output, base_model=args.base_model)
        check_output(args.output, args.overwrite)
        loaded, hit = self.load(args.slicegpt_model, args.base_model, args.sparsity, args.round_interval,
                                args.loader, args.device, ctx)
        loaded_at = time.perf_counter()
        ctx.check_cancelled()
        checkpoint = loaded.checkpoint
        from slicebridge.model.binfile import save_bin, tokenizer_files

        ctx.progress("save", 0, 1, "files")
        params = _param_counts(loaded.model, checkpoint.base_config)
        summary = save_bin(
            args.output,
            model=loaded.model,
            tokenizer_files=tokenizer_files(checkpoint.base_dir),
            pruning_ratio=checkpoint.sparsity if checkpoint.sparsity is not None else 0.0,
            actual_ratio=params["actual_ratio"],
            config={"base_model": str(checkpoint.base_dir), "slicegpt_model": str(checkpoint.checkpoint_path),
                    "sparsity": checkpoint.sparsity, "round_interval": checkpoint.round_interval},
            extra={"loader": loaded.loader, "params": params, "widths": checkpoint.widths.as_slicing_config(
                checkpoint.hidden_size)},
            overwrite=args.overwrite,
            pickle_module=args.pickle_module,
            max_mode=_copied_sources_mode(checkpoint),
        )
        ctx.progress("save", 1, 1, "files")
        done = time.perf_counter()
        return self._result(args.output, loaded.loader, hit, loaded.device, loaded.model, checkpoint.sparsity,
                            checkpoint.round_interval, params, summary,
                            {"load": 0.0 if hit else loaded.load_seconds, "save": done - loaded_at,
                             "total": done - started})

    def export(self, args: protocol.ExportArgs, ctx: RequestContext) -> protocol.ExportResult:
        started = time.perf_counter()
        _require_absolute(slicegpt_model=args.slicegpt_model, output=args.output, base_model=args.base_model)
        check_output(args.output, args.overwrite, directory=True)
        loaded, hit = self.load(args.slicegpt_model, args.base_model, args.sparsity, args.round_interval,
                                args.loader, args.device, ctx)
        loaded_at = time.perf_counter()
        checkpoint = loaded.checkpoint
        from slicebridge.model.binfile import producer_versions, tokenizer_files
        from slicebridge.model.export import checkpoint_provenance, export_model

        ctx.progress("check", 0, 1, "steps")
        verification = _check_against_official(loaded)
        ctx.progress("check", 1, 1, "steps")
        ctx.progress("write", 0, 1, "dirs")
        provenance = {**checkpoint_provenance(checkpoint, loader=loaded.loader), "producer": producer_versions()}
        summary = export_model(loaded.model, args.output, tokenizer_files=tokenizer_files(checkpoint.base_dir),
                               provenance=provenance, verification=verification,
                               max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                               max_mode=_copied_sources_mode(checkpoint))
        ctx.progress("write", 1, 1, "dirs")
        done = time.perf_counter()
        return protocol.ExportResult(
            output=str(summary.path), bytes=summary.size_bytes, files=list(summary.files), sharded=summary.sharded,
            loader=loaded.loader, cache_hit=hit, device=loaded.device, dtype=summary.dtype,
            sparsity=float(checkpoint.sparsity or 0.0), round_interval=checkpoint.round_interval,
            actual_ratio=provenance["actual_ratio"], params=provenance["params"],
            timings={"load": 0.0 if hit else loaded.load_seconds, "save": done - loaded_at,
                     "total": done - started},
            verification=verification)

    def upgrade(self, args: protocol.UpgradeArgs, ctx: RequestContext) -> protocol.ConvertResult:
        started = time.perf_counter()
        _require_absolute(source=args.source, output=args.output)
        if not args.trust_pickle:
            raise PickleNotTrusted(
                f"upgrade reads {args.source} by unpickling it, which runs code from the file (the seed pickled "
                "its model with dill); pass trust_pickle=True (--trust-pickle on the command line) if you trust it")
        check_output(args.output, args.overwrite)
        seed = _read_seed_bin(Path(args.source))
        ctx.progress("read", 1, 2, "steps")
        portable, base_config, seed_config = _portable_from_seed(seed, Path(args.source))
        sparsity, round_interval = seed_config["sparsity"], seed_config["round_interval"]
        from slicebridge.model.binfile import save_bin, widest_mode

        params = _param_counts(portable, base_config)
        summary = save_bin(
            args.output,
            model=portable,
            tokenizer_files=_tokenizer_files_of(seed.get("tokenizer")),
            pruning_ratio=seed.get("pruning_ratio", sparsity or 0.0),
            actual_ratio=params["actual_ratio"],
            config={"base_model": seed_config.get("base_model"), "slicegpt_model": seed_config.get("slicegpt_model"),
                    "sparsity": sparsity, "round_interval": round_interval},
            extra={"loader": "upgrade", "upgraded_from": os.path.abspath(args.source), "params": params},
            overwrite=args.overwrite,
            pickle_module=args.pickle_module,
            max_mode=widest_mode([Path(args.source)]),
        )
        ctx.progress("save", 2, 2, "steps")
        done = time.perf_counter()
        return self._result(args.output, "upgrade", False, "cpu", portable, sparsity, round_interval, params,
                            summary, {"load": 0.0, "save": done - started, "total": done - started})

    def reference(self, args: protocol.ReferenceArgs, ctx: RequestContext) -> protocol.ReferenceResult:
        """Run the reference model (the official one when it was loaded officially) on the inputs."""
        import torch

        from slicebridge.bridge.protocol import TensorFrame
        from slicebridge.server.runtime_info import package_versions

        started = time.perf_counter()
        _require_absolute(slicegpt_model=args.slicegpt_model, base_model=args.base_model)
        loaded, hit = self.load(args.slicegpt_model, args.base_model, args.sparsity, args.round_interval,
                                args.loader, args.device, ctx)
        model = loaded.official_model if loaded.official_model is not None else loaded.model
        logits = []
        with torch.no_grad():
            for index, ids in enumerate(args.inputs):
                if not isinstance(ids, TensorFrame) or ids.dtype not in ("int64", "int32") or len(ids.shape) != 2:
                    raise ValueError(f"inputs[{index}] must be a [batch, seq] integer tensor")
                ctx.progress("reference", index, len(args.inputs), "inputs")
                out = model(ids.to_torch().to(loaded.device, torch.long)).logits
                logits.append(out.float().cpu())
        ctx.progress("reference", len(args.inputs), len(args.inputs), "inputs")
        versions, _ = package_versions()
        return protocol.ReferenceResult(
            logits=logits, loader=loaded.loader, device=loaded.device,
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."), cache_hit=hit,
            seconds=time.perf_counter() - started,
            versions={k: versions.get(k) for k in ("torch", "transformers", "slicegpt")})

    def info(self, args: protocol.InfoArgs, ctx: RequestContext) -> protocol.InfoResult:
        """Facts about a seed-format .bin from its opcodes (never unpickled), and whether this env could read it."""
        from slicebridge.model.pickle_scan import diagnose_seed_bin
        from slicebridge.model.seed_bin import NotASeedModel, describe_seed_bin

        _require_absolute(path=args.path)
        path = Path(args.path)
        if not path.is_file():
            raise NotASeedBin(f"{path} does not exist or is not a file")
        try:
            facts = describe_seed_bin(path)
        except NotASeedModel as exc:
            raise NotASeedBin(str(exc)) from None
        missing = diagnose_seed_bin(path).failures[1:]  # the first, weights_only, holds everywhere
        facts.notes.append("the server's env has every class the file names: upgrade --trust-pickle can read it there"
                           if not missing else "the server's env cannot read it either: " + "; ".join(missing))
        return protocol.InfoResult(facts=facts.as_dict())

    def cache_info(self, args: protocol.CacheInfoArgs, ctx: RequestContext) -> protocol.CacheInfoResult:
        entries = [{"checkpoint": key.checkpoint, "loader": key.loader, "device": key.device, "bytes": size}
                   for key, (_, size) in self.cache._entries.items()]
        return protocol.CacheInfoResult(entries, self.cache.used_bytes, self.cache.budget_bytes,
                                        self.cache.hits, self.cache.misses)

    @staticmethod
    def _result(output, loader, hit, device, model, sparsity, round_interval, params, summary, timings):
        return protocol.ConvertResult(
            output=str(output),
            bytes=os.path.getsize(output),
            loader=loader,
            cache_hit=hit,
            device=device,
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            sparsity=float(sparsity) if sparsity is not None else 0.0,
            round_interval=round_interval,
            actual_ratio=params["actual_ratio"],
            params={k: v for k, v in params.items() if k != "actual_ratio"},
            timings=timings,
            pickle_module=summary["pickle_module"],
            format_version=summary["format_version"],
        )


def _check_against_official(loaded: LoadedCheckpoint) -> dict:
    """Compare the portable model with the official one, here, before writing: the model card's check."""
    if loaded.official_model is None:
        return {"status": "not checked here: the server's env has no slicegpt (builtin loader); "
                          "run `slicebridge verify` on the export"}
    import torch
    from transformers import AutoTokenizer

    from slicebridge.model.compare import TOLERANCES, compare_logits, comparison_dtype, verification_inputs

    tokenizer = AutoTokenizer.from_pretrained(loaded.checkpoint.base_dir, trust_remote_code=False)
    inputs = verification_inputs(loaded.model.config.vocab_size, tokenizer)
    dtype = str(next(loaded.model.parameters()).dtype).removeprefix("torch.")
    tolerance = TOLERANCES[comparison_dtype(dtype)]
    results = {}
    with torch.no_grad():
        for name, ids in inputs.items():
            ids = ids.to(loaded.device)
            got = loaded.model(ids).logits
            want = loaded.official_model(ids).logits
            comparison = compare_logits(name, ids, got, want)
            results[name] = {k: v for k, v in comparison.as_dict().items() if k != "name"}
            results[name]["passed"] = not comparison.failures(tolerance)
    passed = all(r["passed"] for r in results.values())
    return {"status": "passed" if passed else "FAILED",
            "against": "the official slicegpt model, in the slicegpt env", "dtype": dtype,
            "tolerance": tolerance, "inputs": results}


def _copied_sources_mode(checkpoint) -> int:
    """The widest permissions an output may have that holds the bytes of the checkpoint and tokenizer files."""
    from slicebridge.model.binfile import tokenizer_paths, widest_mode

    return widest_mode([checkpoint.checkpoint_path, *tokenizer_paths(checkpoint.base_dir).values()])


def _param_counts(model, base_config: dict) -> dict:
    from slicebridge.model.modeling_sliced_llama import count_sliced_parameters, dense_llama_parameter_count

    counted = count_sliced_parameters(model)
    dense = dense_llama_parameter_count(base_config)
    return {"dense": dense, "sliced": counted.total, "shortcut_q": counted.shortcut,
            "actual_ratio": 1.0 - counted.total / dense}


def _read_seed_bin(path: Path) -> dict:
    """Unpickle a seed-format .bin (a file the user named, on this machine: never wire data)."""
    import torch

    if not path.is_file():
        raise NotASeedBin(f"{path} does not exist")
    _check_names_the_seeds_classes(path)
    try:
        import dill
    except ImportError:
        raise NotASeedBin("reading a seed .bin needs dill in the slicegpt env: pip install dill") from None
    try:
        seed = torch.load(path, map_location="cpu", weights_only=False, pickle_module=dill)
    except ModuleNotFoundError as exc:
        raise NotASeedBin(
            f"{path} pickles objects of the {exc.name!r} package, which the server's env lacks; run upgrade "
            "with the env where the file was made (the slicegpt env)"
        ) from None
    except Exception as exc:
        raise NotASeedBin(f"{path} could not be read as a torch file: {type(exc).__name__}: {exc}") from None
    if not isinstance(seed, dict) or "model" not in seed:
        raise NotASeedBin(f"{path} is not a model .bin (no 'model' entry)")
    if not hasattr(seed["model"], "state_dict") or not hasattr(seed["model"], "config"):
        raise NotASeedBin(f"{path}: its 'model' is a {type(seed['model']).__name__}, not a model object")
    return seed


def _check_names_the_seeds_classes(path: Path) -> None:
    """Refuse, before unpickling, a file whose pickle does not name slicegpt or dill as the seed's do."""
    from slicebridge.model.pickle_scan import UnreadablePickle, referenced_globals

    try:
        names = referenced_globals(path)
    except (UnreadablePickle, OSError, zipfile.BadZipFile) as exc:
        raise NotASeedBin(f"{path} could not be read as a torch file: {exc}") from None
    if any(name.startswith("slicebridge.model.binfile.") for name in names):
        raise NotASeedBin(f"{path} is already a portable slicebridge .bin; nothing to upgrade")
    if not any(name.startswith(("slicegpt.", "dill.")) for name in names):
        raise NotASeedBin(f"{path} is not a .bin made the seed's way (its pickle names neither slicegpt nor dill), "
                          "so upgrade does not unpickle it")


def _portable_from_seed(seed: dict, source: Path):
    """The portable model over the tensors of a seed .bin's model object, its base config and settings."""
    from slicebridge.model.checkpoint import sliced_config_from_tensors
    from slicebridge.model.modeling_sliced_llama import build_sliced_llama

    model = seed["model"]
    base_config = model.config.to_dict()
    seed_config = dict(seed.get("config")) if isinstance(seed.get("config"), dict) else {}
    seed_config.setdefault("sparsity", seed.get("pruning_ratio"))
    seed_config.setdefault("round_interval", None)
    tensors = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    config = sliced_config_from_tensors(tensors, base_config, source=source, sparsity=seed_config["sparsity"],
                                        round_interval=seed_config["round_interval"])
    return build_sliced_llama(tensors, config).eval(), base_config, seed_config


def _tokenizer_files_of(tokenizer) -> dict[str, bytes]:
    from slicebridge.model.binfile import tokenizer_files

    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        return {}
    with tempfile.TemporaryDirectory(prefix="slicebridge-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return tokenizer_files(tmp)
