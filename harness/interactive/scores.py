"""Scores of the 2025 interactive protocol: DSC and NSD per step, their AUCs, and the time cap.

As the official evaluator computes them (repository JunMa11/CVPR-MedSegFMCompetition,
``CVPR25_iter_eval.py``):

* the classes are the sorted unique values of ``gts`` without the first (the background 0), not
  ``1..gts.max()`` as in 2024; labels missing from ``gts`` are not scored;
* per step, ``DSC`` is the mean over those classes of ``2|G & S| / (|G| + |S|)``; ``NSD`` is the mean
  of the surface Dice at 2 mm (DeepMind's surfel method, the input's ``spacing``), computed only when
  the step's ``DSC > 0.2``, else 0;
* ``DSC_AUC`` and ``NSD_AUC`` are ``scipy.integrate.cumulative_trapezoid(values[-5:], np.arange(5))[-1]``:
  the area under the curve of the last 5 steps (the click steps; the box step is left out) with
  x = 0..4, so at most 4.0;
* ``DSC_Final`` / ``NSD_Final`` are the last step's values;
* the time is the sum of the 6 steps' run times (click simulation excluded); the test phase caps it at
  90 s per class, and a case over the cap scores 0 there (the validation script only warns).

The per-class DSC and surface Dice come from :mod:`harness.metrics` (the 2024 challenge metrics,
checked against the challenge's reference code).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.integrate import cumulative_trapezoid

from harness.interactive.clicks import click_classes
from harness.metrics import DEFAULT_TOLERANCE, NSD_DSC_GATE, dice_per_label, surface_dice

__all__ = [
    "SECONDS_PER_CLASS_CAP",
    "StepScores",
    "step_scores",
    "auc",
    "time_cap",
    "cap_exceeded",
]

#: The test phase's time limit per class, in seconds, for the sum of a case's steps.
SECONDS_PER_CLASS_CAP = 90.0


@dataclass(frozen=True)
class StepScores:
    """One step's scores: the case ``dsc``/``nsd`` and per-class values aligned with ``labels``.

    ``nsd_per_class`` is empty when the DSC gate (> 0.2) skipped the NSD.
    """

    dsc: float
    nsd: float
    labels: tuple[int, ...]
    dsc_per_class: tuple[float, ...]
    nsd_per_class: tuple[float, ...]


def step_scores(gts: np.ndarray, segs: np.ndarray, spacing: Sequence[float],
                tolerance: float = DEFAULT_TOLERANCE) -> StepScores:
    """DSC and NSD of one step's segmentation ``segs`` (as written, not cast) against ``gts``.

    Raises ValueError for mismatched shapes, non-3D arrays, or a ``gts`` without any class.
    """
    gts = np.asarray(gts)
    segs = np.asarray(segs)
    if gts.shape != segs.shape:
        raise ValueError(f"segs shape {segs.shape} differs from gts shape {gts.shape}")
    if gts.ndim != 3:
        raise ValueError(f"the interactive protocol is 3D; got arrays of shape {gts.shape}")
    labels = click_classes(gts)
    if not labels:
        raise ValueError("gts has no class to score (a single value throughout)")
    dsc_per = tuple(float(v) for v in dice_per_label(gts, segs, labels))
    dsc = float(np.mean(dsc_per))
    nsd_per: tuple[float, ...] = ()
    if dsc > NSD_DSC_GATE:
        nsd_per = tuple(float(surface_dice(gts == label, segs == label, spacing, tolerance)) for label in labels)
        nsd = float(np.mean(nsd_per))
    else:
        nsd = 0.0
    return StepScores(dsc=dsc, nsd=nsd, labels=tuple(labels), dsc_per_class=dsc_per, nsd_per_class=nsd_per)


def auc(values: Sequence[float], n_clicks: int = 5) -> float:
    """Area under the last ``n_clicks`` values with x = 0, 1, ..., n_clicks - 1 (trapezoids).

    With the default 5 this is the evaluator's ``DSC_AUC`` / ``NSD_AUC``. NaN when fewer than two
    values are given or ``n_clicks < 2`` (no area).
    """
    if n_clicks < 2:
        return math.nan
    tail = np.asarray(list(values), dtype=np.float64)[-n_clicks:]
    if tail.size < 2:
        return math.nan
    return float(cumulative_trapezoid(tail, np.arange(tail.size))[-1])


def time_cap(n_classes: int) -> float:
    """The test phase's cap on a case's summed step times: 90 s per class."""
    return SECONDS_PER_CLASS_CAP * int(n_classes)


def cap_exceeded(total_seconds: float, n_classes: int) -> bool:
    """Whether a case's summed step times exceed :func:`time_cap` (strictly, as the evaluator tests)."""
    return float(total_seconds) > time_cap(n_classes)
