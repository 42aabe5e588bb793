"""The 2025 interactive protocol for one case, independent of how a segmenter is run.

:func:`run_interactive_case` does for one case what the official evaluator (repository
JunMa11/CVPR-MedSegFMCompetition, ``CVPR25_iter_eval.py``) does around its container runs:

* it works in ``work_dir/inputs/<name>.npz`` and ``work_dir/outputs/<name>.npz`` (the folders the
  evaluator mounts as ``/workspace/inputs`` and ``/workspace/outputs``); the outputs folder persists
  across the steps of the case; a stale ``outputs/<name>.npz`` from an interrupted earlier attempt is
  removed first, so a case always runs from step 1;
* step 1: the input is a copy of the case file (``imgs``, ``spacing``, ``boxes``; a file with other
  keys, such as ``gts``, is rewritten with those three only); a case without ``boxes`` skips step 1,
  which is scored DSC 0, NSD 0, time 0;
* before each of steps 2..6, the previous output's ``segs`` (cast to uint8; zeros when there is none)
  gets one simulated click per class (:mod:`harness.interactive.clicks`), and the input file is
  rewritten with ``imgs``, ``spacing``, the accumulated ``clicks`` (``{"fg": [[z, y, x], ...],
  "bg": [...]}`` per class), ``clicks_order`` (per class ``"fg"``, ``"bg"`` or None per step),
  ``prev_pred`` (that uint8 cast) and ``boxes`` when the case has them;
* each step calls ``step_fn(input_path, outputs_dir)`` and times only that call (click simulation and
  scoring excluded, as the evaluator times only its container runs);
* the step's segmentation is ``outputs/<name>.npz``'s ``segs`` as written (zeros when the file is
  missing, as the evaluator does; the step record says so); a step function may instead return the
  array, which is then written there for it (outside the timing);
* each step is scored with :func:`harness.interactive.scores.step_scores`; the case gets
  ``dsc_auc``/``nsd_auc`` over the click steps, the final DSC/NSD, the summed time and whether it
  exceeds the test phase's 90 s per class.

Ground truth never enters ``work_dir``: it is read by this process only. How a step function reads
the input is up to it: classes are the list positions of ``boxes``/``clicks``; the evaluator scores
list position ``i`` against the ``i``-th sorted unique label of the ground truth, so a segmenter
labelling position ``i`` as ``i + 1`` is right whenever the labels are ``1..N``.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from harness.atomic import atomic_writer
from harness.cases import CaseError
from harness.interactive.clicks import Click, click_classes, simulate_clicks
from harness.interactive.safe_npz import read_interactive_input, read_pickled_key, write_interactive_input
from harness.interactive.scores import auc, cap_exceeded, step_scores, time_cap

__all__ = [
    "DEFAULT_CLICKS",
    "StepFunction",
    "StepRecord",
    "InteractiveResult",
    "InteractiveStepError",
    "load_interactive_gts",
    "run_interactive_case",
]

#: Click steps after the box step (the challenge's 5: 6 runs per case).
DEFAULT_CLICKS = 5

#: ``step_fn(input_path, outputs_dir)``: segment ``input_path`` (a 2025-format npz); either write
#: ``outputs_dir/<input name>`` with key ``segs`` and return None, or return the segmentation array.
StepFunction = Callable[[Path, Path], "np.ndarray | None"]


class InteractiveStepError(RuntimeError):
    """A step of a case failed: the step function raised, or its output has the wrong shape."""

    def __init__(self, case: str, step: int, problem: str):
        self.case, self.step, self.problem = case, step, problem
        super().__init__(f"{case}: step {step}: {problem}")


@dataclass(frozen=True)
class StepRecord:
    """One step of a case.

    ``step``: 1 (box) to 1 + n_clicks. ``clicks``: the clicks added before this step, one entry per
    class (a dict ``label, kind, z, y, x`` or None for a class already perfect); empty for step 1.
    ``seconds``: the step function's wall time (0 for a skipped step). ``skipped``: step 1 of a case
    without boxes (scored 0). ``missing_output``: no ``segs`` file exists after the step (scored as
    zeros). ``stale_output``: the step did not rewrite the file, so the previous step's output was
    read and scored again (the outputs folder persists, as in the evaluator).
    """

    step: int
    clicks: list
    dsc: float
    nsd: float
    dsc_per_class: list
    nsd_per_class: list
    seconds: float
    skipped: bool = False
    missing_output: bool = False
    stale_output: bool = False


@dataclass
class InteractiveResult:
    """Everything recorded for one case; :meth:`to_dict` is JSON-ready (NaN stays float NaN)."""

    case: str
    labels: list
    n_clicks: int
    had_boxes: bool
    steps: list = field(default_factory=list)
    dsc_auc: float = math.nan
    nsd_auc: float = math.nan
    dsc_final: float = math.nan
    nsd_final: float = math.nan
    total_seconds: float = 0.0
    time_cap_seconds: float = 0.0
    cap_exceeded: bool = False

    @property
    def dsc_per_step(self) -> list[float]:
        return [s.dsc for s in self.steps]

    @property
    def nsd_per_step(self) -> list[float]:
        return [s.nsd for s in self.steps]

    @property
    def seconds_per_step(self) -> list[float]:
        return [s.seconds for s in self.steps]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["dsc_per_step"] = self.dsc_per_step
        out["nsd_per_step"] = self.nsd_per_step
        out["seconds_per_step"] = self.seconds_per_step
        return out


def load_interactive_gts(path: str | os.PathLike, shape: Sequence[int] | None = None) -> np.ndarray:
    """The ``gts`` array of a 2025 ground-truth file (read without pickle); CaseError naming the file."""
    path = Path(path)
    gts = read_pickled_key(path, "gts")
    if gts is None:
        raise CaseError(path, "missing key 'gts'")
    if gts.dtype.hasobject or gts.dtype.kind not in "biu":
        raise CaseError(path, f"gts has dtype {gts.dtype}; expected integer labels")
    if gts.ndim != 3:
        raise CaseError(path, f"gts has shape {gts.shape}; the interactive protocol is 3D")
    if shape is not None and tuple(gts.shape) != tuple(shape):
        raise CaseError(path, f"gts has shape {gts.shape}; the image has {tuple(shape)}")
    if not click_classes(gts):
        raise CaseError(path, "gts has no class (a single value throughout)")
    return gts


def _read_output(path: Path, case: str, step: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        segs = read_pickled_key(path, "segs")
    except CaseError as exc:
        raise InteractiveStepError(case, step, f"unreadable output: {exc}") from None
    if segs is None:
        raise InteractiveStepError(case, step, f"{path} has no key 'segs'")
    if segs.dtype.hasobject:
        raise InteractiveStepError(case, step, f"{path}: 'segs' is a pickled object array")
    return segs


def _file_state(path: Path) -> tuple | None:
    """What tells a rewritten file from an untouched one (None when absent)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _write_output(path: Path, segs: np.ndarray) -> None:
    with atomic_writer(path, "wb") as fh:
        np.savez_compressed(fh, segs=segs)


