"""The driver of ``harness run``: every model x case through the chosen runner, stored as it finishes.

How a case is executed belongs to the runner (:mod:`harness.runners`: native in this process, one
process or container per case, a Ray cluster, or a plugin's); the driver resolves the runner, skips the
(model, case) pairs already recorded, streams each record into ``OUT/results.jsonl`` as it arrives and
keeps in-flight markers so that a case that kills this process twice is recorded instead of blocking
every resumed run. Each runner's entries are stored under their own names (``litemedsam[docker]``).
"""
from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from harness import __version__
from harness.cases import discover_cases
from harness.choices import DEFAULT_BACKEND, DEFAULT_PATH, DEFAULT_PRECISION, DEFAULT_RUNNER
from harness.pluginmanager import HarnessPlugins, UnknownRunnerError
from harness.profiling import default_threads, pin_threads
from harness.results import ResultsStore, update_models
from harness.runners.base import RunnerError
from harness.runners.case import error_text


@dataclass
class RunConfig:
    """What ``harness run`` was asked to do.

    ``runner``: the name of a registered runner (:mod:`harness.runners`; built in: "native", in this
    process, timing mode in-process; "subprocess" and "docker", one process or container per case,
    timed end to end as the challenge times it; "ray", a Ray cluster). ``runner_options``: settings of
    the runner itself, by runner name (``{"ray": {"workers": 2}}``). ``image``: a docker image tag or a
    ``team.tar.gz`` submission (docker runner only). ``timeout``: seconds per case for native (in an
    isolated worker), subprocess, docker and ray (None: no limit). ``memory``: a size such as ``"4g"``: the
    docker container's memory limit (None there: 8G, the challenge's), and for native (isolated) and
    subprocess the address-space limit (``RLIMIT_AS``) of the process that segments (None: no limit).
    ``isolate``: native runner only, segment in a worker process that a segmenter's ``os._exit``,
    crash or hang cannot take down (implied by ``timeout`` and ``memory``; :mod:`harness.runners.isolated`).
    ``metrics``: what each case is scored with; ``dsc`` and ``nsd`` always, ``hd95`` and ``masd``
    (:func:`harness.metrics.distance_metrics`) when listed.
    """

    models: list[str]
    data_dir: Path
    out_dir: Path
    limit: int | None = None
    weights: dict[str, Path] = field(default_factory=dict)
    weights_dir: Path | None = None
    allow_pickle: bool = False
    threads: int | None = None
    device: str = "cpu"
    path: str = DEFAULT_PATH
    precision: str = DEFAULT_PRECISION
    backend: str = DEFAULT_BACKEND
    runner: str = DEFAULT_RUNNER
    runner_options: dict[str, Any] = field(default_factory=dict)
    image: str | None = None
    timeout: float | None = None
    memory: str | None = None
    isolate: bool = False
    retry_errors: bool = False
    progress: bool = True
    metrics: tuple[str, ...] = ("dsc", "nsd")
    # a case file whose arrays take more GB (10^9 bytes) than this decompressed is an error row, refused
    # before decompressing; None: HARNESS_MAX_CASE_GB, else a quarter of physical memory (harness.cases)
    max_case_gb: float | None = None
    # "standard": the 2024 one-box protocol; "interactive": the 2025 box + clicks protocol, ``clicks``
    # click steps after the box step (harness.interactive.run)
    protocol: str = "standard"
    clicks: int = 5


@dataclass
class RunReport:
    """Counts of one invocation (records already present before it are ``skipped``)."""

    done: int = 0
    errors: int = 0
    skipped: int = 0
    failed_models: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed_models and self.errors == 0



