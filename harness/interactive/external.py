"""``harness run --protocol interactive --runner subprocess|docker`` (and ``--image``): the 2025 protocol
run end to end, one fresh process or container per step, as the official evaluator runs it.

The evaluator (repository JunMa11/CVPR-MedSegFMCompetition, ``CVPR25_iter_eval.py``) starts a fresh
container for each of a case's 6 steps, with the step's rewritten input file alone in the folder mounted
at ``/workspace/inputs`` and ``/workspace/outputs`` for the output, and runs ``sh predict.sh``. Here each
step, called by :func:`harness.interactive.protocol.run_interactive_case` (which writes the step's input:
``imgs``, ``spacing``, ``boxes``, ``clicks``, ``clicks_order``, ``prev_pred``), is one
:meth:`Executor.execute <harness.runners.external.Executor.execute>` call:

* a fresh case folder (:func:`harness.runners.external.case_folders`: in ``OUT`` for the subprocess
  runner, in the system's temporary folder for docker) whose ``inputs`` holds a copy of the step's input
  file alone and whose ``outputs`` is empty;
* the subprocess runner starts ``harness predict`` on it (which reads 2025 inputs with the restricted
  reader, :mod:`harness.predict`); the docker runner starts the image's ``/bin/bash -c "sh predict.sh"``
  with the inputs mounted read-only at ``/workspace/inputs/`` and the outputs at ``/workspace/outputs/``,
  no network, ``-m 32G`` (the 2025 evaluator's memory limit) unless ``--memory`` is given;
* ``outputs/<case>.npz`` is read back and checked (present under the case's name, key ``segs``, the
  image's shape, integer labels) and handed to the protocol, which scores it and keeps it as the previous
  prediction of the next step.

A step whose process or container fails (exit status, memory limit, ``--timeout``, which applies per
step), or that writes no output or a wrong one, makes the case an error row naming the step and the
problem, with the log's tail (the evaluator would score a missing output as an empty prediction: the
harness says instead that the image misbehaved). Seconds per step are the end-to-end times of each run
(timing mode ``end-to-end``: start, imports, model load, inference, writing), their sum is the case's
``seconds`` that the 90 s-per-class cap is checked against; the peak memory is the largest of the steps'
peaks, measured as the runner measures a case (the child's VmHWM, or the container cgroup's peak).
``exit_codes`` lists each step's exit status. Records, segs, resume (a case interrupted mid-steps runs
again from step 1) and the entry's name (``<model>[subprocess,interactive]``,
``<model>[docker,interactive]``, ``<image>[interactive]`` for a foreign image) are otherwise those of the
native protocol runner (:mod:`harness.interactive.run`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from harness.interactive.run import check_protocol, protocol_record
from harness.interactive.safe_npz import read_pickled_key, stored_shape
from harness.runners.base import CaseRunError
from harness.runners.case import new_record
from harness.runners.docker import DockerRunner
from harness.runners.external import TIMING_MODE, case_folders, executor_fields, read_named_output
from harness.runners.subprocess import SubprocessRunner

if TYPE_CHECKING:
    from harness.run import RunConfig

__all__ = ["INTERACTIVE_MEMORY", "InteractiveSubprocessRunner", "InteractiveDockerRunner",
           "run_interactive_external_record"]

#: The 2025 evaluator's container memory limit (``-m 32G``), the docker default with this protocol.
INTERACTIVE_MEMORY = "32G"


def run_interactive_external_record(executor, entry: str, segmenter: str, case_path: Path, config: "RunConfig",
                                    threads: int | None, prompts: list[str] | None = None) -> dict:
    """Run one case through the protocol's steps, each step one ``executor`` run in fresh folders; the
    record (an error record for a bad case or a failing step: never raises for those)."""
    record = new_record(entry, segmenter, case_path, config, threads, timing_mode=TIMING_MODE)
    executor_fields(record, executor, config)
    if prompts is not None:
        record["prompts"] = prompts
    timings: list[tuple[float, float | None, str | None]] = []
    exit_codes: list[int | None] = []
    record["exit_codes"] = exit_codes  # filled as the steps run
    described: dict = {}
    shape: list[tuple[int, ...]] = []

    def step(input_path: Path, outputs_dir: Path) -> np.ndarray:
        if not shape:
            boxes = read_pickled_key(input_path, "boxes")
            described.update(n_boxes=0 if boxes is None else int(boxes.size), warnings=[])
            shape.append(stored_shape(input_path, "imgs"))
        with case_folders(executor, input_path) as (work, inputs, outputs):
            outcome = executor.execute(inputs, outputs, work)
            timings.append((outcome.seconds, outcome.peak_mb, outcome.memory_method))
            exit_codes.append(outcome.exit_code)
            if outcome.problem:
                raise CaseRunError(case_path, outcome.problem)
            return read_named_output(outputs, input_path.name, shape[0], case_path, executor.what)

    record = protocol_record(record, entry, case_path, config, step, timings, described)
    if exit_codes:
        record["exit_code"] = exit_codes[-1]
    return record


def _protocol_facts(config, spec=None) -> dict:
    return {"protocol": "interactive", "n_clicks": config.clicks}


def _case_function(executor, entry: str, segmenter: str, config, threads: int, info: dict | None):
    """Each case through the protocol's steps; ``info["prompts"]``: what the loaded segmenter takes, as
    ``harness predict`` loads it (None for a foreign image)."""
    prompts = (info or {}).get("prompts")
    return lambda case_path: run_interactive_external_record(executor, entry, segmenter, case_path, config, threads,
                                                             prompts)


class InteractiveSubprocessRunner(SubprocessRunner):
    """``--protocol interactive --runner subprocess``: one ``harness predict`` process per step."""

    description = "the 2025 interactive protocol, one `harness predict` process per step, timed end to end"
    describe_prompts = True

    def check(self, config) -> None:
        super().check(config)
        check_protocol(config)

    def case_function(self, executor, entry, segmenter, config, threads, spec=None, info=None):
        return _case_function(executor, entry, segmenter, config, threads, info)

    def entry_facts(self, config, spec=None) -> dict:
        return _protocol_facts(config, spec)


class InteractiveDockerRunner(DockerRunner):
    """``--protocol interactive --runner docker`` (or ``--image``): one container per step, ``-m 32G``
    unless ``--memory`` is given."""

    description = "the 2025 interactive protocol, one container per step (`sh predict.sh`), timed end to end"
    default_memory = INTERACTIVE_MEMORY
    describe_prompts = True

    def check(self, config) -> None:
        super().check(config)
        check_protocol(config)

    def case_function(self, executor, entry, segmenter, config, threads, spec=None, info=None):
        return _case_function(executor, entry, segmenter, config, threads, info)

    def entry_facts(self, config, spec=None) -> dict:
        return _protocol_facts(config, spec)

    def foreign_entry(self, tag: str, known: set[str], config) -> str:
        name = super().foreign_entry(tag, known, config)  # NAME or NAME[docker]
        return f"{name[:-1]},interactive]" if name.endswith("]") else f"{name}[interactive]"
