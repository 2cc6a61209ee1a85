"""A pool of warm servers across the nodes of a Ray cluster: ``client.pool``'s surface, Ray's machines.

    with RayPool(env="slicegpt", address="auto") as pool:
        results = pool.run([WorkItem(key=ckpt, payload={"inputs": [ckpt], ...}) for ckpt in checkpoints], job)

Each member is a Ray actor pinned to one node: one per GPU of a GPU node (``num_gpus=1``: Ray gives it
that GPU alone, so its device is ``cuda:0`` and its name ``host/cuda:N``), or ``devices_per_node`` of
them (default 1) on a node without GPUs (``host/cpu#N``); ``devices_per_node`` also caps the GPUs used
per node. An actor holds a ``Bridge`` to a server of its own on its node, in the env that ``env``
names there (``find_env`` resolves it on each node: a conda env name may be another prefix on each),
and its server gets the actor's share of the node's CPUs as its thread count (``Bridge(threads=...)``).
Ray is needed in the base env only, on every node (``pip install 'slicebridge[ray]'``); the slicegpt env
needs nothing new.

``address`` is a Ray address (``"auto"``: the cluster Ray finds, as ``ray.init`` does) or ``"local"``:
a private single-node Ray instance that the pool starts and shuts down with itself. A process that
is already connected to Ray keeps its connection, and the pool leaves it open.

Scheduling is the local pool's: an idle member takes an item whose key it holds warm, else one whose
key no other member holds warm, else the first pending one; results come back in the items' order,
and ``on_result`` sees each as it ends. A job's error fails its item, except ``ServerDied``: the item
is retried once on another member. An actor that dies (killed, or its node lost) is a ``ServerDied``
of its in-flight item, and takes no more. Ctrl-C kills the actors; the next ``run`` starts fresh ones.

The job, ``job(bridge, device, payload)``, is sent to the nodes by Ray's pickler: pass a module-level
function of a module that every node can import (slicebridge's own, or a package of yours installed
there), and picklable payloads. Inputs and outputs are paths on storage that every node shares, at
the same path: before running an item an actor checks that the paths in ``payload["inputs"]`` (a
mapping's key, if it has one) are there on its node, and fails the item naming the node if not.
Errors come back as themselves, with their types: one that pickling would not carry as itself (a
``RemoteError``, an error whose ``__init__`` takes other arguments) is sent in parts and made again
on the caller's side; only one that cannot be made again arrives as a ``SlicebridgeError`` naming it.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from slicebridge.bridge.envs import PythonEnv
from slicebridge.bridge.errors import RemoteError, ServerDied, ServerKeepsDying, remote_error
from slicebridge.client.bridge import Bridge, default_env
from slicebridge.client.pool import Job, PoolError, WorkItem, WorkResult, choose_item
from slicebridge.errors import InputNotFound, SlicebridgeError

log = logging.getLogger(__name__)

_START_TIMEOUT_S = 300.0  # for every actor to be placed on its node and to have its server ready
_CLOSE_TIMEOUT_S = 30.0


class RayUnavailable(PoolError):
    """Ray is not installed in this env, or the Ray cluster named cannot be reached."""


def ray_module():
    """The ``ray`` module, imported on first use: importing slicebridge never imports it."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(
            "Ray is not installed in this env: install it with `pip install 'slicebridge[ray]'` "
            "(in the base env of every node)"
        ) from None
    return ray


# ---------------------------------------------------------------------- errors that cross the cluster


@dataclass(frozen=True)
class CarriedError:
    """An error that pickling would not carry as itself (its ``__init__`` takes other arguments than its
    message, or its class is made at run time): its parts, made into the same error by the caller."""

    error_type: str
    message: str
    remote_traceback: str = ""
    remote: bool = False  # a RemoteError: made again by ``remote_error``, as the caller's own bridge makes it
    local_type: type[BaseException] | None = None  # else its class (pickled by name), made without __init__ ...
    args: tuple = ()
    state: dict = field(default_factory=dict)  # ... from its args and attributes

    def rebuild(self) -> BaseException:
        if self.remote:
            return remote_error(self.error_type, self.message, self.remote_traceback)
        if self.local_type is not None:
            error = self.local_type.__new__(self.local_type, *self.args)
            error.__dict__.update(self.state)
            return error
        return SlicebridgeError(f"{self.error_type}: {self.message}")


