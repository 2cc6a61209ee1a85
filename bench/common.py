"""Shared helpers of the benchmarks: statistics, rows, processes, memory, files.

Every benchmark module has ``NAME`` and ``run(ctx) -> list[Row]``. A row is one line of the
results table: what was measured, the baseline measured in the same run, their ratio (median
and the spread of the per-repeat ratios), the target and whether it is met, plus absolute numbers
and, where the target is missed, a breakdown of what the time or memory went to.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
MB = 1024**2
GB = 1024**3
DISK_CHUNK = 64 * MB  # the disk bound writes in pieces of this size


# ------------------------------------------------------------------------------ statistics


def summary(samples: list[float]) -> dict[str, Any]:
    """Median, min, max, quartiles and the samples themselves."""
    xs = sorted(float(x) for x in samples)
    if not xs:
        return {"n": 0}
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {
        "n": len(xs),
        "median": statistics.median(xs),
        "min": xs[0],
        "max": xs[-1],
        "q1": q1,
        "q3": q3,
        "samples": [float(x) for x in samples],
    }


def percentile(xs: list[float], p: float) -> float:
    """The p-th percentile (0..100) by linear interpolation."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ratio_summary(subject: list[float], baseline: list[float], invert: bool = False) -> dict[str, Any]:
    """subject/baseline (or baseline/subject when ``invert``): of the medians, and the spread of the
    per-repeat ratios (repeats are paired: baseline and subject are measured alternately)."""
    ms, mb = statistics.median(subject), statistics.median(baseline)
    value = mb / ms if invert else ms / mb
    pairs = [(b / s if invert else s / b) for s, b in zip(subject, baseline, strict=False) if s > 0 and b > 0]
    return {
        "value": value,
        "min": min(pairs) if pairs else value,
        "max": max(pairs) if pairs else value,
        "pairs": pairs,
    }


# ------------------------------------------------------------------------------ rows


@dataclass
class Row:
    bench: str  # the benchmark module that made it (--only NAME)
    name: str  # unique row id
    what: str
    baseline: str  # what the baseline does
    unit: str  # unit of subject/baseline_measured
    subject: dict  # summary() of the measured thing
    baseline_measured: dict  # summary() of the baseline
    ratio: dict  # ratio_summary() + "definition"
    target: dict  # {"text", "metric", "op", "value"}; op None: report only
    met: bool | None = None
    absolute: dict = field(default_factory=dict)  # other absolute numbers worth reporting
    breakdown: dict = field(default_factory=dict)  # where the time / memory went
    analysis: list = field(default_factory=list)  # sentences: what bounds it, what would move it
    notes: list = field(default_factory=list)
    bound: dict = field(default_factory=dict)  # the physical bound, from against_bound(); empty: none stated

    def against_bound(
        self,
        what: str,
        samples: list[float],
        target: dict,
        definition: str = "measured / bound",
        invert: bool = False,
        **values: float,
    ) -> Row:
        """State the bound: what the machine allows for this row's work, measured in the same run (``samples``,
        in the row's unit, paired with the subject's repeats). ``target`` is ``{"text", "conditions": [{"metric",
        "op", "value"}, ...]}`` over ``ratio`` (the subject's ratio to the bound) and the named ``values``
        (e.g. ``p99_ratio=...``); no conditions: report only. ``judge()`` then says whether it is met."""
        ratio = ratio_summary(self.subject["samples"], samples, invert=invert)
        ratio["definition"] = definition
        self.bound = {"what": what, "measured": summary(samples), "ratio": ratio, "values": values, "target": target}
        return self

    def judge(self) -> Row:
        op, value = self.target.get("op"), self.target.get("value")
        metric = self.target.get("metric", "ratio")
        self.met = (
            None
            if op is None
            else _holds(self.ratio["value"] if metric == "ratio" else self.absolute[metric], op, value)
        )
        if self.bound:
            measured = {"ratio": self.bound["ratio"]["value"], **self.bound["values"]}
            conditions = self.bound["target"].get("conditions", [])
            verdicts = [_holds(measured[c["metric"]], c["op"], c["value"]) for c in conditions]
            self.bound["met"] = all(verdicts) if verdicts else None
        return self

    def as_dict(self) -> dict:
        return asdict(self)


def _holds(measured: float, op: str, value: float) -> bool:
    return bool(measured <= value) if op == "<=" else bool(measured >= value)


# ------------------------------------------------------------------------------ context


