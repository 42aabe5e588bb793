"""The native runner (the default): every case segmented in this process, the model loaded once.

Timing mode ``in-process``: a case's ``seconds`` is the wall time of its segmentation alone
(``Segmenter.segment``: preprocessing, encoder, decoder, postprocessing), not reading the npz, writing
segs or scoring; ``peak_rss_mb`` is the process's peak RSS during that segmentation
(:mod:`harness.profiling`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from harness.cases import load_case
from harness.choices import entry_name, resolved_backend, variant_tags
from harness.results import update_models
from harness.runners.base import FunctionSession, Runner, RunnerError, Target
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
    from harness.specs import SegmenterSpec

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
    except Exception as exc:  # noqa: BLE001 - one bad case never stops the run
        record_error(record, stage, exc, case_path)
    return finish_record(record)


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
    description = "in this process; a case's time is its segmentation (the model loaded once)"

    def check(self, config) -> None:
        if config.timeout is not None:
            raise RunnerError("--timeout needs --runner subprocess or docker (a native run cannot stop a case "
                              "inside its own process)")

    def targets(self, specs, config, plugins: "HarnessPlugins", threads: int, log=print) -> list[Target]:
        return [self._target(spec, config, plugins, threads) for spec in specs]

    def _target(self, spec: "SegmenterSpec", config: "RunConfig", plugins: "HarnessPlugins", threads: int) -> Target:
        entry = entry_name(spec, config)

        def open_() -> FunctionSession:
            segmenter = spec.load(load_options(spec, config, threads))
            described = segmenter.describe()
            update_models(config.out_dir, entry, model_info(spec, described, plugins, variant_tags(spec, config)))
            backend = ran_on(spec, described, config)
            return FunctionSession(lambda case_path: run_case(segmenter, entry, spec, case_path, config, threads,
                                                              backend))

        return Target(entry, open_, runner=self.name, timing_mode=self.timing_mode)
