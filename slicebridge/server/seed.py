"""The seed's ``.bin`` files in the server: ``upgrade`` reads and rewrites one, ``info`` describes one.

The seed pickled the slicegpt model object with dill, which only this env can unpickle.
``upgrade`` reads such a file and writes our portable ``.bin`` from the tensors inside.
Unpickling runs code from the file, so ``upgrade`` is the only request that does it, only
for the file named, only when the request says ``trust_pickle``, and only for a file whose
pickle names slicegpt or dill. ``info`` never unpickles: it reads the file's opcodes
(``model.seed_bin``) and says whether this env has every class the file names.
"""

from __future__ import annotations

import os
import tempfile
import time
import zipfile
from pathlib import Path

from slicebridge.bridge import protocol
from slicebridge.bridge.server_loop import HandlerError, RequestContext
from slicebridge.model.atomic import check_output
from slicebridge.model.facts import actual_ratio, parameter_counts
from slicebridge.server.convert import convert_result, require_absolute


class NotASeedBin(HandlerError):
    """``upgrade`` or ``info`` was given something that is not a .bin made the seed's way."""


class PickleNotTrusted(HandlerError):
    """``upgrade`` would unpickle a file (running code from it) that the user did not say to trust."""


def upgrade(args: protocol.UpgradeArgs, ctx: RequestContext) -> protocol.ConvertResult:
    """Write a portable ``.bin`` from the tensors of a seed-format one (unpickled: trusted files only)."""
    from slicebridge.model.binfile import save_bin, widest_mode

    started = time.perf_counter()
    require_absolute(source=args.source, output=args.output)
    if not args.trust_pickle:
        raise PickleNotTrusted(
            f"upgrade reads {args.source} by unpickling it, which runs code from the file (the seed pickled "
            "its model with dill); pass trust_pickle=True (--trust-pickle on the command line) if you trust it"
        )
    check_output(args.output, args.overwrite)
    seed = _read_seed_bin(Path(args.source))
    ctx.progress("read", 1, 2, "steps")
    portable, base_config, seed_config = _portable_from_seed(seed, Path(args.source))
    sparsity, round_interval = seed_config["sparsity"], seed_config["round_interval"]
    params = parameter_counts(portable, base_config)
    summary = save_bin(
        args.output,
        model=portable,
        tokenizer_files=_tokenizer_files_of(seed.get("tokenizer")),
        pruning_ratio=seed.get("pruning_ratio", sparsity or 0.0),
        actual_ratio=actual_ratio(params),
        config={
            "base_model": seed_config.get("base_model"),
            "slicegpt_model": seed_config.get("slicegpt_model"),
            "sparsity": sparsity,
            "round_interval": round_interval,
        },
        extra={"loader": "upgrade", "upgraded_from": os.path.abspath(args.source), "params": params},
        overwrite=args.overwrite,
        pickle_module=args.pickle_module,
        max_mode=widest_mode([Path(args.source)]),
    )
    ctx.progress("save", 2, 2, "steps")
    seconds = time.perf_counter() - started
    return convert_result(
        args.output,
        portable,
        summary,
        params,
        loader="upgrade",
        cache_hit=False,
        device="cpu",
        sparsity=sparsity,
        round_interval=round_interval,
        timings={"load": 0.0, "save": seconds, "total": seconds},
    )


def info(args: protocol.InfoArgs, ctx: RequestContext) -> protocol.InfoResult:
    """Facts about a seed-format .bin from its opcodes (never unpickled), and whether this env could read it."""
    from slicebridge.model.pickle_scan import diagnose_seed_bin
    from slicebridge.model.seed_bin import NotASeedModel, describe_seed_bin

    require_absolute(path=args.path)
    path = Path(args.path)
    if not path.is_file():
        raise NotASeedBin(f"{path} does not exist or is not a file")
    try:
        facts = describe_seed_bin(path)
    except NotASeedModel as exc:
        raise NotASeedBin(str(exc)) from None
    missing = diagnose_seed_bin(path).failures[1:]  # the first, weights_only, holds everywhere
    facts.notes.append(
        "the server's env has every class the file names: upgrade --trust-pickle can read it there"
        if not missing
        else "the server's env cannot read it either: " + "; ".join(missing)
    )
    return protocol.InfoResult(facts=facts.as_dict())


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
        raise NotASeedBin(
            f"{path} is not a .bin made the seed's way (its pickle names neither slicegpt nor dill), "
            "so upgrade does not unpickle it"
        )


def _portable_from_seed(seed: dict, source: Path):
    """The portable model over the tensors of a seed .bin's model object, its base config and settings."""
    from slicebridge.model import portable
    from slicebridge.model.checkpoint import family_of_base_config, sliced_config_from_tensors

    model = seed["model"]
    base_config = model.config.to_dict()
    family = family_of_base_config(base_config, f"{source} (its model's config)")
    seed_config = dict(seed.get("config")) if isinstance(seed.get("config"), dict) else {}
    seed_config.setdefault("sparsity", seed.get("pruning_ratio"))
    seed_config.setdefault("round_interval", None)
    tensors = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    config = sliced_config_from_tensors(
        tensors,
        base_config,
        family,
        source=source,
        sparsity=seed_config["sparsity"],
        round_interval=seed_config["round_interval"],
    )
    return portable.build_model(tensors, config).eval(), base_config, seed_config


def _tokenizer_files_of(tokenizer) -> dict[str, bytes]:
    from slicebridge.model.binfile import tokenizer_files

    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        return {}
    with tempfile.TemporaryDirectory(prefix="slicebridge-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return tokenizer_files(tmp)
