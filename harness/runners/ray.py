"""The ``ray`` runner: the cases of a run fanned out over a Ray cluster (``harness run --runner ray``).

Each worker is a Ray actor that loads the model once, from the plugins installed on its node (a plugin
registered only in the driver process is unknown to it), and segments the cases sent to it with the
same code as the native runner (:func:`harness.runners.case.timed_segment`). No shared filesystem is
assumed: the driver reads each case file and ships its bytes through Ray's object store; the worker
writes them to a private temporary file, loads the case from it and deletes it
(``shared_data``: the workers read the driver's path instead, for clusters that mount the data on every
node). Only the segs come back; the driver checks, saves and scores them and builds the record exactly
as the native runner does, plus ``node`` (the Ray node id and hostname the case ran on).

Timing mode ``distributed``: a case's ``seconds`` is its segmentation on a worker, measured as the
native runner measures it, but a worker may share its node's CPUs, memory bandwidth and caches with
other workers, so the figures are not comparable with the in-process ones. ``exclusive``: one worker per
node, holding all of that node's CPUs, so that a node segments one case at a time; its records are
timed ``in-process`` (per node, with the node named).

A worker that dies mid-case (killed, out of memory, its node lost) is replaced by a new actor and its
case is retried once on another worker; a second death is recorded as an error naming the node(s), and
the run goes on. A model that cannot load in a worker fails the entry as it would natively.

``--timeout S`` (``RunConfig.timeout``): a case still running S seconds after it became its worker's
current case (as the driver sees it: when it was sent to an idle worker, or when the worker's previous
case came back) is an error naming the limit, not retried; its worker is killed and replaced, and the
cases queued behind it go to other workers. The model's load in a worker is not bounded.

Options (``RunConfig.runner_options["ray"]``, filled by the ``--ray-*`` flags): ``address`` (None:
start a local instance on 127.0.0.1, shut down when the run ends; ``"auto"`` or ``"HOST:PORT"``: join
that cluster, disconnect at the end), ``workers`` (default: as many as the cluster's CPUs allow),
``cpus_per_worker`` (default 1), ``gpus_per_worker`` (default 0), ``exclusive``, ``shared_data``.

``ray`` is imported only inside functions: the harness imports and runs without Ray installed.
"""
from __future__ import annotations

import collections
import dataclasses
import importlib.util
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import numpy as np

from harness.cases import load_case
from harness.choices import entry_name, variant_tags
from harness.results import update_models
from harness.runners.base import Runner, RunnerError, Session, Target
from harness.runners.case import (
    Stage,
    check_segs,
    describe_case,
    finish_record,
    load_options,
    model_info,
    new_record,
    record_error,
    save_and_score,
)
from harness.runners.reaper import processes_with_env
from harness.runners.subprocess import check_timeout

if TYPE_CHECKING:
    from harness.pluginmanager import HarnessPlugins
    from harness.run import RunConfig
    from harness.plugin_api import LoadOptions, SegmenterSpec

NAME = "ray"
TIMING_MODE = "distributed"
EXCLUSIVE_TIMING_MODE = "in-process"
INSTALL_HINT = "--runner ray needs Ray: pip install -e '.[ray]'"
CASES_PER_WORKER = 2
"""Cases in flight per worker: one segmenting, one waiting in its queue (its bytes already shipped)."""
RETRIES = 1
"""A case whose worker died is run again this many times (on another worker) before it is an error."""
LOCAL_OBJECT_STORE_BYTES = 512 * 1024 * 1024
"""The object store of a local instance: enough for the cases in flight; Ray spills to disk beyond it."""
OPTION_KEYS = ("address", "workers", "cpus_per_worker", "gpus_per_worker", "exclusive", "shared_data")


