"""Score a folder of predictions against a folder of ground truths, as the challenge does.

``score_dirs(segs_dir, gts_dir)`` gives one row per ``gts_dir/*.npz`` (sorted by
name) with the challenge DSC and NSD (:func:`harness.metrics.case_metrics`).
A case that cannot be scored (missing or unreadable seg file, missing key,
shape mismatch, 3D case without spacing) gets ``dsc = nsd = 0`` and a message in
the ``error`` column instead of stopping the run.

Files are checked before they are decompressed (:mod:`harness.cases`): a gts or seg file whose arrays
would take more than ``max_case_gb`` (default: a quarter of physical memory) and a gts label above
:data:`harness.cases.MAX_LABEL` are error rows naming the file; so is any other failure, a
MemoryError included.

``metrics`` may add ``hd95`` and ``masd`` (:func:`harness.metrics.distance_metrics`, mm) as
columns after ``nsd``; they are empty (NaN) for a case that could not be scored, or whose labels
are all absent from both masks.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from harness.cases import CaseError, load_ground_truth, load_segs, modality_from_name, read_spacing
from harness.metrics import CHALLENGE_METRICS, DISTANCE_METRICS, case_metrics, distance_metrics, parse_metrics

__all__ = ["COLUMNS", "columns", "score_case", "score_dirs"]

#: Columns of the frame returned by :func:`score_dirs`, in order.
COLUMNS = ["case", "dsc", "nsd", "modality", "error"]


def columns(metrics=CHALLENGE_METRICS) -> list[str]:
    """The frame's columns for ``metrics``: :data:`COLUMNS` with the extra metrics after ``nsd``."""
    extras = [name for name in parse_metrics(metrics) if name in DISTANCE_METRICS]
    return ["case", "dsc", "nsd", *extras, "modality", "error"]


def _imgs_spacing(imgs_path: str | os.PathLike | None,
                  max_bytes: int | None = None) -> tuple[float, float, float] | None:
    """The ``spacing`` of an images file, if there is one (a fallback for gts files without it)."""
    if imgs_path is None or not (Path(imgs_path).is_file() or Path(imgs_path).is_symlink()):
        return None
    return read_spacing(imgs_path, max_bytes)


def _gb_bytes(max_case_gb: float | None) -> int | None:
    return None if max_case_gb is None else int(max_case_gb * 10**9)


def score_case(gt_path: str | os.PathLike, seg_path: str | os.PathLike,
               imgs_path: str | os.PathLike | None = None, metrics=CHALLENGE_METRICS,
               max_case_gb: float | None = None) -> dict:
    """Score one case; never raises for a problem of the files (see the ``error`` field).

    ``gts`` (and, for 3D, ``spacing``) come from ``gt_path``; when the gts file
    has no ``spacing``, it is read from ``imgs_path`` if given.  ``segs`` comes
    from ``seg_path``.  Files are read and checked by :mod:`harness.cases`, so an
    error names the file and the problem; an error of another kind (a MemoryError
    while scoring) is prefixed with the files it happened on.  ``max_case_gb``
    limits each file's decompressed size (default :func:`harness.cases.max_case_bytes`).
    ``metrics`` (names, see :func:`columns`) may add ``hd95`` and ``masd``: NaN when
    the case cannot be scored.
    """
    gt_path = Path(gt_path)
    max_bytes = _gb_bytes(max_case_gb)
    extras = [name for name in parse_metrics(metrics) if name in DISTANCE_METRICS]
    row = {"case": gt_path.name, "dsc": 0.0, "nsd": 0.0, **{name: math.nan for name in extras},
           "modality": modality_from_name(gt_path.name), "error": ""}
    where = f"{gt_path}"
    try:
        gt = load_ground_truth(gt_path, spacing=lambda: _imgs_spacing(imgs_path, max_bytes), max_bytes=max_bytes)
        where = f"{seg_path}"
        segs = load_segs(seg_path, gt.gts.shape, max_bytes=max_bytes)
        where = f"scoring {seg_path} against {gt_path}"
        challenge = case_metrics(gt.gts, segs, gt.spacing)
        row["dsc"] = challenge.dsc
        row["nsd"] = challenge.nsd
        if extras:
            distances = distance_metrics(gt.gts, segs, gt.spacing, metrics=extras)
            row.update({name: distances[name] for name in extras})
    except Exception as exc:  # noqa: BLE001 - an unscorable case becomes an error row
        if isinstance(exc, CaseError):
            error = str(exc)
        else:
            error = f"{where}: {type(exc).__name__}: {exc}"
            if isinstance(exc, MemoryError):
                error += " (not enough memory for this case)"
        row.update(dsc=0.0, nsd=0.0, error=error)
    return row


def _score_job(args: tuple[str, str, str | None, tuple[str, ...], float | None]) -> dict:
    return score_case(*args)


def score_dirs(segs_dir: str | os.PathLike, gts_dir: str | os.PathLike, workers: int = 1,
               imgs_dir: str | os.PathLike | None = None, metrics=CHALLENGE_METRICS,
               max_case_gb: float | None = None) -> pd.DataFrame:
    """Challenge DSC/NSD of every ``gts_dir/*.npz`` against ``segs_dir/<same name>``.

    Returns a DataFrame with columns ``case, dsc, nsd, modality, error`` (one row
    per ground-truth file, sorted by file name, values at full float precision;
    ``error`` is ``""`` for a scored case).  ``imgs_dir`` optionally supplies the
    3D ``spacing`` when a gts file lacks it.  ``workers > 1`` scores cases in
    that many processes.  ``metrics`` (e.g. ``("dsc", "nsd", "hd95", "masd")``) adds the
    columns ``hd95``, ``masd`` after ``nsd`` (:func:`columns`).  ``max_case_gb`` limits each
    file's decompressed size (default: a quarter of physical memory); a file over it is an error row.
    """
    metrics = parse_metrics(metrics)
    segs_dir = Path(segs_dir)
    gts_dir = Path(gts_dir)
    if not gts_dir.is_dir():
        raise FileNotFoundError(f"{gts_dir}: no such ground-truth folder")
    if not any(gts_dir.glob("*.npz")):
        raise FileNotFoundError(f"{gts_dir}: no ground-truth .npz files")
    jobs = []
    for gt_path in sorted(gts_dir.glob("*.npz"), key=lambda p: p.name):
        img = str(Path(imgs_dir) / gt_path.name) if imgs_dir is not None else None
        jobs.append((str(gt_path), str(segs_dir / gt_path.name), img, metrics, max_case_gb))
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            rows = list(pool.map(_score_job, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        rows = [_score_job(job) for job in jobs]
    frame = pd.DataFrame(rows, columns=columns(metrics))
    for name in metrics:
        frame[name] = frame[name].astype(float)
    frame["error"] = frame["error"].astype(str)
    return frame