def _click_dicts(clicks: list[Click | None]) -> list:
    return [c.to_dict() if c is not None else None for c in clicks]


def run_interactive_case(case_path: str | os.PathLike, gts_path: str | os.PathLike, step_fn: StepFunction,
                         work_dir: str | os.PathLike, n_clicks: int = DEFAULT_CLICKS,
                         save_segs: str | os.PathLike | None = None) -> InteractiveResult:
    """Run the interactive protocol on one case; see the module docstring for what happens when.

    ``case_path``: the 2025-format input (``imgs``, ``spacing``, optional ``boxes``); ``gts_path``:
    its ground truth (key ``gts``); ``step_fn``: :data:`StepFunction`; ``work_dir``: a folder this
    function owns for the case (it writes ``inputs/`` and ``outputs/`` there). ``save_segs``: when
    given, an npz written at the end with ``segs`` (the last step's output) and ``all_segs`` (each
    step's segmentation as uint8, stacked: one per step, zeros for a skipped step 1; the evaluator's
    ``all_segs`` also repeats each click step's previous segmentation).

    Raises :class:`~harness.cases.CaseError` for unreadable inputs and :class:`InteractiveStepError`
    when a step fails; nothing is recorded for a case that raised.
    """
    case_path, work_dir = Path(case_path), Path(work_dir)
    if n_clicks < 0:
        raise ValueError("n_clicks must be >= 0")
    source = read_interactive_input(case_path)  # validated, pickles restricted
    gts = load_interactive_gts(gts_path, source.shape)
    name = case_path.name
    inputs_dir, outputs_dir = work_dir / "inputs", work_dir / "outputs"
    inputs_dir.mkdir(parents=True, exist_ok=True)
    outputs_dir.mkdir(parents=True, exist_ok=True)
    input_path, output_path = inputs_dir / name, outputs_dir / name
    output_path.unlink(missing_ok=True)  # a stale output of an interrupted attempt is never a "previous step"
    with np.load(case_path) as npz:
        extra = set(npz.files) - {"imgs", "spacing", "boxes"}
    if extra:  # never hand a segmenter anything else (a gts key of a training-style file above all)
        write_interactive_input(input_path, source.imgs, source.spacing, boxes=source.boxes)
    else:
        shutil.copyfile(case_path, input_path)  # step 1 gets the case file itself, as the evaluator copies it

    labels = click_classes(gts)
    result = InteractiveResult(case=name, labels=labels, n_clicks=n_clicks, had_boxes=source.boxes is not None)
    result.time_cap_seconds = time_cap(len(labels))
    clicks_cls: list[dict] = [{"fg": [], "bg": []} for _ in labels]
    clicks_order: list[list] = [[] for _ in labels]
    all_segs: list[np.ndarray] = []
    last_segs: np.ndarray | None = None

    for it in range(n_clicks + 1):
        step = it + 1
        given: list = []
        if it == 0:
            if source.boxes is None:
                all_segs.append(np.zeros(gts.shape, np.uint8))
                result.steps.append(StepRecord(step=1, clicks=[], dsc=0.0, nsd=0.0, dsc_per_class=[],
                                               nsd_per_class=[], seconds=0.0, skipped=True))
                continue
        else:
            prev = _read_output(output_path, name, step - 1)
            prev_u8 = np.zeros(gts.shape, np.uint8) if prev is None else prev.astype(np.uint8)
            if prev is not None and prev.shape != gts.shape:
                raise InteractiveStepError(name, step - 1, f"segs has shape {prev.shape}; expected {gts.shape}")
            clicks = simulate_clicks(prev_u8, gts, labels)
            for i, click in enumerate(clicks):
                if click is None:
                    clicks_order[i].append(None)
                else:
                    clicks_cls[i][click.kind].append(click.zyx)
                    clicks_order[i].append(click.kind)
            given = _click_dicts(clicks)
            write_interactive_input(input_path, source.imgs, source.spacing, boxes=source.boxes,
                                    clicks=clicks_cls, clicks_order=clicks_order, prev_pred=prev_u8)

        before = _file_state(output_path)
        start = time.perf_counter()
        try:
            returned = step_fn(input_path, outputs_dir)
        except Exception as exc:
            raise InteractiveStepError(name, step, f"the step function failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        if returned is not None:
            _write_output(output_path, np.asarray(returned))
        segs = _read_output(output_path, name, step)
        missing = segs is None
        stale = not missing and before is not None and _file_state(output_path) == before
        if missing:
            segs = np.zeros(gts.shape, np.uint8)
        if segs.shape != gts.shape:
            raise InteractiveStepError(name, step, f"segs has shape {segs.shape}; expected {gts.shape}")
        all_segs.append(segs.astype(np.uint8))
        last_segs = segs
        scores = step_scores(gts, segs, source.spacing)
        result.steps.append(StepRecord(step=step, clicks=given, dsc=scores.dsc, nsd=scores.nsd,
                                       dsc_per_class=list(scores.dsc_per_class),
                                       nsd_per_class=list(scores.nsd_per_class), seconds=seconds,
                                       missing_output=missing, stale_output=stale))

    dscs, nsds = result.dsc_per_step, result.nsd_per_step
    result.dsc_auc = auc(dscs, n_clicks)
    result.nsd_auc = auc(nsds, n_clicks)
    result.dsc_final, result.nsd_final = dscs[-1], nsds[-1]
    result.total_seconds = float(sum(result.seconds_per_step))
    result.cap_exceeded = cap_exceeded(result.total_seconds, len(labels))
    if save_segs is not None and last_segs is not None:
        with atomic_writer(Path(save_segs), "wb") as fh:
            np.savez_compressed(fh, segs=last_segs, all_segs=np.stack(all_segs))
    return result
