"""A pool of warm servers on one machine: one server per device, a batch spread over them.

    with client.pool(env="slicegpt", devices=["cuda:0", "cuda:1"]) as pool:
        results = pool.run([WorkItem(key=path, payload=path) for path in checkpoints], job)

Each member is a ``Bridge`` to a server of its own (started by the pool, never the env's detached
one), with its own warm cache. ``devices`` lists one device per member (``"cpu"`` twice is two CPU
servers) or is ``"all"``: every CUDA device the env's server sees, or one ``"cpu"`` if it sees none. A
member may be a device group, ``"cuda:0+cuda:1"`` (or ``["cuda:0", "cuda:1"]``): one server whose models
are spread over those devices (``model.placement``), for a model larger than one GPU.

``run`` gives each member a worker thread. An idle member takes the next item: one whose key it
holds warm (it ran an item with that key), else one whose key no other member holds warm, else the
first pending one. A job is ``job(bridge, device, payload)``, called with the member's bridge and
device; what it returns or raises is the item's result, in the order the items were given, and
``on_result`` sees each one as it ends, in the caller's thread. An error raised by the job fails its
item (it is the item's fault: no retry), except ``ServerDied``: the member's server died under the
item, so the item is retried once on another member (on the same one, restarted, if there is no
other) and then reported failed, while the member's bridge starts a fresh server and goes on. A
member whose server keeps dying takes no more items. Ctrl-C (or an error raised by ``on_result``)
kills the pool's servers, so that no work goes on behind the caller; the next ``run`` starts fresh ones.

On CPU, each server computes with its share of the cores (``launcher.thread_shares``: the CPU servers
split them); a user-set ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` is left to every server instead. On CPU a
sweep's numbers depend on the thread count, so a pool's files equal a one-server run's only at the same count.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from slicebridge.bridge.devices import device_parts, repeated_gpus
from slicebridge.bridge.envs import PythonEnv, find_env
from slicebridge.bridge.errors import ServerDied, ServerKeepsDying
from slicebridge.bridge.launcher import split_by_user, thread_shares, usable_cores
from slicebridge.client.bridge import Bridge, default_env
from slicebridge.errors import SlicebridgeError

log = logging.getLogger(__name__)

MAX_MEMBERS = 64
_WAIT_STEP_S = 0.1


class PoolError(SlicebridgeError):
    """A pool that cannot be made as asked, or an item no member was left to run."""


@dataclass
class WorkItem:
    key: str  # affinity: the model the item needs warm (e.g. the checkpoint's real path, or a slice's base dir)
    payload: Any  # what the job needs (picklable: plain data, paths as str)


@dataclass
class WorkResult:
    index: int  # the item's position in the list given
    value: Any = None  # what the job returned
    error: BaseException | None = None  # the error of its last attempt, if it failed
    member: str = ""  # who ran it (its last attempt): "cuda:1", "cpu#0", "node-x/cuda:0" ...
    attempts: int = 1
    seconds: float = 0.0  # its attempts together

    @property
    def ok(self) -> bool:
        return self.error is None


Job = Callable[[Bridge, str, Any], Any]  # (the member's bridge, the member's device, payload) -> value


@dataclass
class Member:
    """One device's server: its bridge, and the keys of the items it ran since its server started."""

    name: str
    device: str
    bridge: Bridge
    warm: set[str] = field(default_factory=set)
    retired: BaseException | None = None  # why it takes no more items (its server keeps dying)


def parse_devices(devices: str | Sequence[str | Sequence[str]]) -> list[str] | str:
    """``"all"``, or the devices as a list (a string is split at commas); a ``PoolError`` for a bad one. A member
    may be a device group, one model spread over its devices: ``"cuda:0+cuda:1"`` or ``["cuda:0", "cuda:1"]``."""
    if isinstance(devices, str):
        if devices.strip() == "all":
            return "all"
        devices = devices.split(",")
    groups = [device if isinstance(device, (list, tuple)) else str(device).split("+") for device in devices]
    listed = ["+".join(str(part).strip() for part in group) for group in groups]
    if not listed:
        raise PoolError("a pool needs at least one device (cpu, cuda:N or all)")
    bad = [device for device in listed if device_parts(device) is None]
    if bad:
        raise PoolError(
            f"{', '.join(map(repr, bad))}: a pool's devices are cpu, cuda or cuda:N, groups of cpu and cuda:N "
            "joined by + for a model spread over them (cuda:0+cuda:1), or all"
        )
    twice = [device for device in listed if repeated_gpus(device_parts(device))]
    if twice:
        raise PoolError(f"{', '.join(map(repr, twice))}: a device group names each of its GPUs once")
    if len(listed) > MAX_MEMBERS:
        raise PoolError(f"{len(listed)} devices: a pool has at most {MAX_MEMBERS} servers")
    return listed


