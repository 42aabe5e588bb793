"""``harness run --protocol interactive``: the 2025 interactive protocol through the run driver.

This is a thin layer over :func:`harness.run.run`: the driver's results store, resume, in-flight markers
and per-case error records are used as they are; what changes is how one (model, case) pair runs. For
each pair, :func:`harness.interactive.protocol.run_interactive_case` runs the box step and ``--clicks``
click steps (default 5) with a step function; the native runner's step function (an external runner's
starts ``harness predict`` or a container instead, which does the same in that process)

1. reads the step's rewritten input file with the restricted reader
   (:func:`harness.interactive.safe_npz.read_interactive_input`);
2. builds a harness :class:`~harness.cases.Case`: box ``i`` (the ``i``-th per-class dict) becomes
   ``[x_min, y_min, z_min, x_max, y_max, z_max]`` = ``[z_mid_x_min, z_mid_y_min, z_min, z_mid_x_max,
   z_mid_y_max, z_max]`` (the x/y extent the dict gives for its middle slice, over its z range), so the
   segmenter labels class ``i`` as ``i + 1``; for a segmenter that declares ``"points"``
   (:attr:`harness.plugin_api.SegmenterSpec.prompts`), ``Case.clicks`` holds each class's clicks in the order
   given (``clicks_order``), and for one that declares ``"mask"``, ``Case.prev_segs`` the previous step's
   segmentation; a box-only segmenter gets neither, so it returns the same segs at every step;
3. calls the loaded segmenter, timed as the native runner times a case (the segmentation alone, with the
   process's peak RSS), and returns its checked segs.

The DATA folder holds 2025-format inputs and their ground truth, as ``harness convert --to interactive``
writes them: ``DATA/imgs/<case>.npz`` (``imgs``, ``spacing``, per-class ``boxes``) and
``DATA/gts/<case>.npz`` (``gts``). Ground truth is read by the harness alone: it never enters the
per-step input. A case without boxes fails at its first click step (the harness segmenters need a box
per class), an error row naming the case.

One record per (entry, case) in ``OUT/results.jsonl``, entry ``<model>[interactive]``, with
``protocol: "interactive"``; besides the usual fields: ``n_clicks``, ``steps`` (per step: the clicks
given before it, per class ``label``, ``kind`` fg/bg, ``z``, ``y``, ``x`` or null for a class already
perfect; DSC and NSD overall and per class; seconds), ``dsc_per_step``, ``nsd_per_step``, ``dsc_auc``,
``nsd_auc``, ``dsc``/``nsd`` (the final step's), ``seconds_per_step`` (segmentation only),
``seconds`` (their sum), ``step_wall_seconds`` (each step's wall time as the protocol loop measured it:
reading the input and building the case included), ``peak_rss_mb`` (the largest of the steps),
``time_cap_seconds`` and ``cap_exceeded`` (the 90 s-per-class cap of the test phase, on ``seconds``).
``OUT/segs/<entry>/<case>.npz`` holds ``segs`` (the last step's) and ``all_segs`` (one per step).

Resume is per case: a case is recorded only when all its steps ran; an interrupted case is run again
from step 1 (its working folder ``OUT/.interactive/<entry>/<case>/`` is cleared first and removed once
its record is stored).

Runners: ``--runner native`` (the default: :class:`InteractiveRunner`, the model loaded once in this
process, each step timed as the native runner times a case), ``--runner subprocess`` and ``--runner
docker`` / ``--image`` (:mod:`harness.interactive.external`: each step one fresh ``harness predict``
process or container on the step's input file alone, as the official evaluator runs it, timed end to
end; ``-m 32G`` for docker unless ``--memory`` is given). :func:`interactive_runner` picks one;
:func:`protocol_record` is the part they share.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from harness.cases import Case, CaseError, as_uint8_image, modality_from_name
from harness.choices import entry_name, variant_tags
from harness.interactive.protocol import DEFAULT_CLICKS, InteractiveStepError, run_interactive_case
from harness.interactive.safe_npz import InteractiveInput, read_interactive_input
from harness.interactive.scores import cap_exceeded
from harness.results import update_models
from harness.runners.base import FunctionSession, Runner, RunnerError, Session, Target
from harness.runners.case import (
    Stage,
    check_segs,
    finish_record,
    load_options,
    model_info,
    new_record,
    record_error,
    timed_segment,
)
from harness.runners.native import TIMING_MODE, ran_on

if TYPE_CHECKING:
    from harness.pluginmanager import HarnessPlugins
    from harness.run import RunConfig
    from harness.plugin_api import SegmenterSpec

__all__ = ["PROTOCOLS", "PROTOCOL_RUNNERS", "InteractiveRunner", "interactive_runner", "check_protocol",
           "case_from_input", "run_interactive_record", "protocol_record", "accepted_prompts"]

#: ``harness run --protocol``: the 2024 one-box protocol (default) and the 2025 interactive one.
PROTOCOLS = ("standard", "interactive")
WORK_DIR = ".interactive"


def accepted_prompts(spec: "SegmenterSpec", segmenter: object = None) -> frozenset[str]:
    """What a segmenter uses of a case: its spec's ``prompts``, or the loaded object's ``prompts``
    attribute where it has one (a segmenter whose backend cannot take points says so there)."""
    own = getattr(segmenter, "prompts", None)
    if own is not None:
        return frozenset(own)
    return frozenset(getattr(spec, "prompts", None) or {"box"})


def _ordered_clicks(inp: InteractiveInput, n_classes: int) -> dict[int, list[tuple[int, int, int, bool]]]:
    """Per label (``i + 1``), the class's clicks in the order given: ``clicks_order`` says which list
    (fg or bg) each step's click came from; without it, the foreground clicks, then the background ones."""
    out: dict[int, list[tuple[int, int, int, bool]]] = {}
    for i, entry in enumerate((inp.clicks or [])[:n_classes]):
        fg, bg = list(entry.get("fg", [])), list(entry.get("bg", []))
        order = inp.clicks_order[i] if inp.clicks_order and i < len(inp.clicks_order) else None
        seq: list[tuple[int, int, int, bool]] = []
        if order is not None:
            for kind in order:
                source = fg if kind == "fg" else bg if kind == "bg" else None
                if source:
                    z, y, x = source.pop(0)
                    seq.append((int(z), int(y), int(x), kind == "fg"))
        seq += [(int(z), int(y), int(x), True) for z, y, x in fg]
        seq += [(int(z), int(y), int(x), False) for z, y, x in bg]
        if seq:
            out[i + 1] = seq
    return out