def check_config(config: RunConfig, plugins: HarnessPlugins | None = None):
    """The runner ``config`` asks for, after refusing settings it cannot honour (:class:`RunnerError`,
    before any work: an unknown runner, ``--image`` without docker, what the runner's own check refuses).
    ``protocol == "interactive"`` runs through :func:`harness.interactive.run.interactive_runner` (native,
    subprocess or docker)."""
    plugins = plugins or HarnessPlugins()
    if getattr(config, "protocol", "standard") != "standard":
        from harness.interactive.run import PROTOCOLS, interactive_runner

        if config.protocol not in PROTOCOLS:
            raise RunnerError(f"unknown protocol {config.protocol!r}; expected one of {', '.join(PROTOCOLS)}")
        runner = interactive_runner(config)
        runner.check(config)
        return runner
    try:
        runner = plugins.get_runner(config.runner)
    except UnknownRunnerError as exc:
        raise RunnerError(str(exc)) from None
    if config.image and config.runner != "docker":
        raise RunnerError(f"--image runs a docker image; it needs --runner docker, not {config.runner}")
    runner.check(config)
    return runner


def run(config: RunConfig, plugins: HarnessPlugins | None = None, log=print) -> RunReport:
    """Run every requested model over every case of ``config.data_dir`` with ``config.runner``; resumable."""
    plugins = plugins or HarnessPlugins()
    runner = check_config(config, plugins)
    specs = [plugins.get(name) for name in config.models]  # unknown names fail before any work
    for name in config.weights:  # weights for a model not run are components (a teacher's decoder)
        plugins.get(name)
    cases = discover_cases(config.data_dir, config.limit)
    if not cases:
        raise FileNotFoundError(f"{config.data_dir}: no .npz cases found (expected imgs/*.npz)")
    threads = config.threads or default_threads()
    pin_threads(threads)
    report = RunReport()
    try:
        with ResultsStore(config.out_dir) as store:
            inflight = InFlight(config.out_dir)
            for target in runner.targets(specs, config, plugins, threads, log):
                _run_target(runner, target, cases, store, inflight, config, report, log)
    finally:
        runner.close()
    return report


def _run_target(runner, target, cases: list[Path], store: ResultsStore, inflight: "InFlight", config: RunConfig,
                report: RunReport, log) -> None:
    """The pending cases of one entry through its session; each record stored as it arrives."""
    entry = target.entry
    finished = store.finished(entry, include_errors=not config.retry_errors)
    pending = [c for c in cases if c.name not in finished]
    report.skipped += len(cases) - len(pending)
    if not pending:
        log(f"{entry}: all {len(cases)} cases already in {store.path}")
        return
    by_name = {c.name: c for c in pending}
    bar = tqdm(total=len(pending), desc=entry, unit="case", disable=not config.progress, file=sys.stderr)

    def store_record(record: dict) -> None:
        store.append(record)
        case_path = by_name.get(record.get("case"))
        if case_path is not None:
            inflight.finish(entry, case_path)
        bar.update(1)
        if record["status"] == "ok":
            report.done += 1
        else:
            report.errors += 1
            tqdm.write(f"{entry} {record.get('case')}: {record['error']}", file=sys.stderr)

    runnable = []
    for case_path in pending:
        crashed = inflight.previous_crash(entry, case_path, target.runner, target.timing_mode) \
            if target.crash_markers else None
        if crashed is not None:
            store_record(crashed)
        else:
            runnable.append(case_path)
    if not runnable:
        bar.close()
        return
    try:
        session = target.open()
    except Exception as exc:  # noqa: BLE001 - a model that cannot load must not stop the others
        report.failed_models[entry] = error_text(exc)
        bar.close()
        return
    # what the leaderboard needs to place and label this runner's entries without loading plugins
    update_models(config.out_dir, entry, {"runner": runner.name, "runner_label": runner.label or runner.name,
                                          "runner_order": runner.order, "timing_mode": target.timing_mode})

    running: set[Path] = set()

    def started(case_path: Path) -> None:
        bar.set_postfix_str(case_path.name, refresh=False)
        if target.crash_markers:
            inflight.start(entry, case_path)
            running.add(case_path)

    try:
        for record in session.run(runnable, started):
            running.discard(by_name.get(record.get("case")))
            store_record(record)
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: the harness saw this stop, so it is no crash of the case; the rerun runs it
        for case_path in running:
            inflight.abandon(entry, case_path)
        raise
    finally:
        session.close()
        bar.close()


