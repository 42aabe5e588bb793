"""The native runner (the default): every case segmented in this process, the model loaded once.

Timing mode ``in-process``: a case's ``seconds`` is the wall time of its segmentation alone
(``Segmenter.segment``: preprocessing, encoder, decoder, postprocessing), not reading the npz, writing
segs or scoring; ``peak_rss_mb`` is the process's peak RSS during that segmentation
(:mod:`harness.profiling`).

Isolated (``--isolate``, and whenever ``--timeout`` or ``--memory`` is given): the segmenter runs in a
worker process instead (:mod:`harness.runners.isolated`), timed there the same way, so that ``os._exit``,
a crash, a hang or a runaway allocation ends only that case. In this process a segmenter's ``sys.exit``
is an error record of its case; ``os._exit`` or a crash ends the run (then the in-flight markers of
:mod:`harness.run` take over).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from harness.cases import load_case
from harness.choices import entry_name, resolved_backend, variant_tags
from harness.results import update_models
from harness.runners.base import FunctionSession, Runner, Session, Target
from harness.runners.isolated import IsolatedSession
from harness.runners.limits import Limits
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
    timed_segment,
)

if TYPE_CHECKING:
    from harness.pluginmanager import HarnessPlugins
    from harness.run import RunConfig
    from harness.plugin_api import SegmenterSpec

TIMING_MODE = "in-process"


def run_case(segmenter, entry: str, spec: "SegmenterSpec", case_path: Path, config: "RunConfig", threads: int,
             backend: str | None = None) -> dict:
    """Segment, save and score one case in this process; never raises for a problem of the case or the model."""
    record = new_record(entry, spec.name, case_path, config, threads, TIMING_MODE, backend)
    stage = Stage()
    try:
        case = load_case(case_path)
        describe_case(record, case)
        stage.name = "segmenting"
        segs, seconds, mem = timed_segment(segmenter, case)
        record.update(seconds=seconds, peak_rss_mb=mem.mb, memory_method=mem.method)
        segs = check_segs(segs, case)
        save_and_score(record, case, segs, case_path, config, stage)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - one bad case never stops the run
        record_error(record, stage, exc, case_path)
    return finish_record(record)


def run_isolated_case(session: "IsolatedSession", entry: str, spec: "SegmenterSpec", case_path: Path,
                      config: "RunConfig", threads: int, backend: str | None) -> dict:
    """:func:`run_case` with the segmentation in the session's worker: the same steps, timing and record,
    plus the limits it ran under; never raises for a problem of the case, the model or the worker."""
    record = new_record(entry, spec.name, case_path, config, threads, TIMING_MODE, backend)
    record.update(isolated=True, **session.limits.record_fields())
    stage = Stage()
    try:
        case = load_case(case_path)
        describe_case(record, case)
        stage.name = "segmenting"
        done = session.segment(case, case_path)
        record.update(seconds=done.seconds, peak_rss_mb=done.peak_rss_mb, memory_method=done.memory_method)
        segs = check_segs(done.segs, case)
        save_and_score(record, case, segs, case_path, config, stage)
    except Exception as exc:  # noqa: BLE001 - one bad case never stops the run
        record_error(record, stage, exc, case_path)
    return finish_record(record)


def isolated(config: "RunConfig") -> bool:
    """Whether a native run segments in an isolated worker: asked for, or needed for a limit."""
    return bool(config.isolate or config.timeout is not None or config.memory)


def ran_on(spec: "SegmenterSpec", described: dict, config: "RunConfig") -> str | None:
    """The backend a loaded segmenter runs on: what it says (torch after an ``auto`` fallback), else what
    the run's backend resolves to; None for a segmenter without that choice (a baseline)."""
    if described.get("backend"):
        return str(described["backend"])
    return resolved_backend(config) if "backend" in spec.choices else None


class NativeRunner(Runner):
    name = "native"
    timing_mode = TIMING_MODE
    label = "in-process"
    order = 0
    description = ("in this process, or in an isolated worker process with --isolate, --timeout or --memory; a "
                   "case's time is its segmentation (the model loaded once)")

    def check(self, config) -> None:
        Limits.of(config)  # a bad --timeout or --memory stops the run before any work

    def targets(self, specs, config, plugins: "HarnessPlugins", threads: int, log=print) -> list[Target]:
        return [self._target(spec, config, plugins, threads) for spec in specs]

    def _target(self, spec: "SegmenterSpec", config: "RunConfig", plugins: "HarnessPlugins", threads: int) -> Target:
        entry = entry_name(spec, config)

        def open_() -> Session:
            if isolated(config):
                return open_isolated()
            segmenter = spec.load(load_options(spec, config, threads))
            described = segmenter.describe()
            update_models(config.out_dir, entry, model_info(spec, described, plugins, variant_tags(spec, config)))
            backend = ran_on(spec, described, config)
            return FunctionSession(lambda case_path: run_case(segmenter, entry, spec, case_path, config, threads,
                                                              backend))

        def open_isolated() -> IsolatedSession:
            session = IsolatedSession(spec.name, load_options(spec, config, threads), Limits.of(config),
                                      lambda s, case_path: run_isolated_case(s, entry, spec, case_path, config,
                                                                             threads, backend))
            try:
                described = session.described
                update_models(config.out_dir, entry, model_info(spec, described, plugins, variant_tags(spec, config)))
                backend = ran_on(spec, described, config)
            except BaseException:
                session.close()
                raise
            return session

        return Target(entry, open_, runner=self.name, timing_mode=self.timing_mode)