def case_from_input(inp: InteractiveInput, prompts: frozenset[str] = frozenset({"box"})) -> Case:
    """The harness :class:`Case` of one step's input (see the module docstring); ``prompts`` decides
    whether clicks and the previous mask are passed on. CaseError (naming the file) for an input the
    harness segmenters cannot take: no boxes, an image outside 0..255."""
    path = inp.path
    if not inp.boxes:
        raise CaseError(path, "no boxes: the harness segmenters need a box per class")
    boxes = np.array([[b["z_mid_x_min"], b["z_mid_y_min"], b["z_min"], b["z_mid_x_max"], b["z_mid_y_max"],
                       b["z_max"]] for b in inp.boxes], dtype=np.int64)
    warnings: list[str] = []
    imgs = as_uint8_image(inp.imgs, path, warnings)
    clicks = _ordered_clicks(inp, len(boxes)) if "points" in prompts and inp.clicks else None
    prev = None
    if "mask" in prompts and inp.prev_pred is not None:
        prev = np.asarray(inp.prev_pred)
    return Case(name=path.name, path=path, dim=3, modality=modality_from_name(path.name),
                imgs=np.ascontiguousarray(imgs), boxes=boxes, spacing=tuple(inp.spacing), warnings=tuple(warnings),
                clicks=clicks, prev_segs=prev)


