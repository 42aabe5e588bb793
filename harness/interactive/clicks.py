"""The simulated user of the 2025 interactive protocol: one corrective click per class per step.

This reproduces the click rule of the official evaluator (repository
JunMa11/CVPR-MedSegFMCompetition, ``CVPR25_iter_eval.py``), written from its description with numpy
and scipy only. For each class ``c`` (the sorted unique values of ``gts`` without the first, the
background 0) and a prediction ``segs`` cast to uint8 (as the evaluator casts the output it reads,
so labels above 255 wrap):

1. error mask ``E = (segs == c) != (gts == c)``; if ``E`` is empty the class gets no click
   (its ``clicks_order`` entry is ``None``);
2. the largest 26-connected component of ``E`` (``scipy.ndimage.label`` with a 3x3x3 structure;
   ties go to the component met first in C scan order, which is how ``cc3d`` numbers the
   components of a C-ordered array, and ``argmax`` takes the first);
3. its Euclidean distance transform (``scipy.ndimage.distance_transform_edt``, unit spacing),
   computed on the component's bounding box padded by ``max(int(0.25 * size), 1)`` voxels of
   background on each side of each axis; when that padded crop has more than 60,000,000 voxels it
   is first max-pooled in 2x2x2 blocks (zero-padded at the far end to even sizes) and the EDT of the
   pooled crop is repeated 2x along each axis back up;
4. the EDT is multiplied by the component mask; if the product is all zero (possible on the pooled
   path), every voxel of the component is a candidate, else the voxels holding its maximum are;
5. candidates are listed in ``np.argwhere`` (C) order and one is chosen with
   ``np.random.seed(42); np.random.choice(len(candidates))`` (reseeded for every click, so the choice
   depends only on the number of candidates);
6. the click is foreground (``"fg"``, under-segmentation) when ``gts == c`` there, else background
   (``"bg"``, over-segmentation). Coordinates are array indices ``(z, y, x)``.

Everything after the error mask runs on the bounding box of the error, so a small error in a large
volume costs little.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "Click",
    "EDT_POOL_THRESHOLD",
    "CLICK_SEED",
    "click_classes",
    "largest_error_component",
    "component_edt",
    "choose_candidate",
    "simulate_click",
    "simulate_clicks",
]

#: A padded crop with more voxels than this is max-pooled 2x2x2 before its EDT (as the evaluator does).
EDT_POOL_THRESHOLD = 60_000_000
#: The seed the evaluator resets before every choice among equal EDT maxima.
CLICK_SEED = 42

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


@dataclass(frozen=True)
class Click:
    """One simulated click: the class ``label``, ``kind`` ``"fg"`` or ``"bg"``, and its voxel (z, y, x)."""

    label: int
    kind: str
    z: int
    y: int
    x: int

    @property
    def zyx(self) -> list[int]:
        return [self.z, self.y, self.x]

    def to_dict(self) -> dict:
        return {"label": self.label, "kind": self.kind, "z": self.z, "y": self.y, "x": self.x}


def click_classes(gts: np.ndarray) -> list[int]:
    """The classes the evaluator clicks and scores: ``np.unique(gts)[1:]`` (sorted, first value dropped).

    The first unique value is the background 0 whenever the volume has background; the evaluator
    drops the first value whatever it is, and so does this function.
    """
    return [int(v) for v in np.unique(gts)[1:]]


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a non-empty 3D boolean mask as slices (None when empty)."""
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if not hits.size:
            return None
        slices.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(slices)


def largest_error_component(error: np.ndarray) -> np.ndarray:
    """Boolean mask (same shape) of the largest 26-connected component of a non-empty boolean ``error``.

    Equal sizes: the component whose first voxel comes first in C order wins.
    """
    labels, n = ndimage.label(error, structure=_STRUCTURE_26)
    if n == 0:
        raise ValueError("the error mask is empty")
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _pool_2x2x2(crop: np.ndarray) -> np.ndarray:
    """Max over 2x2x2 blocks, the array first zero-padded at the far end of each axis to even sizes."""
    pads = [(0, n % 2) for n in crop.shape]
    if any(p for _, p in pads):
        crop = np.pad(crop, pads)
    out = crop[0::2, 0::2, 0::2].copy()
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                if a or b or c:
                    np.maximum(out, crop[a::2, b::2, c::2], out=out)
    return out