class InFlight:
    """Markers of the cases being segmented right now, so that a case that kills the process
    (a segfault, the kernel's OOM killer) does not block every resumed run.

    ``OUT/.inflight/<model>/<case>`` is written before a case starts and removed once its record
    is stored (or given back when the run is interrupted: Ctrl-C, SIGTERM). A marker found at the next
    start means that run died inside the case. The first time, the case is simply run again; if it is
    found a second time, the case is recorded as an error and the run moves on. The marker's first line
    counts the attempts; each further line is the process id, start time (``time.monotonic()``) and name of
    the process that made one, so that the error can cite the kernel's out-of-memory record of that
    process where the kernel log is readable (and says nothing about memory otherwise).
    """

    def __init__(self, out_dir: Path):
        self.root = out_dir / ".inflight"

    def _marker(self, model: str, case_path: Path) -> Path:
        return self.root / model / case_path.name

    @staticmethod
    def _read(marker: Path) -> tuple[int, list[str]]:
        try:
            lines = marker.read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return 0, []
        try:
            return int(lines[0]) if lines else 0, lines[1:]
        except ValueError:
            return 0, []

    @staticmethod
    def _write(marker: Path, attempts: int, deaths: list[str]) -> None:
        marker.write_text("\n".join([str(attempts), *deaths]) + "\n")

    def previous_crash(self, model: str, case_path: Path, runner: str = DEFAULT_RUNNER,
                       timing_mode: str = "in-process") -> dict | None:
        """An error record if this case already died twice, else None."""
        attempts, deaths = self._read(self._marker(model, case_path))
        if attempts < 2:
            return None
        evidence = [found for found in map(_oom_evidence, deaths) if found]
        memory = (f"; the kernel killed it for lack of memory: {evidence[-1]}" if evidence else "")
        return {
            "model": model, "case": case_path.name, "status": "error", "timing_mode": timing_mode,
            "runner": runner, "harness_version": __version__,
            "error": f"{case_path}: the harness process died while segmenting this case, {attempts} times "
                     f"(killed or crashed: a death the harness did not see, such as SIGKILL or a segfault){memory}; "
                     "--isolate (or --timeout / --memory) segments in a worker process whose death is recorded "
                     "for its case alone; use --retry-errors to try again",
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def start(self, model: str, case_path: Path) -> None:
        marker = self._marker(model, case_path)
        marker.parent.mkdir(parents=True, exist_ok=True)
        attempts, deaths = self._read(marker)
        self._write(marker, attempts + 1, [*deaths, f"{os.getpid()}\t{time.monotonic():.3f}\t{_own_name()}"])

    def abandon(self, model: str, case_path: Path) -> None:
        """Take back the attempt :meth:`start` counted: the case was interrupted, not killed."""
        marker = self._marker(model, case_path)
        attempts, deaths = self._read(marker)
        if attempts > 1:
            self._write(marker, attempts - 1, deaths[:-1])
        else:
            marker.unlink(missing_ok=True)

    def finish(self, model: str, case_path: Path) -> None:
        self._marker(model, case_path).unlink(missing_ok=True)


def _own_name() -> str:
    try:
        return Path("/proc/self/comm").read_text().strip()
    except OSError:
        return ""


def _oom_evidence(death: str) -> str | None:
    """The kernel's out-of-memory record of the process a marker line names, if the kernel log has one."""
    from harness.runners.limits import kernel_oom_kill

    parts = death.split("\t")
    try:
        pid, since = int(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        return None
    return kernel_oom_kill(pid, parts[2] if len(parts) > 2 and parts[2] else None, since)