def member_names(devices: list[str]) -> list[str]:
    """``cuda:1`` for a device named once; ``cpu#0``, ``cpu#1`` (and ``cuda:0#1`` ...) otherwise; a group is named
    as a device is (``cuda:0+cuda:1``; ``cpu+cpu#0``: a group on the host alone is numbered as ``cpu`` is)."""
    names = []
    for position, device in enumerate(devices):
        if set(device.split("+")) == {"cpu"} or devices.count(device) > 1:
            names.append(f"{device}#{devices[:position].count(device)}")
        else:
            names.append(device)
    return names


class Pool:
    """One warm server per device, each with its own cache; a batch spread over them."""

    def __init__(
        self,
        env: str | PythonEnv | None = None,
        devices: str | Sequence[str] = ("cpu",),
        *,
        debug_ops: bool = False,
    ):
        self.env_spec = env if env is not None else default_env()
        self.devices = parse_devices(devices)
        self.debug_ops = debug_ops
        self.members: list[Member] = []

    def __enter__(self) -> Pool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> Pool:
        """Start every member's server, all at once (idempotent); with ``"all"``, one first to ask for the GPUs."""
        if not self.members:
            self.members = self._make_members()
        try:
            _on_each(self.members, Bridge.start)
            for member in self.members:
                _check_device(member)
        except BaseException:
            self.close()
            raise
        return self

    def _make_members(self) -> list[Member]:
        env = self.env_spec if isinstance(self.env_spec, PythonEnv) else find_env(self.env_spec)
        devices, first = self.devices, None
        if devices == "all":
            first = Bridge(env, attach=False, debug_ops=self.debug_ops).start()
            found = len(first.server_hello.cuda_devices)
            if found > MAX_MEMBERS:
                first.close()
                raise PoolError(f"the env's server sees {found} CUDA devices: a pool has at most {MAX_MEMBERS}")
            devices = [f"cuda:{index}" for index in range(found)] or ["cpu"]
            log.info("devices=all: %s", ", ".join(devices))
        # Each server computes with its share of the cores (launcher.thread_shares), unless the user set the count.
        # The server that counted the GPUs keeps every core: a GPU server's CPU work is loading, copying and
        # saving, and starting it again (torch, transformers, CUDA) would cost more than its share saves.
        shares = [None] * len(devices) if split_by_user() else thread_shares(devices, usable_cores())
        bridges = [first] if first is not None else []
        bridges += [
            Bridge(env, attach=False, debug_ops=self.debug_ops, threads=share) for share in shares[len(bridges) :]
        ]
        named = zip(member_names(devices), devices, bridges, strict=True)
        return [Member(name, device, bridge) for name, device, bridge in named]

    def close(self) -> None:
        """Stop every member's server (a later ``start`` or ``run`` starts fresh ones)."""
        for member in self.members:
            member.warm.clear()
            member.retired = None
        _on_each(self.members, Bridge.close)

    def run(
        self, items: list[WorkItem], job: Job, on_result: Callable[[WorkResult], None] | None = None
    ) -> list[WorkResult]:
        """Run ``job`` on every item, spread over the members; one result per item, in the items' order."""
        items = list(items)
        self.start()
        batch = _Batch(self.members, items, job)
        threads = [
            threading.Thread(target=batch.work, args=(member,), name=f"slicebridge-pool-{member.name}", daemon=True)
            for member in self.members
        ]
        for thread in threads:
            thread.start()
        try:
            for _ in items:
                result = batch.next_result()
                if on_result is not None:
                    on_result(result)
        except BaseException:  # Ctrl-C, or on_result raised: no work goes on behind the caller
            batch.abort()
            for thread in threads:
                thread.join()
            self.close()  # the next run starts fresh servers
            raise
        for thread in threads:
            thread.join()
        return batch.results


