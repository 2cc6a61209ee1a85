"""The family matrix: every family × operation × loader, with its fidelity to the official logits.

``make families`` (``python bench/family_matrix.py --env .envs/slicegpt``) takes the checkpoints
that the official SliceGPT code made for each family (``../shared/fixtures/slicegpt-<family>-tiny``:
the sliced run, and the logits of the official loader's model) and, through one warm server per
loader, converts each to a ``.bin``, exports it, verifies both and reads ``info``. Each artifact is
then loaded every way a user would (``.bin``: ``slicebridge.load``, ``torch.load``, ``torch.load``
with dill; export: ``AutoModelForCausalLM`` with ``trust_remote_code``, ``slicebridge.load``),
under transformers 5.x (this env) and 4.41 (the slicegpt env), by
``tests/helpers/family_artifacts_check.py``; a row shows the worst fp32 NMSE over those load paths
and both inputs, and the lowest top-1 agreement.

The ``official`` loader needs ``slicegpt`` in the server's env. Pass ``--official-env`` for an env
that has it; by default an env is made (in a temporary directory) that adds the test stand-in of
the official package (``tests/standin``, held against the official fixtures by
``tests/test_standin_slicegpt.py``) to the slicegpt env, and the table says so.

Writes ``bench/results/family_matrix.md`` and ``.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, atomic_write, env_python  # noqa: E402

from slicebridge import Bridge  # noqa: E402
from slicebridge.model.families import FAMILIES  # noqa: E402

CHECK = REPO / "tests" / "helpers" / "family_artifacts_check.py"
STANDIN = REPO / "tests" / "standin"
RESULTS = REPO / "bench" / "results"
NMSE_LIMIT = 1e-8  # fp32, against the official model's logits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default=str(REPO / ".envs" / "slicegpt"), help="the slicegpt env (prefix or python)")
    parser.add_argument("--official-env", help="an env with the slicegpt package (default: the env + the stand-in)")
    parser.add_argument("--fixtures", default=str(REPO.parent / "shared" / "fixtures"), help="official checkpoints")
    parser.add_argument("--out", default=str(RESULTS / "family_matrix"), help="output path without suffix")
    parser.add_argument("--only", choices=[family.key for family in FAMILIES], help="one family (a smoke run)")
    return parser.parse_args(argv)


def standin_official_env(env_python_path: Path, where: Path) -> Path:
    """A venv without packages of its own that sees the slicegpt env's packages and the stand-in slicegpt."""
    target = where / "slicegpt-official"
    subprocess.run([str(env_python_path), "-m", "venv", "--without-pip", str(target)], check=True)

    def purelib(python: Path) -> str:
        code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        return subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()

    Path(purelib(target / "bin" / "python"), "slicebridge-standin.pth").write_text(
        f"{purelib(env_python_path)}\n{STANDIN}\n"
    )
    return target


