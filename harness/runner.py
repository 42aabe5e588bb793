"""The native runner: every model x case, segmented in this process, scored, stored as it finishes.

Timing mode ``in-process``: each model is loaded once; a case's ``seconds`` is the wall time of its
segmentation alone (``Segmenter.segment``: preprocessing, encoder, decoder, postprocessing), not
reading the npz, writing segs or scoring. ``peak_rss_mb`` is the process's peak RSS during that
segmentation (see :mod:`harness.profiling`).

The same loop also drives the ``subprocess`` and ``docker`` runners (``RunConfig.runner``), which
run each case in a fresh process or container and time it end to end (:mod:`harness.external`);
all three end a case in :func:`save_and_score`, and each is stored as its own entry
(``litemedsam[docker]``).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from harness import __version__
from harness.cases import Case, CaseError, discover_cases, load_case, load_ground_truth, save_segs
from harness.metrics import DISTANCE_METRICS, case_metrics, distance_metrics
from harness.pluginmanager import HarnessPlugins
from harness.profiling import PeakRSS
from harness.results import ResultsStore, update_models
from harness.specs import DEFAULT_BACKEND, DEFAULT_PATH, LoadOptions, SegmenterSpec

TIMING_MODE = "in-process"
RUNNER = "native"


def default_threads() -> int:
    """CPUs this process may use (its affinity mask), the thread count a run pins by default."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass
class RunConfig:
    """What ``harness run`` was asked to do.

    ``runner``: "native" (in this process, timing mode in-process), "subprocess" (one
    ``harness predict`` process per case) or "docker" (one container per case, as the challenge
    times it); the last two are timed end to end (:mod:`harness.external`). ``image``: a docker
    image tag or a ``team.tar.gz`` submission (docker runner only). ``timeout``: seconds per case
    for subprocess and docker (None: no limit). ``memory``: the container's memory limit.
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
    precision: str = "fp32"
    backend: str = DEFAULT_BACKEND
    runner: str = RUNNER
    image: str | None = None
    timeout: float | None = None
    memory: str = "8G"
    retry_errors: bool = False
    progress: bool = True
    metrics: tuple[str, ...] = ("dsc", "nsd")


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


def choice_defaults(device: str = "cpu", path: str = DEFAULT_PATH) -> dict[str, str]:
    """What a run does unless told otherwise, on this machine: the fast path, fp32, and the backend
    ``--backend auto`` picks for ``path`` (on the fast path openvino where installed, else torch; on
    the faithful path torch: :func:`models.backends.resolve_backend`)."""
    from models.backends import resolve_backend

    return {"path": DEFAULT_PATH, "precision": "fp32", "backend": resolve_backend(DEFAULT_BACKEND, path, device)}


def resolved(config: "RunConfig") -> "RunConfig":
    """``config`` with ``--backend auto`` replaced by the backend it picks for the run's path and device."""
    from models.backends import resolve_backend

    backend = resolve_backend(config.backend, config.path, config.device)
    return config if backend == config.backend else dataclasses.replace(config, backend=backend)


def changed_choices(config: "RunConfig") -> dict[str, str]:
    """The execution choices (path, precision, backend) this run sets away from :func:`choice_defaults`,
    in that order.  The backend is compared with what ``auto`` picks for the run's path, so
    ``--path faithful`` (which runs torch) is one change, not two."""
    config = resolved(config)
    return {key: getattr(config, key) for key, default in choice_defaults(config.device, config.path).items()
            if getattr(config, key) != default}


def variant_tags(spec: SegmenterSpec, config: "RunConfig") -> list[str]:
    """What sets this run of ``spec`` apart from the defaults (:func:`changed_choices`, in this
    process), as short tags: only the choices ``spec.choices`` honours, then the runner."""
    tags = [value for key, value in changed_choices(config).items() if key in spec.choices]
    if config.runner != RUNNER:
        tags.append(config.runner)
    return tags