def component_edt(component: np.ndarray, pool_threshold: int = EDT_POOL_THRESHOLD) -> np.ndarray:
    """The evaluator's EDT of a non-empty component, on the component's bounding box only.

    Returns the EDT (float64) of the bounding box ``_bbox(component)``, not yet multiplied by the
    mask; see the module docstring for the padding and the pooled path.
    """
    box = _bbox(component)
    if box is None:
        raise ValueError("the component is empty")
    crop = component[box]
    shape = np.array(crop.shape)
    pad = np.maximum((shape * 0.25).astype(int), 1)
    padded = np.zeros(tuple(shape + 2 * pad), dtype=np.uint8)
    inner = tuple(slice(int(p), int(p + n)) for p, n in zip(pad, shape))
    padded[inner] = crop
    if padded.size > pool_threshold:
        pooled = ndimage.distance_transform_edt(_pool_2x2x2(padded))
        # the pooled EDT repeated 2x along each axis, read at the inner crop only: voxel i is block i // 2
        return pooled[np.ix_(*(np.arange(s.start, s.stop) // 2 for s in inner))]
    return np.ascontiguousarray(ndimage.distance_transform_edt(padded)[inner])


def choose_candidate(n_candidates: int) -> int:
    """Index the evaluator picks among ``n_candidates`` equal maxima: ``np.random.seed(42); np.random.choice(n)``.

    A private ``RandomState(42)`` draws the same number without touching numpy's global generator.
    """
    if n_candidates < 1:
        raise ValueError("no candidate to choose from")
    return int(np.random.RandomState(CLICK_SEED).choice(n_candidates))


def simulate_click(segs: np.ndarray, gts: np.ndarray, label: int,
                   pool_threshold: int = EDT_POOL_THRESHOLD) -> Click | None:
    """The click the evaluator gives class ``label`` for prediction ``segs``; None when the class is perfect.

    ``segs`` is compared as given: cast it to uint8 first to reproduce the evaluator exactly
    (:func:`simulate_clicks` does).
    """
    gt_c = gts == label
    error = (segs == label) != gt_c
    box = _bbox(error)
    if box is None:
        return None
    component = largest_error_component(error[box])
    cbox = _bbox(component)
    comp = component[cbox]
    edt = component_edt(comp, pool_threshold) * comp
    peak = edt.max()
    candidates = np.argwhere(comp) if peak == 0 else np.argwhere(edt == peak)
    z, y, x = (int(v) for v in candidates[choose_candidate(len(candidates))])
    z += box[0].start + cbox[0].start
    y += box[1].start + cbox[1].start
    x += box[2].start + cbox[2].start
    return Click(label=int(label), kind="fg" if gt_c[z, y, x] else "bg", z=z, y=y, x=x)


def simulate_clicks(segs: np.ndarray, gts: np.ndarray, labels: Sequence[int] | None = None,
                    pool_threshold: int = EDT_POOL_THRESHOLD) -> list[Click | None]:
    """One click (or None for a perfect class) per class of ``gts``, as the evaluator computes them.

    ``segs`` is cast to uint8 first, as the evaluator does with the output it reads. ``labels``
    defaults to :func:`click_classes` (``gts``'s classes in order); the list is aligned with it.
    """
    segs = np.asarray(segs)
    gts = np.asarray(gts)
    if segs.shape != gts.shape:
        raise ValueError(f"segs shape {segs.shape} differs from gts shape {gts.shape}")
    if gts.ndim != 3:
        raise ValueError(f"the interactive protocol is 3D; got arrays of shape {gts.shape}")
    segs = segs.astype(np.uint8)
    if labels is None:
        labels = click_classes(gts)
    return [simulate_click(segs, gts, int(label), pool_threshold) for label in labels]
