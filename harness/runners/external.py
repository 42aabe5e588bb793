"""What the end-to-end runners (``subprocess``, ``docker``, and plugins of that kind) share.

For each case, as the challenge's ``CVPR24_time_eval.py`` does: a fresh inputs folder holding that one
case, a fresh outputs folder, then one run of the segmenter over them by an *executor*, timed by the wall
clock around the whole run (timing mode ``end-to-end``: process or container start, imports, model load,
reading the case, inference and writing the output all count). Then ``OUTPUT/<case>.npz`` is read and
checked (present under the case's name, key ``segs``, the case's spatial shape, integer labels) and
saved and scored exactly as the native runner does (:func:`harness.runners.case.save_and_score`).

A non-zero exit (with the tail of the log), a kill at the memory limit, a timeout, a missing or
misnamed output and a wrong shape or dtype are each an error record naming the case file; the run
goes on.

The 2025 interactive protocol runs each step of a case this way (:mod:`harness.interactive.external`:
:func:`case_folders`, :func:`read_named_output`, the runners' ``case_function`` hook).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Protocol

import numpy as np

from harness.atomic import TEMP_SUFFIX
from harness.cases import Case, CaseError, load_case, load_segs
from harness.runners.base import CaseRunError
from harness.runners.case import (
    Stage,
    describe_case,
    finish_record,
    load_options,
    model_info,
    new_record,
    record_error,
    save_and_score,
)

if TYPE_CHECKING:
    from harness.pluginmanager import HarnessPlugins
    from harness.run import RunConfig
    from harness.plugin_api import SegmenterSpec

TIMING_MODE = "end-to-end"
LOG_TAIL_CHARS = 1500


@dataclass
class Outcome:
    """What one external run of one case gave: the timed wall clock, the exit, memory, the log."""

    seconds: float
    exit_code: int | None
    peak_mb: float | None
    memory_method: str | None
    log: str = ""
    problem: str | None = None  # None: it exited 0 in time


class Executor(Protocol):
    """Runs the segmenter once over an inputs folder holding one case, into an outputs folder."""

    runner: str
    what: str

    def execute(self, inputs: Path, outputs: Path, work: Path) -> Outcome:  # pragma: no cover - protocol
        ...


def log_tail(text: str, limit: int = LOG_TAIL_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def with_log(problem: str, log: str) -> str:
    tail = log_tail(log)
    return f"{problem}; log tail:\n{tail}" if tail else f"{problem} (no log output)"


def read_output(outputs: Path, case: Case, case_path: Path, what: str) -> np.ndarray:
    """``OUTPUT/<case>.npz``, checked: present under the case's name, key ``segs``, the case's spatial
    shape, integer labels. Raises :class:`CaseRunError` naming the case file."""
    return read_named_output(outputs, case.name, case.spatial_shape, case_path, what)


def read_named_output(outputs: Path, name: str, shape, case_path: Path, what: str) -> np.ndarray:
    """:func:`read_output` for a file ``name`` of spatial shape ``shape``."""
    target = outputs / name
    if not target.is_file():
        found = sorted(p.name for p in outputs.iterdir() if not p.name.startswith("."))
        listing = f"it wrote {', '.join(found)}" if found else "the outputs folder is empty"
        raise CaseRunError(case_path, f"{what} wrote no output named {name} ({listing})")
    try:
        return load_segs(target, tuple(shape))
    except CaseError as exc:
        raise CaseRunError(case_path, f"output {name} of {what}: {exc.problem}") from None


def executor_fields(record: dict, executor, config) -> None:
    """What a record of ``executor`` says of its limits: the image and memory limit of a container, the
    timeout, the subprocess runner's ``--memory``."""
    if executor.runner == "docker":
        record.update(image=executor.image, memory_limit=executor.memory)
    if config.timeout:
        record["timeout_s"] = config.timeout
    if getattr(executor, "limits", None) is not None:  # the subprocess runner's --memory (RLIMIT_AS)
        record.update(executor.limits.record_fields())


@contextmanager
def case_folders(executor, case_file: Path, name: str | None = None) -> Iterator[tuple[Path, Path, Path]]:
    """``(work, inputs, outputs)``: a fresh folder (:func:`_case_folder`) whose ``inputs`` holds a copy of
    ``case_file`` alone (as ``name``, default its own name) and whose ``outputs`` is empty, readable and
    writable by an image's non-root user; removed afterwards."""
    with _case_folder(getattr(executor, "work_dir", None)) as tmp:
        work = Path(tmp)
        inputs, outputs = work / "inputs", work / "outputs"
        inputs.mkdir()
        outputs.mkdir()
        target = inputs / (name or case_file.name)
        shutil.copyfile(case_file, target)
        # an image's non-root user must read the case and write its output
        inputs.chmod(0o755)
        target.chmod(0o644)
        outputs.chmod(0o777)
        yield work, inputs, outputs


def run_external_case(executor, entry: str, segmenter: str, case_path: Path, config, threads: int | None) -> dict:
    """One case through ``executor`` in fresh inputs/outputs folders; saved and scored as the native
    runner does. Never raises for a problem of the case, the model or the image."""
    record = new_record(entry, segmenter, case_path, config, threads, timing_mode=TIMING_MODE)
    executor_fields(record, executor, config)
    stage = Stage()
    try:
        case = load_case(case_path)
        describe_case(record, case)
        stage.name = f"running {executor.what}"
        with case_folders(executor, case_path) as (work, inputs, outputs):
            outcome = executor.execute(inputs, outputs, work)
            record.update(seconds=outcome.seconds, peak_rss_mb=outcome.peak_mb, memory_method=outcome.memory_method,
                          exit_code=outcome.exit_code)
            if outcome.problem:
                raise CaseRunError(case_path, outcome.problem)
            stage.name = f"reading the output of {executor.what}"
            segs = read_output(outputs, case, case_path, executor.what)
        save_and_score(record, case, segs, case_path, config, stage)
    except Exception as exc:  # noqa: BLE001 - one bad case never stops the run
        record_error(record, stage, exc, case_path)
    return finish_record(record)


def _case_folder(parent: Path | None) -> tempfile.TemporaryDirectory:
    """A case's fresh folder: in the system's temporary folder, or in ``parent`` (an executor's
    ``work_dir``) under a name of the harness's own, which a later run there sweeps if this process is
    killed before removing it (:func:`harness.atomic.sweep_temp_files`)."""
    if parent is None:
        return tempfile.TemporaryDirectory(prefix="harness-case-", ignore_cleanup_errors=True)
    Path(parent).mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f".case.{os.getpid()}-", suffix=TEMP_SUFFIX, dir=parent,
                                       ignore_cleanup_errors=True)


def describe_model(spec: SegmenterSpec, config: RunConfig, plugins: HarnessPlugins, threads: int,
                   tags: list[str], prompts: bool = False) -> dict:
    """The models.json entry of ``spec``: loaded once here, as the native runner does, for its facts
    (parameters, FLOPs, weights and their checksum); the model is freed before any case runs. With
    ``prompts``, also the prompts the loaded segmenter takes (``prompts``: its own attribute, else its
    spec's; what ``harness predict`` gives it of a 2025 input)."""
    segmenter = spec.load(load_options(spec, config, threads))
    try:
        info = model_info(spec, segmenter.describe(), plugins, tags)
        if prompts:
            from harness.interactive.run import accepted_prompts

            info["prompts"] = sorted(accepted_prompts(spec, segmenter))
        return info
    finally:
        del segmenter