def load_paths(python: Path, fixture: Path, converted, exported) -> dict[str, Any]:
    """What ``family_artifacts_check.py`` reports for the artifacts, under ``python``."""
    done = subprocess.run(
        [str(python), str(CHECK), str(fixture / "reference.pt"), converted.output, exported.output],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{CHECK.name} failed under {python}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def worst(report: dict[str, Any], prefix: str) -> tuple[float, float, int]:
    """(worst fp32 NMSE, lowest top-1, number of load paths) over the load paths named ``prefix:*``."""
    entries = [entry for name, entry in report["loads"].items() if name.startswith(prefix)]
    metrics = [m for entry in entries for m in (entry["fp32"], entry["fp32_text"])]
    return max(m["nmse"] for m in metrics), min(m["top1"] for m in metrics), len(entries)


def measure(bridge: Bridge, loader: str, key: str, fixture: Path, pythons: dict[str, Path], work: Path) -> list[dict]:
    """The rows of one family and loader."""
    sliced = fixture / "sliced"
    converted = bridge.convert(sliced, work / f"{key}-{loader}.bin", loader=loader, overwrite=True)
    exported = bridge.export(sliced, work / f"{key}-{loader}-hf", loader=loader, overwrite=True)
    reports = {version: load_paths(python, fixture, converted, exported) for version, python in pythons.items()}
    common = {"family": key, "loader": loader, "official_name": converted.official_name or "-"}
    rows = []
    for operation, prefix in (("convert → .bin", "bin:"), ("export → directory", "export:")):
        row = {**common, "operation": operation}
        for version, report in reports.items():
            nmse, top1, paths = worst(report, prefix)
            row[f"nmse {version}"], row[f"top-1 {version}"] = nmse, top1
            row["result"] = f"{paths} load paths"
        rows.append(row)
    for kind, artifact in ((".bin", converted.output), ("export", exported.output)):
        verdict = bridge.verify(artifact, sliced, loader=loader)
        rows.append(
            {
                **common,
                "operation": f"verify {kind} ({verdict.compared_dtype})",
                "nmse 5.x": max(entry["nmse"] for entry in verdict.inputs),
                "top-1 5.x": min(entry["top1"] for entry in verdict.inputs),
                "passed": verdict.passed,
                "result": "PASS" if verdict.passed else "FAIL",
            }
        )
    shown = bridge.info(converted.output).family
    rows.append({**common, "operation": "info of the .bin", "shows": shown, "result": f"family {shown}"})
    return rows


def markdown(rows: list[dict], official_note: str) -> str:
    def cell(row: dict, name: str) -> str:
        value = row.get(name)
        if isinstance(value, float):
            return f"{value:.1e}" if "nmse" in name else f"{value:.0%}"
        return "-" if value is None else str(value)

    columns = [
        "family",
        "operation",
        "loader",
        "nmse 5.x",
        "top-1 5.x",
        "nmse 4.41",
        "top-1 4.41",
        "result",
        "official_name",
    ]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cell(row, name) for name in columns) + " |" for row in rows),
    ]
    return "\n".join([*lines, "", official_note, ""])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    python, _ = env_python(args.env)
    fixtures = Path(args.fixtures)
    keys = [args.only] if args.only else [family.key for family in FAMILIES]
    found = [(key, fixtures / f"slicegpt-{key}-tiny") for key in keys]
    found = [(key, path) for key, path in found if (path / "reference.pt").is_file()]
    if not found:
        print(f"no official fixtures under {fixtures}", file=sys.stderr)
        return 2
    pythons = {"5.x": Path(sys.executable), "4.41": python}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="slicebridge-families-") as tmp:
        work = Path(tmp)
        official = Path(args.official_env) if args.official_env else standin_official_env(python, work)
        note = (
            f"official loader: slicegpt in {official}"
            if args.official_env
            else "official loader: the test stand-in of slicegpt (tests/standin), held against the official fixtures"
        )
        for loader, env in (("builtin", args.env), ("official", str(official))):
            with Bridge(env=env, attach=False) as bridge:
                for key, fixture in found:
                    rows += measure(bridge, loader, key, fixture, pythons, work)
    text = markdown(rows, note)
    atomic_write(Path(f"{args.out}.md"), text)
    atomic_write(Path(f"{args.out}.json"), json.dumps({"rows": rows, "note": note}, indent=1, default=str))
    print(text)
    return 1 if any(map(failed, rows)) else 0


def failed(row: dict) -> bool:
    """A row that breaks the promise: fp32 NMSE over 1e-8 or a top-1 flip of a load path, a failed
    verification, or ``info`` not showing the family."""
    if "passed" in row:
        return not row["passed"]
    if "shows" in row:
        return row["shows"] != row["family"]
    return any(row[f"nmse {v}"] > NMSE_LIMIT or row[f"top-1 {v}"] < 1.0 for v in ("5.x", "4.41"))


if __name__ == "__main__":
    sys.exit(main())