def portable(error: BaseException | None) -> BaseException | CarriedError | None:
    """What to send for ``error`` so that the same type with the same message arrives: the error itself,
    or its ``CarriedError``; a ``SlicebridgeError`` naming its type and message if nothing else does."""
    if error is None or _comes_through(error, error):
        return error
    name, message = type(error).__name__, str(error)
    if isinstance(error, RemoteError):
        return CarriedError(error.error_type, error.remote_message, error.remote_traceback, remote=True)
    carried = CarriedError(name, message, local_type=type(error), args=error.args, state=dict(vars(error)))
    return carried if _comes_through(carried, error) else CarriedError(name, message)


def arrived(error: BaseException | CarriedError | None) -> BaseException | None:
    """The error that ``portable`` sent, as the caller raises it."""
    return error.rebuild() if isinstance(error, CarriedError) else error


def _comes_through(sent: BaseException | CarriedError, error: BaseException) -> bool:
    try:
        copy = arrived(pickle.loads(pickle.dumps(sent)))
    except Exception:  # noqa: BLE001 - any failure to pickle, unpickle or rebuild means no
        return False
    return type(copy) is type(error) and str(copy) == str(error)


# ---------------------------------------------------------------------- on the nodes


def check_inputs(payload: Any, node: str) -> None:
    """``InputNotFound`` naming ``node`` for the first path of ``payload["inputs"]`` that is not there."""
    inputs = payload.get("inputs", ()) if isinstance(payload, Mapping) else ()
    for path in map(os.fspath, inputs):
        if not os.path.exists(path):
            relative = "" if os.path.isabs(path) else " (a relative path: pass absolute ones)"
            raise InputNotFound(
                f"the input {path} is not there on the Ray node {node}{relative}: inputs and outputs must be "
                "on storage that every node of the cluster shares, at the same path"
            )


class MemberActor:
    """A member on its node, made a Ray actor by the pool: a server of its own, and the jobs sent to it.

    Its methods return errors (made ``portable``) instead of raising them, so that they arrive as
    their own types rather than as Ray's wrappers.
    """

    def __init__(self, env_spec: str, node: str, index: int, threads: int, debug_ops: bool):
        self.node, self.index = node, index
        self.bridge = Bridge(env_spec, attach=False, debug_ops=debug_ops, threads=threads)
        self.device = "cpu"

    def start(self) -> tuple[str, str, int, BaseException | CarriedError | None]:
        """Start the server (the env found on this node): (member name, device, actor pid, error)."""
        import ray

        gpus = ray.get_gpu_ids()
        self.device = "cuda:0" if gpus else "cpu"  # Ray shows the actor its GPU alone
        name = f"{self.node}/cuda:{gpus[0]}" if gpus else f"{self.node}/cpu#{self.index}"
        try:
            self.bridge.start()
            if gpus and not self.bridge.server_hello.cuda_devices:
                raise PoolError(
                    f"{name}: Ray gave this actor GPU {gpus[0]}, but the env's server on {self.node} sees no "
                    "CUDA device (a CPU build of torch there?)"
                )
        except Exception as exc:  # noqa: BLE001 - handed to the caller, who leaves this member out
            return name, self.device, os.getpid(), portable(exc)
        return name, self.device, os.getpid(), None

    def run(self, job: Job, payload: Any) -> tuple[Any, BaseException | CarriedError | None, Any]:
        """Run one item: (value, error, why this member takes no more items or None)."""
        try:
            check_inputs(payload, self.node)
            return job(self.bridge, self.device, payload), None, None
        except ServerKeepsDying as exc:
            return None, portable(exc), portable(exc)
        except ServerDied as exc:
            return None, portable(exc), portable(self._fresh_server())
        except Exception as exc:  # noqa: BLE001 - the item's result, handed to the caller
            return None, portable(exc), None

    def _fresh_server(self) -> Exception | None:
        """Start a fresh server after a death (a hung one is killed first); why not, if it fails."""
        server = self.bridge.server
        if server is not None and server.owned and server.alive():
            server.kill()  # it stopped answering: the bridge starts a fresh one only for a dead one
        try:
            self.bridge.ping()
        except Exception as exc:  # noqa: BLE001 - the member is retired with it
            return exc
        return None

    def close(self) -> None:
        self.bridge.close()