def run_interactive_record(segmenter, entry: str, spec: "SegmenterSpec", case_path: Path, config: "RunConfig",
                           threads: int, backend: str | None) -> dict:
    """Run one case through the protocol with a loaded segmenter; the record (an error record for a bad
    case, a failing step or a segmenter error: never raises for those)."""
    record = new_record(entry, spec.name, case_path, config, threads, TIMING_MODE, backend)
    prompts = accepted_prompts(spec, segmenter)
    record.update(prompts=sorted(prompts))
    timings: list[tuple[float, float | None, str | None]] = []
    described: dict = {}

    def step(input_path: Path, outputs_dir: Path) -> np.ndarray:
        inp = read_interactive_input(input_path)
        case = case_from_input(inp, prompts)
        if not described:
            described.update(n_boxes=case.n_boxes, warnings=list(case.warnings))
        segs, seconds, mem = timed_segment(segmenter, case)
        timings.append((seconds, mem.mb, mem.method))
        return check_segs(segs, case)

    return protocol_record(record, entry, case_path, config, step, timings, described)


def protocol_record(record: dict, entry: str, case_path: Path, config: "RunConfig", step, timings: list,
                    described: dict) -> dict:
    """Run ``case_path`` through the protocol's steps with ``step`` (a
    :data:`~harness.interactive.protocol.StepFunction` that appends ``(seconds, peak_mb, memory_method)`` to
    ``timings`` for each step it runs) and complete ``record`` (from :func:`new_record`) with the protocol's
    fields; ``described``: fields the step function learnt of the case (``n_boxes``, ``warnings``). An
    error record for a bad case or a failing step, naming the step: never raises for those. Every runner
    of the protocol (native, subprocess, docker) ends a case here."""
    n_clicks = int(getattr(config, "clicks", DEFAULT_CLICKS))
    record.update(protocol="interactive", n_clicks=n_clicks, modality=modality_from_name(case_path.name), dim="3D")
    stage = Stage("running the interactive protocol")
    work = config.out_dir / WORK_DIR / entry / case_path.name
    try:
        gts_path = config.data_dir / "gts" / case_path.name
        if not (gts_path.is_file() or gts_path.is_symlink()):
            raise CaseError(gts_path, "no ground truth for this case: the interactive protocol scores every step "
                                      "(harness convert --to interactive writes DATA/gts/)")
        shutil.rmtree(work, ignore_errors=True)  # an interrupted attempt: always from step 1
        seg_path = config.out_dir / "segs" / entry / case_path.name
        result = run_interactive_case(case_path, gts_path, step, work, n_clicks=n_clicks, save_segs=seg_path)
    except InteractiveStepError as exc:
        cause = exc.__cause__
        if isinstance(cause, CaseError):  # the step's input: name the file and its problem
            record_error(record, Stage(f"running the interactive protocol, step {exc.step}"), cause, case_path)
        else:
            record.update(status="error", error=f"while running the interactive protocol, step {exc.step}: "
                                                f"{case_path}: {exc.problem}")
        return finish_record(record)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - one bad case never stops the run
        record_error(record, stage, exc, case_path)
        return finish_record(record)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for folder in (work.parent, work.parent.parent):  # the entry's and the protocol's folders, once empty
            try:
                folder.rmdir()
            except OSError:
                break

    out = result.to_dict()
    ran = [s for s in result.steps if not s.skipped]
    seconds_per_step = []
    it = iter(timings)
    for s in result.steps:
        seconds_per_step.append(0.0 if s.skipped else next(it)[0])
    peaks = [t[1] for t in timings if t[1] is not None]
    total = float(sum(seconds_per_step))
    last = ran[-1] if ran else result.steps[-1]
    record.update(
        described,
        labels=out["labels"],
        steps=out["steps"],
        dsc_per_step=out["dsc_per_step"],
        nsd_per_step=out["nsd_per_step"],
        dsc_auc=out["dsc_auc"],
        nsd_auc=out["nsd_auc"],
        dsc=out["dsc_final"],
        nsd=out["nsd_final"],
        dsc_per_label=list(last.dsc_per_class),
        nsd_per_label=list(last.nsd_per_class),
        seconds_per_step=seconds_per_step,
        seconds=total,
        step_wall_seconds=out["seconds_per_step"],
        peak_rss_mb=max(peaks) if peaks else None,
        memory_method=timings[0][2] if timings else None,
        time_cap_seconds=out["time_cap_seconds"],
        cap_exceeded=cap_exceeded(total, len(result.labels)),
        had_boxes=out["had_boxes"],
        segs=str(seg_path.relative_to(config.out_dir)),
    )
    flagged = [s.step for s in result.steps if s.missing_output or s.stale_output]
    if flagged:
        record["warnings"] = [*record["warnings"], f"steps {flagged}: no new output was written"]
    return finish_record(record)