def entry_name(spec: SegmenterSpec, config: "RunConfig") -> str:
    """The name a run of ``spec`` is stored and ranked under: ``l0``, ``l0[fast,bf16]``, ..."""
    tags = variant_tags(spec, config)
    return f"{spec.name}[{','.join(tags)}]" if tags else spec.name


def _gts_path(data_dir: Path, case_path: Path) -> Path | None:
    candidate = data_dir / "gts" / case_path.name
    return candidate if candidate.is_file() else None


def check_segs(segs: object, case: Case) -> np.ndarray:
    """``segs`` if it is an integer array of the case's spatial shape, else ValueError/TypeError."""
    if not isinstance(segs, np.ndarray):
        raise TypeError(f"segmenter returned {type(segs).__name__}, not a numpy array")
    if tuple(segs.shape) != tuple(case.spatial_shape):
        raise ValueError(f"segmenter returned segs of shape {segs.shape}, expected {case.spatial_shape}")
    if segs.dtype.kind not in "iub":
        raise ValueError(f"segmenter returned segs of dtype {segs.dtype}, expected integer labels")
    return segs


def _error_text(exc: BaseException, path: Path | None = None) -> str:
    """A CaseError already names its file; any other error is prefixed with ``path``."""
    if isinstance(exc, CaseError):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}"
    return f"{path}: {text}" if path is not None else text


def new_record(entry: str, segmenter: str, case_path: Path, config: RunConfig, threads: int | None,
               timing_mode: str = TIMING_MODE) -> dict:
    """The record of one (entry, case) before it runs: every field present, nothing measured yet."""
    return {
        "model": entry,
        "segmenter": segmenter,
        "case": case_path.name,
        "modality": None,
        "dim": None,
        "n_boxes": None,
        "status": "ok",
        "error": None,
        "dsc": None,
        "nsd": None,
        "dsc_per_label": None,
        "nsd_per_label": None,
        "seconds": None,
        "peak_rss_mb": None,
        "memory_method": None,
        "timing_mode": timing_mode,
        "runner": config.runner,
        "threads": threads,
        "device": config.device,
        "path": config.path,
        "precision": config.precision,
        "backend": config.backend,
        "warnings": [],
        "segs": None,
        "finished_at": None,
        "harness_version": __version__,
    }


class Stage:
    """What a case is doing now, for the error message (``while <stage>: ...``)."""

    def __init__(self, name: str = "loading the case"):
        self.name = name


def describe_case(record: dict, case: Case) -> None:
    record.update(modality=case.modality, dim=f"{case.dim}D", n_boxes=case.n_boxes, warnings=list(case.warnings))


def timed_segment(segmenter, case: Case) -> tuple[object, float, PeakRSS]:
    """The timed segmentation of one case, shared by ``harness run`` and ``harness predict``:
    ``(segs, seconds, peak)``, segs as the segmenter returned them (check them with :func:`check_segs`)."""
    with PeakRSS() as mem:
        start = time.perf_counter()
        segs = segmenter.segment(case)
        seconds = time.perf_counter() - start
    return segs, seconds, mem



def save_and_score(record: dict, case: Case, segs: np.ndarray, case_path: Path, config: RunConfig,
                   stage: Stage) -> None:
    """Write ``OUT/segs/<entry>/<case>.npz`` and score it against ``gts/<case>.npz`` where there is
    one; every runner (native, subprocess, docker) ends a case here."""
    stage.name = "writing segs"
    seg_path = config.out_dir / "segs" / record["model"] / case.name
    save_segs(seg_path, segs)
    record["segs"] = str(seg_path.relative_to(config.out_dir))
    gts_path = _gts_path(config.data_dir, case_path)
    if gts_path is not None:
        stage.name = "scoring"
        gt = load_ground_truth(gts_path, case)
        metrics = case_metrics(gt.gts, segs, spacing=gt.spacing)
        record.update(
            dsc=metrics.dsc,
            nsd=metrics.nsd,
            dsc_per_label=list(metrics.dsc_per_label),
            nsd_per_label=list(metrics.nsd_per_label),
        )
        extras = [name for name in config.metrics if name in DISTANCE_METRICS]
        if extras:
            distances = distance_metrics(gt.gts, segs, spacing=gt.spacing, metrics=extras)
            record.update({key: list(value) if key.endswith("_per_label") else value
                           for key, value in distances.items()})