@dataclass(frozen=True)
class RayOptions:
    """The ray runner's settings, from ``RunConfig.runner_options["ray"]``."""

    address: str | None = None
    workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    exclusive: bool = False
    shared_data: bool = False

    @classmethod
    def from_config(cls, config: "RunConfig") -> "RayOptions":
        raw = dict((getattr(config, "runner_options", None) or {}).get(NAME) or {})
        unknown = sorted(set(raw) - set(OPTION_KEYS))
        if unknown:
            raise RunnerError(f"unknown ray runner option(s) {', '.join(unknown)}; known: {', '.join(OPTION_KEYS)}")
        raw = {key: value for key, value in raw.items() if value is not None}
        options = cls(**{**raw, "exclusive": bool(raw.get("exclusive", False)),
                         "shared_data": bool(raw.get("shared_data", False))})
        if options.workers is not None and (int(options.workers) != options.workers or options.workers < 1):
            raise RunnerError(f"--ray-workers must be a positive integer, got {options.workers}")
        if not options.cpus_per_worker > 0:
            raise RunnerError(f"--ray-cpus-per-worker must be positive, got {options.cpus_per_worker}")
        if options.gpus_per_worker < 0:
            raise RunnerError(f"--ray-gpus-per-worker must be 0 or more, got {options.gpus_per_worker}")
        if options.exclusive and options.workers is not None:
            raise RunnerError("--ray-exclusive runs one worker per node; drop --ray-workers")
        return dataclasses.replace(
            options, workers=None if options.workers is None else int(options.workers),
            cpus_per_worker=float(options.cpus_per_worker), gpus_per_worker=float(options.gpus_per_worker))


def ray_missing() -> bool:
    """Whether Ray cannot be imported (found without importing it; a None in sys.modules counts as missing)."""
    try:
        return importlib.util.find_spec("ray") is None
    except (ImportError, ValueError):
        return True


# --- the worker (a Ray actor; the class is made remote when a run starts) -----------------------------


class SegmenterWorker:
    """One Ray actor: loads ``model`` from the plugins installed where it runs, then segments cases."""

    def __init__(self, model: str, options: "LoadOptions"):
        import ray

        from harness.pluginmanager import HarnessPlugins, UnknownSegmenterError
        from harness.profiling import pin_threads

        self.node_id = ray.get_runtime_context().get_node_id()
        self.hostname = socket.gethostname()
        _sweep_temp_dirs()
        try:
            spec = HarnessPlugins().get(model)
        except UnknownSegmenterError as exc:
            raise RuntimeError(
                f"segmenter '{model}' is not installed on Ray node {self.hostname} ({self.node_id}): {exc}. "
                "Workers find segmenters among the plugins installed on their node (entry points); a plugin "
                "registered only in the driver process is unknown to them: install it on every node") from None
        self.segmenter = spec.load(options)
        if options.threads:
            pin_threads(options.threads)  # after load: a segmenter that imported torch has pinned it too
        self.described = self.segmenter.describe()

    def info(self) -> dict:
        """Where this worker runs and what it loaded (its ``describe()``); also tells the model loaded."""
        return {"node": {"id": self.node_id, "hostname": self.hostname}, "pid": os.getpid(),
                "described": self.described}

    def segment(self, name: str, data: bytes | None, path: str | None) -> dict:
        """Segment one case: its file's bytes (written to a private temporary file, deleted after
        loading), or with shared data the driver's path. Returns the segs as the segmenter gave them,
        the seconds and peak memory of the segmentation, and where it ran."""
        from harness.runners.case import timed_segment

        if data is not None:
            with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
                case_file = Path(tmp) / name
                case_file.write_bytes(data)
                case = load_case(case_file)
        else:
            case = load_case(path)
        segs, seconds, peak = timed_segment(self.segmenter, case)
        return {"segs": segs, "seconds": seconds, "peak_rss_mb": peak.mb, "memory_method": peak.method,
                "node": {"id": self.node_id, "hostname": self.hostname}, "pid": os.getpid()}


TEMP_PREFIX = "harness-ray-"
"""A worker's temporary case folders: ``<tmp>/harness-ray-<pid>-<random>``, removed once the case is loaded."""


def _sweep_temp_dirs() -> None:
    """Remove the case folders of workers that were killed while loading a case (their PID is gone)."""
    root = Path(tempfile.gettempdir())
    for folder in root.glob(f"{TEMP_PREFIX}*-*"):
        pid = folder.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


# --- the driver side --------------------------------------------------------------------------------