#: The runners that run the protocol: native (:class:`InteractiveRunner`), subprocess and docker
#: (:mod:`harness.interactive.external`: one process or container per step).
PROTOCOL_RUNNERS = ("native", "subprocess", "docker")


def check_protocol(config: "RunConfig") -> None:
    """The protocol's own settings, whatever the runner: no ``--box-jitter``, a whole ``--clicks``."""
    if getattr(config, "box_jitter", None) is not None:
        raise RunnerError("--box-jitter and --protocol interactive cannot be combined (the protocol's boxes "
                          "come with its inputs)")
    clicks = getattr(config, "clicks", DEFAULT_CLICKS)
    if not isinstance(clicks, int) or clicks < 0:
        raise RunnerError(f"--clicks {clicks!r}: expected a whole number of click steps, 0 or more")


def interactive_runner(config: "RunConfig") -> Runner:
    """The runner of ``--protocol interactive`` for ``config.runner``, not yet checked: native
    (:class:`InteractiveRunner`), subprocess or docker (one process / container per step,
    :mod:`harness.interactive.external`); RunnerError for any other, and for ``--image`` without docker."""
    if config.runner not in PROTOCOL_RUNNERS:
        raise RunnerError(f"--protocol interactive runs with --runner {', '.join(PROTOCOL_RUNNERS[:-1])} or "
                          f"{PROTOCOL_RUNNERS[-1]}, not {config.runner}")
    if getattr(config, "image", None) and config.runner != "docker":
        raise RunnerError(f"--image runs a docker image; it needs --runner docker, not {config.runner}")
    if config.runner == "native":
        return InteractiveRunner()
    from harness.interactive.external import InteractiveDockerRunner, InteractiveSubprocessRunner

    return InteractiveSubprocessRunner() if config.runner == "subprocess" else InteractiveDockerRunner()


class InteractiveRunner(Runner):
    """The native runner for ``--protocol interactive``: the model loaded once in this process, each case
    run through the protocol's steps (:func:`run_interactive_record`)."""

    name = "native"
    timing_mode = TIMING_MODE
    label = "in-process"
    order = 0
    description = "the 2025 interactive protocol in this process (box step, then one step per click)"

    def check(self, config: "RunConfig") -> None:
        if config.runner != "native":
            raise RunnerError(f"the native protocol runner cannot run --runner {config.runner}")
        if config.isolate or config.timeout is not None or config.memory:
            raise RunnerError("--protocol interactive with the native runner runs in this process: --isolate, "
                              "--timeout and --memory are not supported with it (--runner subprocess or docker "
                              "take --timeout and --memory, per step)")
        check_protocol(config)

    def targets(self, specs, config, plugins: "HarnessPlugins", threads: int, log=print) -> list[Target]:
        return [self._target(spec, config, plugins, threads) for spec in specs]

    def _target(self, spec: "SegmenterSpec", config: "RunConfig", plugins: "HarnessPlugins", threads: int) -> Target:
        entry = entry_name(spec, config)

        def open_() -> Session:
            segmenter = spec.load(load_options(spec, config, threads))
            described = segmenter.describe()
            info = model_info(spec, described, plugins, variant_tags(spec, config))
            info.update(protocol="interactive", n_clicks=config.clicks,
                        prompts=sorted(accepted_prompts(spec, segmenter)))
            update_models(config.out_dir, entry, info)
            backend = ran_on(spec, described, config)
            return FunctionSession(lambda case_path: run_interactive_record(segmenter, entry, spec, case_path, config,
                                                                            threads, backend))

        return Target(entry, open_, runner=self.name, timing_mode=self.timing_mode)