def record_error(record: dict, stage: Stage, exc: BaseException, case_path: Path) -> None:
    record["status"] = "error"
    record["error"] = f"while {stage.name}: {_error_text(exc, case_path)}"
    if os.environ.get("HARNESS_DEBUG"):
        traceback.print_exc()


def finish_record(record: dict) -> dict:
    record["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return record


def run_case(segmenter, spec: SegmenterSpec, case_path: Path, config: RunConfig, threads: int) -> dict:
    """Segment, save and score one case; never raises for a problem of the case or the model."""
    record = new_record(entry_name(spec, config), spec.name, case_path, config, threads)
    stage = Stage()
    try:
        case = load_case(case_path)
        describe_case(record, case)
        stage.name = "segmenting"
        segs, seconds, mem = timed_segment(segmenter, case)
        record.update(seconds=seconds, peak_rss_mb=mem.mb, memory_method=mem.method)
        segs = check_segs(segs, case)
        save_and_score(record, case, segs, case_path, config, stage)
    except Exception as exc:  # noqa: BLE001 - one bad case never stops the run
        record_error(record, stage, exc, case_path)
    return finish_record(record)


def _model_info(spec: SegmenterSpec, described: dict, plugins: HarnessPlugins, tags: list[str]) -> dict:
    reported = dataclasses.asdict(spec.reported) if spec.reported is not None else None
    owner = next((p for p in plugins.plugins() if spec.name in p.segmenters), None)
    return {
        "segmenter": spec.name,
        "tags": tags,
        "title": spec.title,
        "family": spec.family,
        "resolution": spec.resolution,
        "reference": spec.reference,
        "plugin": owner.source if owner else None,
        "reported": reported,
        **described,
        "host": {"machine": platform.machine(), "processor": platform.processor(), "python": sys.version.split()[0]},
    }


def load_options(spec: SegmenterSpec, config: RunConfig, threads: int) -> LoadOptions:
    """What a run hands ``spec.load``; ``harness predict`` builds the same from its flags."""
    return LoadOptions(
        weights=config.weights.get(spec.name),
        device=config.device,
        threads=threads,
        weights_dir=config.weights_dir,
        all_weights=dict(config.weights),
        allow_pickle=config.allow_pickle,
        path=config.path,
        precision=config.precision,
        backend=config.backend,
    )


@dataclass
class Target:
    """One leaderboard entry to run: ``open()`` prepares it (loads the model, or builds or loads an
    image), writes its models.json entry and returns ``run_one(case_path) -> record``."""

    entry: str
    open: Callable[[], Callable[[Path], dict]]
    runner: str = RUNNER
    timing_mode: str = TIMING_MODE


def native_target(spec: SegmenterSpec, config: RunConfig, plugins: HarnessPlugins, threads: int) -> Target:
    entry = entry_name(spec, config)

    def open_() -> Callable[[Path], dict]:
        segmenter = spec.load(load_options(spec, config, threads))
        update_models(config.out_dir, entry, _model_info(spec, segmenter.describe(), plugins,
                                                         variant_tags(spec, config)))
        return lambda case_path: run_case(segmenter, spec, case_path, config, threads)

    return Target(entry, open_)


def run(config: RunConfig, plugins: HarnessPlugins | None = None, log=print) -> RunReport:
    """Run every requested model over every case of ``config.data_dir``; resumable."""
    from harness import external

    plugins = plugins or HarnessPlugins()
    config = resolved(config)  # records name the backend that ran, not "auto"
    external.check_config(config)
    specs = [plugins.get(name) for name in config.models]  # unknown names fail before any work
    for name in config.weights:  # weights for a model not run are components (a teacher's decoder)
        plugins.get(name)
    cases = discover_cases(config.data_dir, config.limit)
    if not cases:
        raise FileNotFoundError(f"{config.data_dir}: no .npz cases found (expected imgs/*.npz)")
    threads = config.threads or default_threads()
    _pin_threads(threads)
    report = RunReport()
    with ResultsStore(config.out_dir) as store:
        inflight = InFlight(config.out_dir)
        if config.runner == RUNNER:
            targets = [native_target(spec, config, plugins, threads) for spec in specs]
        else:
            targets = external.targets(specs, config, plugins, threads, log)
        for target in targets:
            entry = target.entry
            finished = store.finished(entry, include_errors=not config.retry_errors)
            pending = [c for c in cases if c.name not in finished]
            report.skipped += len(cases) - len(pending)
            if not pending:
                log(f"{entry}: all {len(cases)} cases already in {store.path}")
                continue
            try:
                run_one = target.open()
            except Exception as exc:  # noqa: BLE001 - a model that cannot load must not stop the others
                report.failed_models[entry] = _error_text(exc)
                continue
            bar = tqdm(pending, desc=entry, unit="case", disable=not config.progress, file=sys.stderr)
            for case_path in bar:
                bar.set_postfix_str(case_path.name, refresh=False)
                record = inflight.previous_crash(entry, case_path, target.runner, target.timing_mode)
                if record is None:
                    inflight.start(entry, case_path)
                    record = run_one(case_path)
                store.append(record)
                inflight.finish(entry, case_path)
                if record["status"] == "ok":
                    report.done += 1
                else:
                    report.errors += 1
                    tqdm.write(f"{entry} {case_path.name}: {record['error']}", file=sys.stderr)
            bar.close()
            del run_one  # the loaded model (native) goes with it
    return report


def _pin_threads(threads: int) -> None:
    """Pin torch's intra-op threads if torch is already loaded (segmenters that load it later pin
    it themselves from ``LoadOptions.threads``); the core never imports torch."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


class InFlight:
    """Markers of the cases being segmented right now, so that a case that kills the process
    (a segfault, the kernel's OOM killer) does not block every resumed run.

    ``OUT/.inflight/<model>/<case>`` is written before a case starts and removed once its record
    is stored. A marker found at the next start means that run died inside the case. The first
    time, the case is simply run again (the user may have pressed Ctrl-C or killed the run); if it
    is found a second time, the case is recorded as an error and the run moves on.
    """

    def __init__(self, out_dir: Path):
        self.root = out_dir / ".inflight"

    def _marker(self, model: str, case_path: Path) -> Path:
        return self.root / model / case_path.name

    def previous_crash(self, model: str, case_path: Path, runner: str = RUNNER,
                       timing_mode: str = TIMING_MODE) -> dict | None:
        """An error record if this case already died twice, else None."""
        marker = self._marker(model, case_path)
        attempts = int(marker.read_text() or 0) if marker.is_file() else 0
        if attempts < 2:
            return None
        return {
            "model": model, "case": case_path.name, "status": "error", "timing_mode": timing_mode,
            "runner": runner, "harness_version": __version__,
            "error": f"{case_path}: the harness process died while segmenting this case, {attempts} times "
                     "(killed or crashed, e.g. out of memory); use --retry-errors to try again",
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def start(self, model: str, case_path: Path) -> None:
        marker = self._marker(model, case_path)
        marker.parent.mkdir(parents=True, exist_ok=True)
        attempts = int(marker.read_text() or 0) if marker.is_file() else 0
        marker.write_text(str(attempts + 1))

    def finish(self, model: str, case_path: Path) -> None:
        self._marker(model, case_path).unlink(missing_ok=True)