@contextmanager
def loopback_only():
    """Make a local instance advertise and bind 127.0.0.1 only. Ray binds its servers to the node's IP,
    and a ``localhost`` node IP is otherwise replaced by the machine's outward address; with Ray's
    cluster mode off (the switch Ray itself uses on Windows and macOS), the node IP stays 127.0.0.1."""
    import ray._private.ray_constants as constants

    previous = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = previous


OWNER_ENV = "HARNESS_RAY_INSTANCE"
"""Set (to a token of the run) in the environment of every process of a local instance the runner starts,
so that the reaper finds them: Ray's processes inherit it from the driver, its workers from the raylet."""

def _join_address(address: str) -> str:
    """``address`` as Ray will dial it: ``auto`` is the cluster ``ray start`` recorded on this machine (or
    ``RAY_ADDRESS``); anything else as given."""
    if address != "auto":
        return address
    from ray._private.services import get_ray_address_from_environment

    try:
        return get_ray_address_from_environment(address, None) or address
    except (ConnectionError, RuntimeError, ValueError):
        return address


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    return host == "localhost" or host == "::1" or host.startswith("127.")


def _dead_worker_text(exc: BaseException) -> str:
    """A short reason from a Ray actor error (its first line)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _creation_error(exc: BaseException) -> str:
    """The error raised in a worker's ``__init__`` (model load), from the actor-died error Ray raises."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Ray's message ends with the creation task's traceback; its last line is the exception itself.
    for line in reversed(lines):
        if not line.startswith(("File ", "^", "~", "Traceback", "The above exception")):
            return line
    return _dead_worker_text(exc)


def _node_text(node: dict | None) -> str:
    if not node:
        return "an unknown node"
    return f"{node.get('hostname')} ({node.get('id')})"


@dataclass
class _Worker:
    slot: int
    actor: Any
    ready: Any  # the info() ref until the worker has loaded its model, then None
    node: dict | None = None
    pid: int | None = None
    described: dict | None = None
    placement: dict = field(default_factory=dict)
    queue: collections.deque = field(default_factory=collections.deque)  # in-flight refs, oldest first
    current_since: float | None = None  # when its oldest in-flight case became its current one (None: idle)

    @property
    def load(self) -> int:
        return len(self.queue)


@dataclass
class _Task:
    case_path: Path
    case: Any  # the driver's own load of the case (for the record, checking and scoring)
    data: Any = None  # ObjectRef of the file's bytes (None with shared data)
    deaths: list = field(default_factory=list)  # nodes whose worker died while running it
    tried: set = field(default_factory=set)  # worker slots it went to
    worker: "_Worker | None" = None