@dataclass
class Context:
    env_python: Path  # the slicegpt env's interpreter
    env_prefix: Path
    smoke: bool
    repeats: int | None  # None: each benchmark's default
    cache_dir: Path  # made models (reused between runs)
    work_dir: Path  # scratch outputs of this run (removed at the end)
    results_dir: Path = BENCH_DIR / "results"  # where results.{json,md} and figures go (--results-dir)
    log: Callable[[str], None] = print
    profile: bool = False  # run py-spy where available
    _bridge: Any = None

    def bridge(self):
        """The run's shared warm bridge (an owned ipc server, started on first use)."""
        if self._bridge is None:
            from slicebridge import Bridge

            self._bridge = Bridge(env=str(self.env_prefix), attach=False).start()
        return self._bridge

    def close(self) -> None:
        if self._bridge is not None:
            self._bridge.close()
            self._bridge = None

    def reps(self, default: int, smoke: int = 2) -> int:
        if self.repeats is not None:
            return max(1, self.repeats)
        return smoke if self.smoke else default

    @property
    def big_preset(self) -> str:
        return "tiny" if self.smoke else "1b"

    def scratch(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.work_dir))
        return path


# ------------------------------------------------------------------------------ processes, memory


def env_python(env: str | os.PathLike) -> tuple[Path, Path]:
    """(python, prefix) of an env given as a prefix dir or a python executable."""
    path = Path(env).expanduser().absolute()
    if path.is_dir():
        return path / "bin" / "python", path
    return path, path.parent.parent


def run_python(
    python: Path, code: str, *args: str, timeout: float = 900, check: bool = True, isolated: bool = True
) -> tuple[float, str]:
    """Run ``code`` in a fresh process of ``python``; (wall seconds, stdout)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    cmd = [str(python), *(["-I"] if isolated else []), "-c", code, *args]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    seconds = time.perf_counter() - started
    if check and proc.returncode != 0:
        raise RuntimeError(f"{python} -c ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout


def last_json(stdout: str) -> dict:
    """The last line of a child's stdout, as JSON."""
    return json.loads(stdout.strip().splitlines()[-1])