class _Batch:
    """The state of one ``run``: what is pending, what is running, what each item came to."""

    def __init__(self, members: list[Member], items: list[WorkItem], job: Job):
        self.members, self.items, self.job = members, items, job
        self.pending = list(range(len(items)))
        self.running = 0
        self.avoid: dict[int, str] = {}  # an item whose member's server died under it -> that member
        self.attempts = [0] * len(items)
        self.seconds = [0.0] * len(items)
        self.results: list[WorkResult | None] = [None] * len(items)
        self.finished: queue.Queue[WorkResult] = queue.Queue()
        self.changed = threading.Condition()
        self.aborted = False

    def work(self, member: Member) -> None:
        """A member's worker thread: take an item, run it, until none is left for it."""
        while (index := self._take(member)) is not None:
            started = time.perf_counter()
            try:
                value, error = self.job(member.bridge, member.device, self.items[index].payload), None
            except Exception as exc:  # noqa: BLE001 - the item's result, handed to the caller
                value, error = None, exc
            self._done(member, index, value, error, time.perf_counter() - started)
            if isinstance(error, ServerDied) and not self.aborted:
                self._retire(member, error if isinstance(error, ServerKeepsDying) else _revive(member))

    def _take(self, member: Member) -> int | None:
        with self.changed:
            while not self.aborted and member.retired is None:
                index = self._choose(member)
                if index is not None:
                    self.pending.remove(index)
                    self.running += 1
                    member.warm.add(self.items[index].key)
                    return index
                if not self.pending and not self.running:
                    return None
                self.changed.wait()
            return None

    def _choose(self, member: Member) -> int | None:
        return choose_item(member, self.members, self.pending, self.avoid, self.items)

    def _done(self, member: Member, index: int, value: Any, error: BaseException | None, seconds: float) -> None:
        """Record an attempt: a result, or (its member's server died under it, first time) the item again."""
        with self.changed:
            self.running -= 1
            self.attempts[index] += 1
            self.seconds[index] += seconds
            died = isinstance(error, ServerDied)
            if died:
                member.warm.clear()  # a fresh server has an empty cache
            if died and self.attempts[index] == 1 and not self.aborted:
                log.warning("%s: its server died under item %d; retrying it once elsewhere", member.name, index)
                self.avoid[index] = member.name
                self.pending.insert(0, index)
            else:
                self._finish(WorkResult(index, value, error, member.name, self.attempts[index], self.seconds[index]))
            self.changed.notify_all()

    def _retire(self, member: Member, why: BaseException | None) -> None:
        """A member that got no fresh server takes no more items; if it was the last one, the pending items fail."""
        if why is None:
            return
        log.warning("%s: %s; it takes no more items", member.name, why)
        with self.changed:
            member.retired = why
            if all(other.retired is not None for other in self.members):
                self._fail_pending(why)
            self.changed.notify_all()

    def _finish(self, result: WorkResult) -> None:
        self.results[result.index] = result
        self.finished.put(result)

    def _fail_pending(self, why: BaseException) -> None:
        """No member is left: every pending item fails, saying why the last member stopped."""
        for index in self.pending:
            error = PoolError(f"no server of the pool was left to run it; the last one stopped: {why}")
            self._finish(WorkResult(index, None, error, "", self.attempts[index], self.seconds[index]))
        self.pending.clear()

    def next_result(self) -> WorkResult:
        """The next result to come in; waits in short steps, so that a Ctrl-C (or ``interrupt_main``) gets through."""
        while True:
            try:
                return self.finished.get(timeout=_WAIT_STEP_S)
            except queue.Empty:
                continue

    def abort(self) -> None:
        """Take no more items and kill the servers, so that the requests in flight end now."""
        with self.changed:
            self.aborted = True
            self.changed.notify_all()
        for member in self.members:
            server = member.bridge.server
            if server is not None and server.owned:
                server.kill()


def _revive(member: Member) -> BaseException | None:
    """Start a fresh server for a member whose server died (a hung one is killed first); why not, if it fails."""
    server = member.bridge.server
    if server is not None and server.owned and server.alive():
        server.kill()  # it stopped answering: the bridge starts a fresh one only for a dead one
    try:
        member.bridge.ping()
    except Exception as exc:  # noqa: BLE001 - the member is retired with it, said in the log and the results
        return exc
    return None


def _on_each(members: list[Member], call: Callable[[Bridge], Any]) -> None:
    """``call`` every member's bridge at once (servers start and stop in parallel); the first error, if any."""
    if not members:
        return
    with ThreadPoolExecutor(max_workers=len(members), thread_name_prefix="slicebridge-pool") as calling:
        futures = [calling.submit(call, member.bridge) for member in members]
    errors = [future.exception() for future in futures if future.exception() is not None]
    if errors:
        raise errors[0]


def _check_device(member: Member) -> None:
    """A ``cuda:N`` member, or a group naming ``cuda:N``, needs an N-th CUDA device in its server."""
    seen = member.bridge.server_hello.cuda_devices
    for device in member.device.split("+"):
        if not device.startswith("cuda"):
            continue
        if int(device.partition(":")[2] or 0) >= len(seen):
            which = f"{len(seen)} CUDA device{'s' * (len(seen) != 1)} ({', '.join(seen)}); name one of them"
            if not seen:
                which = "no CUDA devices; name cpu"
            named = device if device == member.device else f"{device} (of {member.device})"
            raise PoolError(f"{named}: the env's server sees {which}, or all")


def choose_item(member, members: list, pending, avoid: dict[int, str], items: list[WorkItem]) -> int | None:
    """The pending item ``member`` takes now: one whose model it holds warm, else one no other live member
    holds warm, else the first it may run (an item retried after a death avoids the member it died on while
    another is alive). Members have ``name``, ``warm`` (keys) and ``retired``; the local and the Ray pool share it."""
    others = [other for other in members if other is not member and other.retired is None]
    mine = [index for index in pending if avoid.get(index) != member.name or not others]
    held_elsewhere = {key for other in others for key in other.warm}
    for wanted in (
        lambda index: items[index].key in member.warm,
        lambda index: items[index].key not in held_elsewhere,
        lambda index: True,
    ):
        for index in mine:
            if wanted(index):
                return index
    return None