class RaySession(Session):
    """An opened ray target: its workers (actors) and the loop that feeds them and collects results."""

    def __init__(self, runner: "RayRunner", spec: "SegmenterSpec", entry: str, config: "RunConfig",
                 options: "LoadOptions", threads: int, timing_mode: str, backend: str | None,
                 placements: list[dict], log: Callable[[str], None]):
        self.runner, self.spec, self.entry, self.config = runner, spec, entry, config
        self.load_options, self.threads, self.timing_mode, self.backend = options, threads, timing_mode, backend
        self.placements, self.log = placements, log
        self.workers: list[_Worker] = []
        self.replacements = 0
        self._next_slot = 0
        self._actor_class = None

    # workers ------------------------------------------------------------------------------------------

    def _start_worker(self, placement: dict) -> _Worker:
        import ray

        if self._actor_class is None:
            self._actor_class = ray.remote(SegmenterWorker)
        actor = self._actor_class.options(**placement).remote(self.spec.name, self.load_options)
        worker = _Worker(slot=self._next_slot, actor=actor, ready=actor.info.remote(), placement=placement)
        self._next_slot += 1
        self.workers.append(worker)
        return worker

    def start(self) -> None:
        """Start every worker and wait until each has loaded the model; a load error raises here."""
        import ray

        for placement in self.placements:
            self._start_worker(placement)
        pending = {w.ready: w for w in self.workers}
        started = time.perf_counter()
        warned = False
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=30.0)
            if not done:
                if not warned:
                    self.log(f"{self.entry}: waiting for Ray workers to start and load the model "
                             f"({len(self.workers) - len(pending)} of {len(self.workers)} ready after "
                             f"{time.perf_counter() - started:.0f} s)")
                    warned = True
                continue
            worker = pending.pop(done[0])
            try:
                self._ready(worker, ray.get(done[0]))
            except ray.exceptions.RayError as exc:
                self.close()
                raise RunnerError(f"{self.spec.name} could not be loaded by a Ray worker: "
                                  f"{_creation_error(exc)}") from None

    def _ready(self, worker: _Worker, info: dict) -> None:
        worker.ready = None
        worker.node, worker.pid, worker.described = info["node"], info["pid"], info["described"]

    def _replace(self, worker: _Worker, why: str = "died") -> _Worker:
        """A worker died (or overran --timeout): kill what is left of its actor, start a new one in its place."""
        import ray

        try:
            ray.kill(worker.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.workers.remove(worker)
        self.replacements += 1
        new = self._start_worker(worker.placement)
        self.log(f"{self.entry}: the Ray worker on node {_node_text(worker.node)} {why}; starting a new one")
        return new

    def close(self) -> None:
        import ray

        for worker in self.workers:
            try:
                ray.kill(worker.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone, or Ray already shut down
                pass
        self.workers = []

    # cases ---------------------------------------------------------------------------------------------

    def _record(self, case_path: Path, node: dict | None = None) -> dict:
        record = new_record(self.entry, self.spec.name, case_path, self.config, self.threads, self.timing_mode,
                            self.backend)
        record["runner"] = NAME
        record["node"] = dict(node) if node else None
        return record

    def _pick(self, task: _Task) -> _Worker | None:
        """The least loaded ready worker with room, preferring one the task has not been to."""
        ready = [w for w in self.workers if w.ready is None and w.load < CASES_PER_WORKER]
        if not ready:
            return None
        fresh = [w for w in ready if w.slot not in task.tried]
        return min(fresh or ready, key=lambda w: (w.load, w.slot))

    def run(self, cases: Iterable[Path], started: Callable[[Path], None]) -> Iterator[dict]:
        import ray

        todo: collections.deque[_Task] = collections.deque(_Task(Path(c), None) for c in cases)
        inflight: dict[Any, _Task] = {}
        announced: set[Path] = set()
        while todo or inflight:
            # Feed the workers, at most CASES_PER_WORKER cases each.
            while todo:
                worker = self._pick(todo[0])
                if worker is None:
                    break
                task = todo.popleft()
                if task.case is None:  # first dispatch: load it here (for the record) and ship its bytes
                    try:
                        task.case = load_case(task.case_path)
                    except Exception as exc:  # noqa: BLE001 - an unreadable case is its own error record
                        record = self._record(task.case_path)
                        record_error(record, Stage(), exc, task.case_path)
                        yield finish_record(record)
                        continue
                    if not self.runner.options.shared_data:
                        task.data = ray.put(task.case_path.read_bytes())
                if task.case_path not in announced:
                    announced.add(task.case_path)
                    started(task.case_path)
                path = None if task.data is not None else str(task.case_path.resolve())
                ref = worker.actor.segment.remote(task.case_path.name, task.data, path)
                task.worker = worker
                task.tried.add(worker.slot)
                if not worker.queue:
                    worker.current_since = time.monotonic()
                worker.queue.append(ref)
                inflight[ref] = task
            starting = {w.ready: w for w in self.workers if w.ready is not None}
            if not inflight and not starting:
                for task in todo:  # every worker is gone and none could be started
                    record = self._record(task.case_path)
                    if task.case is not None:
                        describe_case(record, task.case)
                    record["status"] = "error"
                    record["error"] = (f"while segmenting: {task.case_path}: no Ray worker left to run it "
                                       "(every worker died and none could be started)")
                    yield finish_record(record)
                todo.clear()
                break
            limit = self.config.timeout
            longest = self._longest_running() if limit else None
            wait = None if longest is None else max(0.0, longest.current_since + limit - time.monotonic())
            done, _ = ray.wait([*inflight, *starting], num_returns=1, timeout=wait)
            if not done:
                if longest is not None and time.monotonic() - longest.current_since >= limit:
                    yield from self._timed_out(longest, inflight, todo)
                continue
            ref = done[0]
            if ref in starting:
                worker = starting[ref]
                try:
                    self._ready(worker, ray.get(ref))
                except ray.exceptions.RayError as exc:
                    self.workers.remove(worker)
                    self.log(f"{self.entry}: a replacement Ray worker could not start: {_creation_error(exc)}")
                continue
            worker = inflight[ref].worker
            outcome = _fetch(ref)
            if not isinstance(outcome, _Death):
                worker.queue.remove(ref)
                worker.current_since = time.monotonic() if worker.queue else None
                yield self._finish(inflight.pop(ref), outcome)
                continue
            yield from self._worker_died(worker, inflight, todo)

    def _longest_running(self) -> _Worker | None:
        """The worker whose current case has run longest (None: every worker idle); --timeout watches it."""
        return min((w for w in self.workers if w.current_since is not None), key=lambda w: w.current_since,
                   default=None)

    def _timed_out(self, worker: _Worker, inflight: dict, todo: collections.deque) -> Iterator[dict]:
        """``worker``'s current case ran past ``--timeout``: unless it came back meanwhile, it is an error
        (not retried), the worker is killed and replaced, and the cases behind it are queued again."""
        import ray

        head = worker.queue[0]
        if ray.wait([head], num_returns=1, timeout=0)[0]:
            return  # it finished just now: the main loop collects it
        refs = list(worker.queue)
        worker.queue.clear()
        worker.current_since = None
        self._replace(worker, why=f"ran past --timeout {self.config.timeout:g} s and was killed")
        task = inflight.pop(head)
        record = self._record(task.case_path, worker.node)
        describe_case(record, task.case)
        record["status"] = "error"
        record["error"] = (f"while segmenting on node {_node_text(worker.node)}: exceeded --timeout "
                           f"{self.config.timeout:g} s (the Ray worker was killed; the next cases run on a new "
                           f"one); {task.case_path}")
        task.data = None
        yield finish_record(record)
        requeue = []
        for ref in refs[1:]:  # sent to the worker, never started
            behind = inflight.pop(ref)
            behind.tried.discard(worker.slot)
            requeue.append(behind)
        todo.extendleft(reversed(requeue))

    def _worker_died(self, worker: _Worker, inflight: dict, todo: collections.deque) -> Iterator[dict]:
        """One of ``worker``'s cases came back as a lost worker. Its cases run in order: those that
        finished before the death are records as usual; the first unfinished one was running (one death
        counted: retried once, then an error); the ones behind it never started (queued again)."""
        import ray

        refs = list(worker.queue)
        worker.queue.clear()
        worker.current_since = None
        ray.wait(refs, num_returns=len(refs), timeout=2.0)  # let the other results of the dead worker settle
        reason = None
        self._replace(worker)
        requeue = []
        for ref in refs:
            task = inflight.pop(ref)
            outcome = _fetch(ref, timeout=0.0) if reason is None else _Death("not started")
            if not isinstance(outcome, _Death):
                yield self._finish(task, outcome)
                continue
            if reason is not None:  # behind the running case: it never started
                task.tried.discard(worker.slot)
                requeue.append(task)
                continue
            reason = outcome.reason
            task.deaths.append(dict(worker.node or {}))
            if len(task.deaths) <= RETRIES:
                requeue.append(task)
                continue
            record = self._record(task.case_path, worker.node)
            describe_case(record, task.case)
            nodes = ", then on ".join(_node_text(node) for node in task.deaths)
            record["status"] = "error"
            record["error"] = (f"while segmenting on node {_node_text(worker.node)}: the Ray worker died "
                               f"{len(task.deaths)} times running this case (killed or crashed, e.g. out of "
                               f"memory): on {nodes}; last: {reason}; {task.case_path}; "
                               "use --retry-errors to try again")
            task.data = None
            yield finish_record(record)
        todo.extendleft(reversed(requeue))

    def _finish(self, task: _Task, outcome) -> dict:
        """The record of a case that came back from a worker: its segs, or the error it raised."""
        task.data = None  # its bytes may leave the object store
        stage = Stage("segmenting")
        if isinstance(outcome, _Raised):
            record = self._record(task.case_path, task.worker.node)
            describe_case(record, task.case)
            record_error(record, stage, outcome.exc, task.case_path)
            return finish_record(record)
        record = self._record(task.case_path, outcome["node"])
        describe_case(record, task.case)
        try:
            segs = outcome["segs"]
            if isinstance(segs, np.ndarray) and not segs.flags.writeable:
                segs = segs.copy()  # not a view of Ray's object store
            record.update(seconds=outcome["seconds"], peak_rss_mb=outcome["peak_rss_mb"],
                          memory_method=outcome["memory_method"])
            segs = check_segs(segs, task.case)
            save_and_score(record, task.case, segs, task.case_path, self.config, stage)
        except Exception as exc:  # noqa: BLE001 - one bad case never stops the run
            record_error(record, stage, exc, task.case_path)
        return finish_record(record)


@dataclass
class _Raised:
    """The segmenter (or loading the case on the worker) raised ``exc``."""

    exc: BaseException


@dataclass
class _Death:
    """The worker was lost before the case finished."""

    reason: str


def _fetch(ref, timeout: float | None = None):
    """A finished case's result dict, :class:`_Raised` or :class:`_Death`."""
    import ray

    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        return _Death("no answer from the worker")
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        return _Raised(cause if isinstance(cause, BaseException) else exc)
    except ray.exceptions.RayError as exc:  # actor died or unavailable, object lost, out of memory, node died
        return _Death(_dead_worker_text(exc))


class RayRunner(Runner):
    name = NAME
    timing_mode = TIMING_MODE
    label = "ray (distributed)"
    order = 30
    description = "a Ray cluster (local or --ray-address); a case's time is its segmentation on a worker"

    def __init__(self):
        self.options = RayOptions()
        self.started_ray = False  # this run started a local instance (shut it down at the end)
        self.connected = False
        self.startup_seconds: float | None = None
        self.log: Callable[[str], None] = print
        self._reaper: subprocess.Popen | None = None

    def check(self, config: "RunConfig") -> None:
        if ray_missing():
            raise RunnerError(INSTALL_HINT)
        self.options = RayOptions.from_config(config)
        check_timeout(config)

    # connection -----------------------------------------------------------------------------------------

    def connect(self) -> None:
        """Start a local instance (no address) or join the cluster at ``address``; once per run."""
        if self.connected:
            return
        if ray_missing():
            raise RunnerError(INSTALL_HINT)
        import ray

        quiet = {"log_to_driver": True, "logging_level": logging.WARNING}
        started = time.perf_counter()
        address = self.options.address
        if address is None:
            if ray.is_initialized():  # a caller (a notebook, a test) already connected this process: use it
                self.connected, self.started_ray = True, False
                return
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from local instances
            from harness.profiling import default_threads

            token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self._reaper = subprocess.Popen(
                [sys.executable, "-m", "harness.runners.reaper", token, str(os.getpid()), OWNER_ENV], stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            previous = os.environ.get(OWNER_ENV)
            os.environ[OWNER_ENV] = token
            try:
                with loopback_only():
                    ray.init(address="local", num_cpus=default_threads(), include_dashboard=False,
                             object_store_memory=LOCAL_OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1", **quiet)
            except BaseException:
                self._stop_reaper()
                raise
            finally:
                if previous is None:
                    os.environ.pop(OWNER_ENV, None)
                else:
                    os.environ[OWNER_ENV] = previous
            self.started_ray = True
            where = f"a local Ray instance ({int(ray.cluster_resources().get('CPU', 0))} CPUs, 127.0.0.1)"
        else:
            target = _join_address(address)
            try:
                if _is_loopback(target):  # a cluster bound to 127.0.0.1 (as ours): Ray would swap in this
                    with loopback_only():  # machine's outward address, where nothing listens
                        ray.init(address=target, **quiet)
                else:
                    ray.init(address=address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise RunnerError(f"cannot join the Ray cluster at {address}: {exc}") from None
            where = f"the Ray cluster at {target}"
        self.connected = True
        self.startup_seconds = time.perf_counter() - started
        self.log(f"ray: {'started' if self.started_ray else 'joined'} {where} in {self.startup_seconds:.1f} s")

    def close(self) -> None:
        if self.connected:
            self.connected = False
            import ray

            if ray.is_initialized() and (self.started_ray or self.options.address is not None):
                ray.shutdown()  # stops a local instance; only disconnects from a cluster we joined
            self.started_ray = False
        self._stop_reaper()

    def _stop_reaper(self) -> None:
        """Tell the reaper the run is over and wait until it has stopped what Ray left of a local instance."""
        reaper, self._reaper = self._reaper, None
        if reaper is None:
            return
        try:
            reaper.stdin.close()
            reaper.wait(timeout=15)
        except (OSError, subprocess.TimeoutExpired):
            pass

    # placement ------------------------------------------------------------------------------------------

    def placements(self) -> tuple[list[dict], int]:
        """Ray options of each worker to start, and the thread count each pins."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts = self.options
        common = {"max_restarts": 0, "max_task_retries": 0}
        if opts.exclusive:
            nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
            if not nodes:
                raise RunnerError("the Ray cluster has no live node with a CPU")
            out = []
            for node in nodes:
                cpus = node["Resources"]["CPU"]
                gpus = node["Resources"].get("GPU", 0) if opts.gpus_per_worker else 0
                out.append({**common, "num_cpus": cpus, "num_gpus": gpus,
                            "scheduling_strategy": NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)})
            threads = int(min(p["num_cpus"] for p in out))
            return out, threads
        resources = ray.cluster_resources()
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        fit = math.floor(cpus / opts.cpus_per_worker + 1e-9)
        if opts.gpus_per_worker:
            fit = min(fit, math.floor(gpus / opts.gpus_per_worker + 1e-9))
        workers = opts.workers if opts.workers is not None else fit
        if fit < 1 or workers > fit:
            need = f"{workers or 1} worker(s) x {opts.cpus_per_worker:g} CPU"
            if opts.gpus_per_worker:
                need += f" and {opts.gpus_per_worker:g} GPU"
            raise RunnerError(f"the Ray cluster cannot hold {need} (it has {cpus:g} CPUs and {gpus:g} GPUs); "
                              "lower --ray-workers or --ray-cpus-per-worker")
        placement = {**common, "num_cpus": opts.cpus_per_worker, "num_gpus": opts.gpus_per_worker,
                     "scheduling_strategy": "SPREAD"}
        return [dict(placement) for _ in range(workers)], max(1, int(opts.cpus_per_worker))

    # targets --------------------------------------------------------------------------------------------

    def targets(self, specs, config, plugins: "HarnessPlugins", threads: int, log=print) -> list[Target]:
        self.log = log
        self.options = RayOptions.from_config(config)
        timing_mode = EXCLUSIVE_TIMING_MODE if self.options.exclusive else TIMING_MODE
        return [Target(entry_name(spec, config), self._opener(spec, config, plugins, timing_mode, log),
                       runner=NAME, timing_mode=timing_mode, crash_markers=False) for spec in specs]

    def _opener(self, spec, config, plugins, timing_mode: str, log) -> Callable[[], RaySession]:
        entry = entry_name(spec, config)

        def open_() -> RaySession:
            from harness.runners.native import ran_on

            self.connect()
            placements, worker_threads = self.placements()
            threads = config.threads or worker_threads
            session = RaySession(self, spec, entry, config, load_options(spec, config, threads), threads,
                                 timing_mode, None, placements, log)
            session.start()
            first = session.workers[0]
            described = dict(first.described or {})
            session.backend = ran_on(spec, described, config)
            nodes = sorted({_node_text(w.node) for w in session.workers})
            info = model_info(spec, described, plugins, variant_tags(spec, config))
            update_models(config.out_dir, entry, {
                **info, "runner": NAME, "timing_mode": timing_mode,
                "ray": {"workers": len(session.workers), "cpus_per_worker": placements[0]["num_cpus"],
                        "gpus_per_worker": placements[0]["num_gpus"], "exclusive": self.options.exclusive,
                        "shared_data": self.options.shared_data, "threads": threads, "nodes": nodes},
            })
            log(f"{entry}: {len(session.workers)} Ray worker(s) on {len(nodes)} node(s)")
            return session

        return open_