# ---------------------------------------------------------------------- on the caller's side


@dataclass(frozen=True)
class MemberPlan:
    """Where one member goes: its node (Ray's id, and a name for people), and what it gets there."""

    node_id: str
    node: str
    index: int  # among the node's members
    gpu: bool
    threads: int  # its share of the node's CPUs


def plan_members(nodes: list[dict], devices_per_node: int | None = None) -> list[MemberPlan]:
    """One member per GPU of each alive node (at most ``devices_per_node``), else ``devices_per_node``
    (default 1) per node with CPUs; a node with neither (a head started with ``--num-cpus 0``) gets none."""
    if devices_per_node is not None and (not isinstance(devices_per_node, int) or devices_per_node < 1):
        raise PoolError(f"devices_per_node is {devices_per_node!r}: a number of members, at least 1")
    alive = [node for node in nodes if node.get("Alive")]
    hostnames = [node.get("NodeManagerHostname") or node.get("NodeManagerAddress", "") for node in alive]
    plans = []
    for node, hostname in zip(alive, hostnames, strict=True):
        resources = node.get("Resources", {})
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        count = min(gpus, devices_per_node or gpus) if gpus else (devices_per_node or 1) if cpus else 0
        label = hostname if hostnames.count(hostname) == 1 else f"{hostname}:{node['NodeID'][:8]}"
        threads = max(1, cpus // count) if count else 1
        plans += [MemberPlan(node["NodeID"], label, index, bool(gpus), threads) for index in range(count)]
    if not plans:
        raise PoolError("the Ray cluster has no alive node with a GPU or a CPU to run a member on")
    return plans


@dataclass
class RayMember:
    """A started actor, as the caller sees it."""

    name: str
    node: str
    device: str
    actor: Any  # its Ray actor handle
    pid: int  # the actor's process, on its node
    warm: set[str] = field(default_factory=set)  # keys of the items it ran since its server started
    retired: BaseException | None = None  # why it takes no more items
    busy: bool = False


class RayPool:
    """Warm servers on the nodes of a Ray cluster, one per GPU (or per ``devices_per_node`` on CPU nodes)."""

    def __init__(
        self,
        env: str | os.PathLike | PythonEnv | None = None,
        address: str = "auto",
        devices_per_node: int | None = None,
        *,
        debug_ops: bool = False,
    ):
        self.env_spec = _node_spec(env)
        self.address = address
        self.devices_per_node = devices_per_node
        self.debug_ops = debug_ops
        self.members: list[RayMember] = []
        self._connected = False  # this pool called ray.init, so it calls ray.shutdown
        self.temp_dir: str | None = None  # the private instance's Ray dir (address="local"), removed on close

    def __enter__(self) -> RayPool:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> RayPool:
        """Connect (or start the private instance) and start every member's actor and server (idempotent)."""
        if self.members:
            return self
        ray = ray_module()
        self._connect(ray)
        try:
            self.members = self._start_members(ray)
        except BaseException:
            self.close()
            raise
        log.info("Ray pool of %d: %s", len(self.members), ", ".join(member.name for member in self.members))
        return self

    def _connect(self, ray) -> None:
        if ray.is_initialized():
            return  # the caller's own connection: used, and left open
        quiet = dict(logging_level=logging.WARNING, log_to_driver=False)
        try:
            if self.address == "local":
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a private instance reports nothing
                self.temp_dir = tempfile.mkdtemp(prefix="slicebridge-ray-")
                ray.init(address="local", include_dashboard=False, _temp_dir=self.temp_dir, **quiet)
            else:
                ray.init(address=self.address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            self.close()
            raise RayUnavailable(f"could not reach a Ray cluster at {self.address!r}: {exc}") from None
        self._connected = True

    def _start_members(self, ray) -> list[RayMember]:
        """Every planned actor, started at once; one that fails is left out (said in the log); if none starts,
        a ``PoolError`` naming each one's failure."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        actor_class = ray.remote(MemberActor)
        plans = plan_members(ray.nodes(), self.devices_per_node)
        actors = [
            actor_class.options(
                num_cpus=0,  # it waits on its server; the server's threads are set apart (MemberActor)
                num_gpus=1 if plan.gpu else 0,
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(plan.node_id, soft=False),
            ).remote(self.env_spec, plan.node, plan.index, plan.threads, self.debug_ops)
            for plan in plans
        ]
        starts = [actor.start.remote() for actor in actors]
        ready, _ = ray.wait(starts, num_returns=len(starts), timeout=_START_TIMEOUT_S)
        members, failures = [], []
        for plan, actor, start in zip(plans, actors, starts, strict=True):
            try:
                name, device, pid, error = ray.get(start) if start in ready else (plan.node, "", 0, _unplaced())
            except ray.exceptions.RayError as exc:
                name, device, pid, error = plan.node, "", 0, PoolError(_first_line(exc))
            if error is None:
                members.append(RayMember(name, plan.node, device, actor, pid))
            else:
                failures.append(f"{name}: {_first_line(arrived(error))}")
                ray.kill(actor)
        for failure in failures:
            log.warning("a Ray pool member did not start and is left out: %s", failure)
        if not members:
            raise PoolError(f"no member of the Ray pool started: {'; '.join(failures)}")
        return members

    def close(self) -> None:
        """Stop every member's server and actor; disconnect from Ray if the pool connected (a later ``start``
        or ``run`` starts afresh). The private instance of ``address="local"`` shuts down with it."""
        members, self.members = self.members, []
        if members:
            ray = ray_module()
            closing = [member.actor.close.remote() for member in members]
            ray.wait(closing, num_returns=len(closing), timeout=_CLOSE_TIMEOUT_S)
            _kill(ray, members)
        if self._connected:
            ray_module().shutdown()
            self._connected = False
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def run(
        self, items: list[WorkItem], job: Job, on_result: Callable[[WorkResult], None] | None = None
    ) -> list[WorkResult]:
        """Run ``job`` on every item, spread over the members; one result per item, in the items' order."""
        self.start()
        ray = ray_module()
        try:
            job_ref = ray.put(job)
        except Exception as exc:  # noqa: BLE001 - any pickling failure: said in a sentence
            name = getattr(job, "__qualname__", type(job).__name__)
            raise PoolError(
                f"the job {name} cannot be sent to the Ray nodes ({_first_line(exc.__cause__ or exc)}): pass a "
                "module-level function of a module that every node can import"
            ) from None
        batch = _RayBatch(ray, self.members, list(items), job_ref, on_result)
        try:
            return batch.run()
        except BaseException:  # Ctrl-C, or on_result raised: no work goes on behind the caller
            _kill(ray, self.members)
            self.members = []
            raise


class _RayBatch:
    """The state of one ``run``: what is pending, what each member is running, what each item came to."""

    def __init__(
        self,
        ray,
        members: list[RayMember],
        items: list[WorkItem],
        job_ref: Any,
        on_result: Callable[[WorkResult], None] | None,
    ):
        self.ray, self.members, self.items, self.job_ref, self.on_result = ray, members, items, job_ref, on_result
        self.pending = list(range(len(items)))
        self.running: dict[Any, tuple[RayMember, int, float]] = {}  # Ray's reference -> (member, item, sent at)
        self.avoid: dict[int, str] = {}  # an item whose member died under it -> that member
        self.attempts = [0] * len(items)
        self.seconds = [0.0] * len(items)
        self.results: list[WorkResult | None] = [None] * len(items)
        self.last_retired: BaseException | None = None  # why the member retired last stopped

    def run(self) -> list[WorkResult]:
        while self.pending or self.running:
            for member in self.members:
                index = None if member.busy or member.retired is not None else self._choose(member)
                if index is not None:
                    self._send(member, index)
            if not self.running:  # every member is retired
                self._fail_pending()
                break
            [done], _ = self.ray.wait(list(self.running), num_returns=1)
            self._collect(done)
        return self.results

    def _choose(self, member: RayMember) -> int | None:
        return choose_item(member, self.members, self.pending, self.avoid, self.items)

    def _send(self, member: RayMember, index: int) -> None:
        self.pending.remove(index)
        member.busy = True
        member.warm.add(self.items[index].key)
        reference = member.actor.run.remote(self.job_ref, self.items[index].payload)
        self.running[reference] = (member, index, time.perf_counter())

    def _collect(self, reference: Any) -> None:
        """Record an attempt: a result, or (its member's server or actor died under it, first time) the item again."""
        member, index, sent = self.running.pop(reference)
        member.busy = False
        try:
            value, error, retired = self.ray.get(reference)
            error, retired = arrived(error), arrived(retired)
        except self.ray.exceptions.RayActorError as exc:
            value, error = None, ServerDied(f"the Ray actor of {member.name} died: {_first_line(exc)}")
            retired = error
        except self.ray.exceptions.RayError as exc:  # the job could not be unpickled there, say
            why = _first_line(getattr(exc, "cause", None) or exc)
            value, error, retired = None, PoolError(f"{member.name} could not run the job: {why}"), None
        self.attempts[index] += 1
        self.seconds[index] += time.perf_counter() - sent
        if retired is not None:
            log.warning("%s: %s; it takes no more items", member.name, _first_line(retired))
            member.retired = self.last_retired = retired
        if isinstance(error, ServerDied):
            member.warm.clear()  # a fresh server (or none) has an empty cache
            if self.attempts[index] == 1:
                log.warning("%s: its server died under item %d; retrying it once elsewhere", member.name, index)
                self.avoid[index] = member.name
                self.pending.insert(0, index)
                return
        self._finish(WorkResult(index, value, error, member.name, self.attempts[index], self.seconds[index]))

    def _finish(self, result: WorkResult) -> None:
        self.results[result.index] = result
        if self.on_result is not None:
            self.on_result(result)

    def _fail_pending(self) -> None:
        """No member is left: every pending item fails, saying why the last one stopped."""
        for index in self.pending:
            error = PoolError(
                f"no member of the Ray pool was left to run it; the last one stopped: {self.last_retired}"
            )
            self._finish(WorkResult(index, None, error, "", self.attempts[index], self.seconds[index]))
        self.pending.clear()


def _node_spec(env: str | os.PathLike | PythonEnv | None) -> str:
    """The env spec each node resolves: as given (a conda env name, an absolute path), a relative path made absolute."""
    spec = env.spec if isinstance(env, PythonEnv) else os.fspath(env) if env is not None else default_env()
    relative_path = not os.path.isabs(spec) and (os.sep in spec or spec.startswith("."))
    return os.path.abspath(spec) if relative_path else spec


def _unplaced() -> PoolError:
    return PoolError(
        f"not placed on its node within {_START_TIMEOUT_S:.0f} s (its GPU or the node taken by other Ray work?)"
    )


def _kill(ray, members: list[RayMember]) -> None:
    """End the members' actors (their servers exit with their owner)."""
    for member in members:
        ray.kill(member.actor)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