def proc_status(pid: int) -> dict[str, int]:
    """Memory lines of /proc/<pid>/status, in bytes (VmRSS, VmHWM, RssAnon, RssFile, RssShmem)."""
    values = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmSize"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def drop_file(path: Path) -> None:
    if path.is_dir():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def dir_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def disk_bound(sources: list[Path], target: Path) -> dict[str, float]:
    """Write the bytes of ``sources`` (one after the other) into a new file ``target`` with one stream of
    ``os.write``, then fsync it once; remove it. Returns {"write", "fsync", "seconds"} (write + fsync).

    The sources are mapped read-only, so the write takes their bytes straight from the page cache, with no
    copy in this process. (Populating the mappings beforehand, MAP_POPULATE, made the write twice as slow
    on this VM, not faster.)
    """
    with contextlib.ExitStack() as stack:
        views = []
        for source in sources:
            if source.stat().st_size:
                handle = stack.enter_context(open(source, "rb"))
                mapped = stack.enter_context(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
                views.append(stack.enter_context(memoryview(mapped)))
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            started = time.perf_counter()
            for view in views:
                for offset in range(0, len(view), DISK_CHUNK):
                    with view[offset : offset + DISK_CHUNK] as piece:
                        done = 0
                        while done < len(piece):
                            done += os.write(fd, piece[done:])
            written = time.perf_counter()
            os.fsync(fd)
            done_at = time.perf_counter()
        finally:
            os.close(fd)
            target.unlink(missing_ok=True)
    return {"write": written - started, "fsync": done_at - written, "seconds": done_at - started}


def read_through(path: Path) -> float:
    """Read a file once (puts it in the page cache, like the warm state both sides then share)."""
    started = time.perf_counter()
    with open(path, "rb") as fh:
        while fh.read(64 * MB):
            pass
    return time.perf_counter() - started


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def fmt_seconds(s: float) -> str:
    if s != s:  # NaN
        return "nan"
    if abs(s) < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if abs(s) < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_value(value: float, unit: str) -> str:
    if unit == "s":
        return fmt_seconds(value)
    if unit == "B":
        return f"{value / MB:,.0f} MB"
    if unit == "B/s":
        return f"{value / GB:.2f} GB/s"
    return f"{value:.3g} {unit}"


def fmt_summary(s: dict, unit: str) -> str:
    if not s or not s.get("n"):
        return "-"
    if s["n"] == 1:
        return fmt_value(s["median"], unit)
    return f"{fmt_value(s['median'], unit)} [{fmt_value(s['min'], unit)}–{fmt_value(s['max'], unit)}]"


def python_info() -> dict:
    return {"python": sys.version.split()[0], "executable": sys.executable}


# ------------------------------------------------------------------------------ profiling (py-spy)


def pyspy_path() -> str | None:
    """py-spy, if installed: ``$SLICEBRIDGE_BENCH_PYSPY``, on PATH, or next to this interpreter (not a
    requirement: ``pip install --target /tmp/pyspy py-spy`` and point the variable at its bin/py-spy)."""
    import shutil

    candidates = [
        os.environ.get("SLICEBRIDGE_BENCH_PYSPY"),
        shutil.which("py-spy"),
        str(Path(sys.executable).parent / "py-spy"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class PySpy:
    """Sample a process with ``py-spy record`` (raw collapsed stacks) while the block runs.

    ``top()`` then gives the functions with the most samples, self and inclusive (per cent of the
    samples), line numbers folded away. Does nothing when py-spy is not available.
    """

    def __init__(self, pid: int, out: Path, rate: int = 500, native: bool = False):
        self.pid, self.out, self.rate, self.native = pid, Path(out), rate, native
        self.proc = None
        self.binary = pyspy_path()

    def __enter__(self) -> PySpy:
        if self.binary:
            cmd = [
                self.binary,
                "record",
                "--pid",
                str(self.pid),
                "--format",
                "raw",
                "--output",
                str(self.out),
                "--rate",
                str(self.rate),
                "--nonblocking",
                "--threads",
                "--idle",
            ]
            if self.native:
                cmd.append("--native")
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)  # let it attach
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            import signal

            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def top(self, n: int = 12, thread: str | None = None) -> dict:
        """{"samples", "self": [[frame, pct]...], "inclusive": [[frame, pct]...]}."""
        import collections
        import re

        if not self.out.is_file():
            return {}
        selfs: collections.Counter = collections.Counter()
        incl: collections.Counter = collections.Counter()
        total = 0
        for line in self.out.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            if thread is not None and not any(thread in f for f in frames[:1]):
                continue
            frames = [re.sub(r":\d+\)$", ")", f) for f in frames[1:]]  # drop the thread frame and lines
            if not frames:
                continue
            c = int(count)
            total += c
            selfs[frames[-1]] += c
            for f in set(frames):
                incl[f] += c
        if not total:
            return {"samples": 0}
        pct = lambda counter: [[f, round(100.0 * c / total, 1)] for f, c in counter.most_common(n)]  # noqa: E731
        return {"samples": total, "self": pct(selfs), "inclusive": pct(incl)}


def proc_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far, all its threads (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class CpuDelta:
    """User and system CPU seconds a process spends while the block runs."""

    def __init__(self, pid: int):
        self.pid = pid
        self.user = self.system = 0.0

    def __enter__(self) -> CpuDelta:
        self._start = proc_cpu(self.pid)
        return self

    def __exit__(self, *exc) -> None:
        end = proc_cpu(self.pid)
        self.user, self.system = end[0] - self._start[0], end[1] - self._start[1]


def ratio_of_minimums(subject: list[float], baseline: list[float], invert: bool = False) -> float:
    """The ratio of the best runs: stalls from the shared machine only ever add time, so the minimums
    are the least disturbed estimate of each side's own cost."""
    return min(baseline) / min(subject) if invert else min(subject) / min(baseline)


_IDLE_FRAMES = (
    "Poller.poll",
    "Socket.poll",
    "Condition.wait",
    "Event.wait",
    "GarbageCollectorThread.run",
    "time.sleep",
    "select",
    "Thread.join",
    "PySpy.",
)


def busy_frames(profile: dict, n: int = 6, kind: str = "self") -> str:
    """The top frames of a PySpy.top() result, waiting frames left out, as 'frame pct%; ...'."""
    frames = [(f, p) for f, p in profile.get(kind, []) if not any(idle in f for idle in _IDLE_FRAMES)]
    idle = sum(p for f, p in profile.get(kind, []) if any(i in f for i in _IDLE_FRAMES)) if kind == "self" else 0
    text = "; ".join(f"{f} {p}%" for f, p in frames[:n])
    return text + (f" (waiting frames, left out: {idle:.0f}%)" if idle else "")
