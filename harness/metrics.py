"""Challenge-exact segmentation metrics: DSC and NSD (normalised surface Dice).

This reproduces the numbers of the CVPR 2024 "MedSAM on Laptop" evaluation
(``evaluation/compute_metrics.py`` of the LiteMedSAM branch, which uses a copy of
DeepMind's surface-distance code), written from scratch and vectorised.

Per case, with ``L = gt.max()`` and labels ``i = 1..L``:

* ``DSC_i = 2|G_i & S_i| / (|G_i| + |S_i|)``; NaN when label ``i`` is absent from
  both masks, which makes the case DSC (the plain mean over labels) NaN.
  Prediction labels above ``L`` are ignored.
* NSD is only computed when the case DSC is ``> 0.2`` (a NaN DSC fails this test);
  otherwise the case NSD is 0.  When computed, it is the mean over labels of the
  surface Dice at ``tolerance`` (2.0, in mm for 3D, pixels for 2D).
* Surface Dice follows DeepMind's method: the masks are looked at through every
  2x2x2 window ("cube") of the volume zero-padded by one voxel; a cube whose
  eight corners are neither all in nor all out is a surface element ("surfel")
  whose area is that of the marching-cubes surface inside the cube (scaled by
  the voxel spacing).  Each surfel of one mask counts as matched when the
  Euclidean distance (``scipy.ndimage.distance_transform_edt`` with
  ``sampling=spacing`` over the cube grid) to the nearest surfel of the other
  mask is ``<= tolerance``.  ``NSD_i = (matched area of G + matched area of S) /
  (total area of G + total area of S)``.  If exactly one mask is empty, all its
  partner's distances are infinite, so ``NSD_i = 0``.
* 2D cases (``gt.ndim == 2``) are treated as ``(H, W, 1)`` volumes with spacing
  ``(1, 1, 1)``, exactly as the challenge script does.

The surfel-area table is generated here from a small marching-cubes
polygonisation (see :func:`_unit_surfel_normals`), not copied from anywhere.

Two extra surface-distance metrics that the challenge does not use, ``hd95`` (95th-percentile
Hausdorff distance) and ``masd`` (mean average surface distance, symmetric), both in mm, are
computed by :func:`distance_metrics` when asked for; see its docstring for their definitions and
:data:`EMPTY_MASK_POLICY` for how empty masks are scored.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from harness.cases import MAX_LABEL

__all__ = [
    "CaseMetrics",
    "NSD_DSC_GATE",
    "DEFAULT_TOLERANCE",
    "dice_per_label",
    "surface_dice",
    "case_metrics",
    "surfel_area_table",
    "surface_area",
    "CHALLENGE_METRICS",
    "DISTANCE_METRICS",
    "METRIC_NAMES",
    "HD_PERCENTILE",
    "EMPTY_MASK_POLICY",
    "parse_metrics",
    "distance_metrics",
    "MAX_LABEL",
]

#: The case NSD is only computed when the case DSC is strictly above this value.
NSD_DSC_GATE = 0.2
#: Tolerance of the challenge's NSD (mm for 3D, pixels for 2D).
DEFAULT_TOLERANCE = 2.0


# ---------------------------------------------------------------------------
# Surfel area table (marching cubes), derived programmatically.
# ---------------------------------------------------------------------------
#
# A cube has 8 corners; corner k sits at offset (k >> 2 & 1, k >> 1 & 1, k & 1)
# along the array axes (0, 1, 2) and contributes bit k to the cube's code.

def _corner(k: int) -> tuple[int, int, int]:
    return ((k >> 2) & 1, (k >> 1) & 1, k & 1)


_CORNER_BIT = {_corner(k): k for k in range(8)}


def _cube_faces() -> list[list[tuple[int, int, int]]]:
    """The six cube faces, each as its four corners in cyclic order."""
    faces = []
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        for side in (0, 1):
            ring = []
            for pu, pv in ((0, 0), (1, 0), (1, 1), (0, 1)):
                c = [0, 0, 0]
                c[axis], c[u], c[v] = side, pu, pv
                ring.append(tuple(c))
            faces.append(ring)
    return faces


def _polygons(code: int) -> list[list[np.ndarray]]:
    """Closed iso-surface polygons (vertex lists) of one cube configuration.

    Vertices sit at the midpoints of the cube edges whose two corners differ.
    On each face the crossing edges are joined pairwise by segments; a face with
    four crossings (two diagonal "in" corners) is resolved by cutting off the
    corners of the minority class one by one (the "in" corners when at most four
    corners are in, else the "out" corners), which is what the classic
    marching-cubes tables do (they treat a configuration and its complement
    alike).  The segments are then chained into loops.
    """
    inside = {c: bool((code >> _CORNER_BIT[c]) & 1) for c in _CORNER_BIT}
    cut_inside = bin(code).count("1") <= 4
    links: dict[frozenset, list[frozenset]] = {}

    def join(e1: frozenset, e2: frozenset) -> None:
        links.setdefault(e1, []).append(e2)
        links.setdefault(e2, []).append(e1)

    for ring in _cube_faces():
        # crossing edge j joins ring[j] and ring[j+1]
        crossing = [j for j in range(4) if inside[ring[j]] != inside[ring[(j + 1) % 4]]]
        edges = {j: frozenset((ring[j], ring[(j + 1) % 4])) for j in crossing}
        if len(crossing) == 2:
            join(edges[crossing[0]], edges[crossing[1]])
        elif len(crossing) == 4:
            # corner ring[j] touches crossing edges j-1 and j; cut off ring[0] and ring[2]
            # or ring[1] and ring[3], whichever pair belongs to the minority class.
            first_pair_cut = inside[ring[0]] == cut_inside
            if first_pair_cut:
                join(edges[3], edges[0])
                join(edges[1], edges[2])
            else:
                join(edges[0], edges[1])
                join(edges[2], edges[3])

    loops = []
    seen: set[frozenset] = set()
    for start in sorted(links, key=lambda e: sorted(e)):
        if start in seen:
            continue
        loop, prev, cur = [start], None, start
        seen.add(start)
        while True:
            nxt = [e for e in links[cur] if e != prev and e not in seen]
            if not nxt:
                break
            prev, cur = cur, nxt[0]
            loop.append(cur)
            seen.add(cur)
        loops.append([np.mean(np.array(sorted(e), dtype=float), axis=0) for e in loop])
    return loops


def _triangle_vector(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Area vector of a triangle: its normal with length equal to its area."""
    return 0.5 * np.cross(b - a, c - a)


def _triangulate(poly: list[np.ndarray]) -> list[np.ndarray]:
    """Triangle area vectors of one polygon, split the way classic marching-cubes tables do.

    * up to five vertices: the fan whose total (unit-spacing) area is largest
      (for planar polygons every fan is equivalent; for the non-planar pentagon of
      the "three corners on a face" configuration the tables keep the big
      mid-plane triangle, which is the largest fan);
    * six vertices: the triangle on alternate vertices plus the three "ears"
      (what the tables use for the non-planar zig-zag hexagons; for the planar
      hexagon any split gives the same area).
    """
    n = len(poly)
    if n == 6:
        tris = [(0, 2, 4), (0, 1, 2), (2, 3, 4), (4, 5, 0)]
        return [_triangle_vector(poly[i], poly[j], poly[k]) for i, j, k in tris]
    best, best_area = None, -1.0
    for apex in range(n):
        v = [poly[(apex + t) % n] for t in range(n)]
        vecs = [_triangle_vector(v[0], v[t], v[t + 1]) for t in range(1, n - 1)]
        area = round(sum(float(np.linalg.norm(x)) for x in vecs), 9)
        if area > best_area:
            best, best_area = vecs, area
    return best


@lru_cache(maxsize=1)
def _unit_surfel_normals() -> np.ndarray:
    """``(256, T, 3)`` absolute triangle area vectors per cube code at unit spacing (zero padded)."""
    per_code = []
    for code in range(256):
        vecs: list[np.ndarray] = []
        if code not in (0, 255):
            for poly in _polygons(code):
                vecs.extend(_triangulate(poly))
        per_code.append(vecs)
    width = max(len(v) for v in per_code)
    table = np.zeros((256, width, 3))
    for code, vecs in enumerate(per_code):
        if vecs:
            table[code, : len(vecs)] = np.abs(np.array(vecs))
    table.setflags(write=False)
    return table


@lru_cache(maxsize=64)
def _surfel_area_table_cached(spacing: tuple[float, float, float]) -> np.ndarray:
    s0, s1, s2 = spacing
    # an area vector scales with the product of the two other axes' spacings
    scale = np.array([s1 * s2, s0 * s2, s0 * s1])
    table = np.linalg.norm(_unit_surfel_normals() * scale, axis=-1).sum(axis=-1)
    table.setflags(write=False)
    return table


def surfel_area_table(spacing: Sequence[float]) -> np.ndarray:
    """Area of the surface element of each of the 256 cube codes for a voxel ``spacing``.

    Code bit ``k`` is set when the cube corner at offset
    ``(k >> 2 & 1, k >> 1 & 1, k & 1)`` is inside the mask.  Read-only array.
    """
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3:
        raise ValueError(f"spacing must have 3 elements, got {spacing!r}")
    return _surfel_area_table_cached(sp)


# ---------------------------------------------------------------------------
# Surface Dice
# ---------------------------------------------------------------------------
#
# Speed: instead of two full Euclidean distance transforms per label, we only
# need to know, for each surfel, whether a surfel of the other mask lies within
# the tolerance.  The integer cube offsets (d0, d1, d2) within tolerance form a
# small ellipsoid; it is enumerated once with exactly the float arithmetic that
# scipy's distance_transform_edt uses to turn an offset into a distance
# (sqrt(((d0*s0)**2 + (d1*s1)**2) + (d2*s2)**2)), so "<= tolerance" decisions
# are the same.  The ellipsoid is stored as runs along the last axis: for each
# (d0, d1) the largest |d2| that is still within tolerance.  The other mask's
# surfel grid is pre-dilated along the last axis by each run length needed, and
# each surfel then needs one gather per (d0, d1) pair.

def _reach(spacing: Sequence[float], tolerance: float, shape: Sequence[int]) -> tuple[int, int, int]:
    """Largest cube offset per axis worth looking at: past tolerance, or past the grid."""
    return tuple(min(int(math.floor(tolerance / s)) + 1, n) for s, n in zip(spacing, shape))  # type: ignore[return-value]


#: Above this many candidate offsets, fall back to distance transforms.
_MAX_OFFSETS = 50_000


@lru_cache(maxsize=256)
def _tolerance_runs(spacing: tuple[float, float, float], tolerance: float,
                    reach: tuple[int, int, int]) -> tuple[tuple[int, int, int], tuple[tuple[int, int, int], ...]]:
    """Margins ``(r0, r1, r2)`` and runs ``(d0, d1, k)`` of the cube offsets within ``tolerance``.

    Offsets along axis ``a`` are looked for up to ``|d_a| <= reach[a]``.  A run
    ``(d0, d1, k)`` stands for the offsets ``(d0, d1, -k..k)``.  Runs are sorted
    by the distance of ``(d0, d1, 0)`` (likeliest hits first).
    """
    axes = [np.arange(-r, r + 1, dtype=np.float64) for r in reach]
    d0, d1, d2 = np.meshgrid(*axes, indexing="ij")
    # same operation order as scipy.ndimage.distance_transform_edt
    a0 = d0 * spacing[0]
    a1 = d1 * spacing[1]
    a2 = d2 * spacing[2]
    dist = np.sqrt((a0 * a0 + a1 * a1) + a2 * a2)
    inside = dist <= tolerance
    runs = []
    for i, j in itertools.product(range(inside.shape[0]), range(inside.shape[1])):
        row = inside[i, j]
        if not row.any():
            continue
        k = int(np.abs(np.nonzero(row)[0] - reach[2]).max())
        # the row is symmetric and contiguous around 0 (distance grows with |d2|)
        if not row[reach[2] - k : reach[2] + k + 1].all():  # pragma: no cover - sanity
            raise AssertionError("non-contiguous tolerance run")
        runs.append((float(dist[i, j, reach[2]]), i - reach[0], j - reach[1], k))
    runs.sort()
    margins = (
        max((abs(r[1]) for r in runs), default=0),
        max((abs(r[2]) for r in runs), default=0),
        max((r[3] for r in runs), default=0),
    )
    return margins, tuple((r[1], r[2], r[3]) for r in runs)


def _cube_codes(mask: np.ndarray, margin: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """Codes of all 2x2x2 cubes of ``mask`` zero-padded by one voxel.

    The result has shape ``mask.shape + 1 + 2 * margin``: the cube grid plus
    ``margin`` empty (code 0) cubes on both sides of each axis.  Cube ``c`` of
    the unpadded grid covers voxels ``c - 1`` and ``c`` of ``mask`` along each
    axis.
    """
    pad = [1 + m for m in margin]
    padded = np.zeros(tuple(n + 2 * p for n, p in zip(mask.shape, pad)), dtype=np.uint8)
    padded[pad[0] : pad[0] + mask.shape[0], pad[1] : pad[1] + mask.shape[1],
           pad[2] : pad[2] + mask.shape[2]] = mask
    m0, m1, m2 = (n - 1 for n in padded.shape)
    codes = np.zeros((m0, m1, m2), dtype=np.uint8)
    tmp = np.empty_like(codes)
    for k in range(8):
        a, b, c = _corner(k)
        view = padded[a : a + m0, b : b + m1, c : c + m2]
        if k:
            np.left_shift(view, k, out=tmp)
            codes |= tmp
        else:
            codes |= view
    return codes


def _surfels(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Surfel mask (cubes that are neither empty nor full) and its flat indices."""
    border = codes != 0
    border &= codes != 255
    return border, np.flatnonzero(border)


def _within_tolerance(points: np.ndarray, border: np.ndarray,
                      runs: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    """For flat indices ``points`` of the padded cube grid: is a surfel of ``border`` within tolerance?"""
    _, n1, n2 = border.shape
    hit = np.zeros(points.shape, dtype=bool)
    dilated = {0: border}
    todo = points
    todo_pos = np.arange(points.size)
    for step, (d0, d1, k) in enumerate(runs):
        if k not in dilated:
            grown = border.copy()
            for j in range(1, k + 1):
                grown[:, :, j:] |= border[:, :, :-j]
                grown[:, :, :-j] |= border[:, :, j:]
            dilated[k] = grown
        found = np.take(dilated[k].reshape(-1), todo + (d0 * n1 + d1) * n2)
        if found.any():
            hit[todo_pos[found]] = True
            if step + 1 < len(runs):
                keep = ~found
                todo = todo[keep]
                todo_pos = todo_pos[keep]
                if not todo.size:
                    break
    return hit


def _surface_dice_cropped(gt: np.ndarray, pred: np.ndarray, spacing: tuple[float, float, float],
                          tolerance: float) -> float:
    """Surface Dice of two boolean volumes (already cropped to their union box)."""
    # Cube offsets never exceed the crop's shape (the cube grid is shape + 1 wide).
    reach = _reach(spacing, tolerance, gt.shape)
    if math.prod(2 * r + 1 for r in reach) > _MAX_OFFSETS:
        return _surface_dice_edt(gt, pred, spacing, tolerance)
    # Put the axis with the longest tolerance run last (fewest gathers).
    last = max(range(3), key=lambda a: (reach[a], gt.shape[a]))
    if last != 2:
        order = [a for a in range(3) if a != last] + [last]
        gt = gt.transpose(order)
        pred = pred.transpose(order)
        spacing = tuple(spacing[a] for a in order)  # type: ignore[assignment]
        reach = tuple(reach[a] for a in order)  # type: ignore[assignment]
    margin, runs = _tolerance_runs(spacing, tolerance, reach)

    codes_gt = _cube_codes(gt, margin)
    codes_pred = _cube_codes(pred, margin)
    border_gt, pts_gt = _surfels(codes_gt)
    border_pred, pts_pred = _surfels(codes_pred)
    if not pts_gt.size and not pts_pred.size:
        return math.nan
    if not (pts_gt.size and pts_pred.size):
        return 0.0  # the other side's distances are all infinite
    table = surfel_area_table(spacing)
    area_gt = table[np.take(codes_gt.reshape(-1), pts_gt)]
    area_pred = table[np.take(codes_pred.reshape(-1), pts_pred)]
    if runs:
        ok_gt = _within_tolerance(pts_gt, border_pred, runs)
        ok_pred = _within_tolerance(pts_pred, border_gt, runs)
        matched = float(area_gt[ok_gt].sum()) + float(area_pred[ok_pred].sum())
    else:
        matched = 0.0
    return matched / (float(area_gt.sum()) + float(area_pred.sum()))


def _surface_dice_edt(gt: np.ndarray, pred: np.ndarray, spacing: tuple[float, float, float],
                      tolerance: float) -> float:
    """Surface Dice via full distance transforms (used when the tolerance spans very many voxels)."""
    codes_gt = _cube_codes(gt)
    codes_pred = _cube_codes(pred)
    border_gt, pts_gt = _surfels(codes_gt)
    border_pred, pts_pred = _surfels(codes_pred)
    if not pts_gt.size and not pts_pred.size:
        return math.nan
    if not (pts_gt.size and pts_pred.size):
        return 0.0
    table = surfel_area_table(spacing)
    area_gt = table[np.take(codes_gt.reshape(-1), pts_gt)]
    area_pred = table[np.take(codes_pred.reshape(-1), pts_pred)]
    dist_to_pred = ndimage.distance_transform_edt(~border_pred, sampling=spacing).reshape(-1)
    dist_to_gt = ndimage.distance_transform_edt(~border_gt, sampling=spacing).reshape(-1)
    matched = (float(area_gt[np.take(dist_to_pred, pts_gt) <= tolerance].sum())
               + float(area_pred[np.take(dist_to_gt, pts_pred) <= tolerance].sum()))
    return matched / (float(area_gt.sum()) + float(area_pred.sum()))


def surface_area(mask: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """Total surfel area of a binary mask (mm^2 for 3D; 2D as ``(H, W, 1)``, see :func:`surface_dice`)."""
    vol, sp = _as_volume(np.asarray(mask).astype(bool, copy=False), spacing)
    box = _union_box(vol)
    if box is None:
        return 0.0
    codes = _cube_codes(vol[box])
    return float(surfel_area_table(sp)[codes].sum())


def _checked_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    sp = tuple(float(s) for s in np.asarray(spacing, dtype=float).ravel())
    if len(sp) != 3:
        raise ValueError(f"spacing must have 3 elements, got {spacing!r}")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be positive and finite, got {spacing!r}")
    return sp  # type: ignore[return-value]


def _as_volume(mask: np.ndarray, spacing: Sequence[float] | None) -> tuple[np.ndarray, tuple[float, float, float]]:
    if mask.ndim == 2:
        if spacing is None:
            sp: tuple = (1.0, 1.0, 1.0)
        else:
            sp = tuple(float(s) for s in np.asarray(spacing, dtype=float).ravel())
            if len(sp) == 2:
                sp = sp + (1.0,)
        return mask[:, :, None], _checked_spacing(sp)
    if mask.ndim != 3:
        raise ValueError(f"masks must be 2D or 3D, got {mask.ndim}D")
    if spacing is None:
        raise ValueError("spacing is required for 3D masks")
    return mask, _checked_spacing(spacing)


def _union_box(*masks: np.ndarray) -> tuple[slice, ...] | None:
    union = masks[0] if len(masks) == 1 else np.logical_or.reduce(masks)
    return _mask_box(union)


def surface_dice(mask_gt: np.ndarray, mask_pred: np.ndarray, spacing: Sequence[float] | None = None,
                 tolerance: float = DEFAULT_TOLERANCE) -> float:
    """Surface Dice at ``tolerance`` of two binary masks (DeepMind's method).

    ``mask_gt`` and ``mask_pred`` are boolean (or 0/1) arrays of the same shape,
    3D with a 3-element ``spacing`` (mm per array axis), or 2D, which is treated
    as ``(H, W, 1)`` with spacing ``(1, 1, 1)`` when ``spacing`` is None (the
    challenge's 2D rule; a 2-element spacing gets a third element 1.0).

    Returns NaN when both masks are empty and 0.0 when exactly one is.
    """
    gt = np.asarray(mask_gt).astype(bool, copy=False)
    pred = np.asarray(mask_pred).astype(bool, copy=False)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: {gt.shape} vs {pred.shape}")
    gt, sp = _as_volume(gt, spacing)
    pred, _ = _as_volume(pred, sp)
    box = _union_box(gt, pred)
    if box is None:
        return math.nan
    return _surface_dice_cropped(gt[box], pred[box], sp, float(tolerance))


# ---------------------------------------------------------------------------
# DSC and case-level metrics
# ---------------------------------------------------------------------------

def _label_counts(arr: np.ndarray, max_label: int) -> np.ndarray:
    """Voxel count of each value ``0..max_label`` in ``arr`` (other values ignored)."""
    flat = arr.ravel()
    if flat.dtype == bool:
        flat = flat.view(np.uint8)
    if flat.size and (np.issubdtype(flat.dtype, np.signedinteger) or flat.dtype.kind == "f"
                      or int(flat.max()) > max_label):
        keep = (flat >= 0) & (flat <= max_label)
        if flat.dtype.kind == "f":
            keep &= flat == np.floor(flat)  # only whole-number labels count, as with ``==``
        flat = flat[keep]
    if flat.dtype.kind == "f":
        flat = flat.astype(np.int64)
    return np.bincount(flat, minlength=max_label + 1)[: max_label + 1]


def _dice_from_counts(inter: np.ndarray, n_gt: np.ndarray, n_seg: np.ndarray) -> np.ndarray:
    total = n_gt + n_seg
    with np.errstate(invalid="ignore", divide="ignore"):
        dsc = 2.0 * inter / total
    dsc = np.where(total == 0, np.nan, dsc)
    return dsc.astype(np.float64)


def _all_label_dice(gt: np.ndarray, seg: np.ndarray, max_label: int) -> np.ndarray:
    """DSC for labels ``0..max_label`` (index 0 is background, unused)."""
    n_gt = _label_counts(gt, max_label)
    n_seg = _label_counts(seg, max_label)
    inter = _label_counts(gt[gt == seg], max_label)
    return _dice_from_counts(inter, n_gt, n_seg)


def dice_per_label(gt: np.ndarray, seg: np.ndarray, labels: Iterable[int]) -> np.ndarray:
    """DSC ``2|G==i & S==i| / (|G==i| + |S==i|)`` for each label ``i`` in ``labels``.

    Returns a float64 array aligned with ``labels``; NaN where a label is absent
    from both ``gt`` and ``seg``.  Arrays must have the same shape.
    """
    gt = np.asarray(gt)
    seg = np.asarray(seg)
    if gt.shape != seg.shape:
        raise ValueError(f"gt and seg shapes differ: {gt.shape} vs {seg.shape}")
    labels = [int(i) for i in labels]
    if not labels:
        return np.zeros(0, dtype=np.float64)
    if min(labels) < 0:
        raise ValueError("labels must be non-negative")
    all_dsc = _all_label_dice(gt, seg, max(labels))
    return all_dsc[labels]


@dataclass(frozen=True)
class CaseMetrics:
    """Metrics of one case.

    ``dsc``: mean DSC over labels ``1..gt.max()`` (NaN if any label is absent
    from both masks, or if ``gt`` has no labels).  ``nsd``: mean surface Dice
    over the same labels when ``dsc > 0.2``, else 0.0 (NaN when NSD was not
    requested).  ``dsc_per_label`` / ``nsd_per_label``: per-label values in label
    order; ``nsd_per_label`` is empty when NSD was gated off or not requested.
    """

    dsc: float
    nsd: float
    dsc_per_label: tuple
    nsd_per_label: tuple


def _top_label(gt: np.ndarray) -> int:
    """``gt.max()`` (0 when empty), or ValueError above :data:`MAX_LABEL`: every label ``1..max`` is
    scored, so one stray voxel labelled 2e8 would otherwise allocate gigabytes of per-label counts."""
    top = int(gt.max()) if gt.size else 0
    if top > MAX_LABEL:
        raise ValueError(f"gt has label {top}; labels above {MAX_LABEL} cannot be scored (every label 1..max is)")
    return top


def _case_spacing(gt: np.ndarray, seg: np.ndarray, spacing: Sequence[float] | None) -> tuple[float, ...]:
    """The spacing a case is scored with: (1, 1) for 2D (the challenge scores 2D cases in pixels), the
    checked ``spacing`` for 3D; ValueError for mismatched shapes, a 3D case without spacing, other ranks."""
    if gt.shape != seg.shape:
        raise ValueError(f"gt and seg shapes differ: {gt.shape} vs {seg.shape}")
    if gt.ndim == 2:
        return (1.0, 1.0)
    if gt.ndim == 3:
        if spacing is None:
            raise ValueError("spacing is required for 3D cases")
        return _checked_spacing(spacing)
    raise ValueError(f"gt must be 2D or 3D, got {gt.ndim}D")


def case_metrics(gt: np.ndarray, seg: np.ndarray, spacing: Sequence[float] | None = None,
                 tolerance: float = DEFAULT_TOLERANCE, compute_nsd: bool = True) -> CaseMetrics:
    """Challenge DSC and NSD of one case.

    ``gt`` and ``seg`` are integer label arrays of the same shape.  2D arrays
    (``gt.ndim == 2``) are scored as ``(H, W, 1)`` volumes with spacing
    ``(1, 1, 1)`` whatever ``spacing`` says (as the challenge does); 3D arrays
    need ``spacing`` (mm per array axis, e.g. the gts file's ``spacing``).
    Labels are ``1..gt.max()``; labels of ``seg`` above ``gt.max()`` are ignored. A ``gt`` label above
    :data:`MAX_LABEL` is a ValueError.
    """
    gt = np.asarray(gt)
    seg = np.asarray(seg)
    sp = _case_spacing(gt, seg, spacing)
    if gt.ndim == 2:
        sp = (1.0, 1.0, 1.0)  # scored as (H, W, 1)
    if gt.dtype == bool:
        gt = gt.view(np.uint8)
    if seg.dtype == bool:
        seg = seg.view(np.uint8)

    max_label = _top_label(gt)
    if max_label <= 0:
        return CaseMetrics(math.nan, 0.0 if compute_nsd else math.nan, (), ())
    if gt.ndim == 2:
        gt = gt[:, :, None]
        seg = seg[:, :, None]

    # Few labels: one boolean pass per label is cheaper than counting all values
    # (and the per-label masks are reused for the NSD crops).
    few = max_label <= _FEW_LABELS
    masks: list[tuple[np.ndarray, np.ndarray]] = []
    if few:
        rows = []
        for label in range(1, max_label + 1):
            g = gt == label
            s = seg == label
            rows.append((np.count_nonzero(g & s), np.count_nonzero(g), np.count_nonzero(s)))
            masks.append((g, s))
        inter, n_gt, n_seg = (np.array(col, dtype=np.int64) for col in zip(*rows))
        dsc_all = _dice_from_counts(inter, n_gt, n_seg)
    else:
        dsc_all = _all_label_dice(gt, seg, max_label)[1:]
    dsc = float(np.mean(dsc_all))
    dsc_labels = tuple(float(x) for x in dsc_all)
    if not compute_nsd:
        return CaseMetrics(dsc, math.nan, dsc_labels, ())
    if not dsc > NSD_DSC_GATE:  # NaN fails too
        return CaseMetrics(dsc, 0.0, dsc_labels, ())

    tol = float(tolerance)
    nsd_labels = []
    if few:
        for g, s in masks:
            box = _mask_box(g | s)
            if box is None:
                nsd_labels.append(math.nan)
                continue
            nsd_labels.append(_surface_dice_cropped(g[box], s[box], sp, tol))
    else:
        gt_i = gt if np.issubdtype(gt.dtype, np.integer) else gt.astype(np.int64)
        seg_i = seg if np.issubdtype(seg.dtype, np.integer) else seg.astype(np.int64)
        seg_pos = seg_i
        if np.issubdtype(seg_i.dtype, np.signedinteger) and int(seg_i.min()) < 0:
            seg_pos = np.where(seg_i < 0, 0, seg_i)
        gt_boxes = ndimage.find_objects(gt_i, max_label=max_label)
        seg_boxes = list(ndimage.find_objects(seg_pos, max_label=max_label))
        seg_boxes += [None] * (max_label - len(seg_boxes))
        for label in range(1, max_label + 1):
            box = _merge_boxes(gt_boxes[label - 1], seg_boxes[label - 1])
            if box is None:
                nsd_labels.append(math.nan)
                continue
            nsd_labels.append(_surface_dice_cropped(gt_i[box] == label, seg_i[box] == label, sp, tol))
    nsd = float(np.mean(np.asarray(nsd_labels, dtype=np.float64)))
    return CaseMetrics(dsc, nsd, dsc_labels, tuple(nsd_labels))


#: Up to this many labels, case_metrics works with one boolean mask per label.
_FEW_LABELS = 8


def _mask_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box (slices) of a 3D boolean mask, None when empty."""
    plane = mask.any(axis=0)
    rows0 = np.flatnonzero(mask.any(axis=(1, 2)))
    if not rows0.size:
        return None
    rows1 = np.flatnonzero(plane.any(axis=1))
    rows2 = np.flatnonzero(plane.any(axis=0))
    return (slice(int(rows0[0]), int(rows0[-1]) + 1), slice(int(rows1[0]), int(rows1[-1]) + 1),
            slice(int(rows2[0]), int(rows2[-1]) + 1))


def _merge_boxes(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


# ---------------------------------------------------------------------------
# Surface distances: HD95 and MASD (opt-in extras; not challenge metrics)
# ---------------------------------------------------------------------------

#: The challenge's metrics, always computed by ``harness run`` and ``harness score``.
CHALLENGE_METRICS = ("dsc", "nsd")
#: The extra surface-distance metrics of :func:`distance_metrics` (mm), asked for with ``--metrics``.
DISTANCE_METRICS = ("hd95", "masd")
#: Every metric name ``--metrics`` accepts, in the order columns and record fields appear.
METRIC_NAMES = CHALLENGE_METRICS + DISTANCE_METRICS
#: The percentile of :func:`distance_metrics`'s ``hd95``.
HD_PERCENTILE = 95.0

#: What :func:`distance_metrics` gives a label that is empty in one or both masks.
EMPTY_MASK_POLICY = (
    "A label absent from both the ground truth and the prediction is NaN for that label and is left out "
    "of the case mean (like the challenge's NaN DSC). A label present in exactly one of them (missed or "
    "hallucinated) gets the worst value, for hd95 and masd alike: the diagonal of the whole image in mm, "
    "sqrt(sum((n_i * s_i)**2)) over the array axes (n_i voxels of spacing s_i; pixels for 2D cases), "
    "which exceeds every distance between two voxels of the image. A case whose labels are all NaN "
    "(or that has no labels) is NaN."
)


def parse_metrics(names: str | Iterable[str]) -> tuple[str, ...]:
    """Metric names (``"dsc,nsd,hd95"`` or a list) as a tuple in :data:`METRIC_NAMES` order.

    ``dsc`` and ``nsd`` are always included (the leaderboard needs them); repeats are dropped.
    An unknown name is a ValueError that lists the valid ones.
    """
    items = names.split(",") if isinstance(names, str) else list(names)
    wanted = {str(n).strip().lower() for n in items if str(n).strip()}
    unknown = sorted(wanted - set(METRIC_NAMES))
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; valid: {', '.join(METRIC_NAMES)}")
    wanted |= set(CHALLENGE_METRICS)
    return tuple(name for name in METRIC_NAMES if name in wanted)


def _surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one face neighbour outside it (``mask`` has an empty outer ring).

    This is ``mask & ~erosion(mask)`` with the cross-shaped (face-connectivity) structuring element,
    the image outside counting as background.
    """
    inner = mask.copy()
    for axis in range(mask.ndim):
        hi = [slice(None)] * mask.ndim
        lo = [slice(None)] * mask.ndim
        hi[axis] = slice(1, None)
        lo[axis] = slice(None, -1)
        inner[tuple(hi)] &= mask[tuple(lo)]  # the neighbour at -1 along the axis
        inner[tuple(lo)] &= mask[tuple(hi)]  # the neighbour at +1
    return mask & ~inner


def _directed_distances(gt: np.ndarray, seg: np.ndarray,
                        spacing: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``gt`` to the nearest of ``seg``, and the reverse.

    Both masks are non-empty boolean arrays already cropped to (at least) their union box.  A one
    voxel empty ring is added, so that surface voxels at the crop's edge are found as in the image.
    """
    gt = np.pad(gt, 1)
    seg = np.pad(seg, 1)
    surf_gt = _surface_voxels(gt)
    surf_seg = _surface_voxels(seg)
    gt_to_seg = ndimage.distance_transform_edt(~surf_seg, sampling=spacing)[surf_gt]
    seg_to_gt = ndimage.distance_transform_edt(~surf_gt, sampling=spacing)[surf_seg]
    return gt_to_seg, seg_to_gt


def _label_image(arr: np.ndarray) -> np.ndarray:
    """``arr`` as non-negative integer labels for ``ndimage.find_objects`` (negative and fractional
    values, which match no label ``1..L``, become 0)."""
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if arr.dtype.kind == "f":
        whole = np.isfinite(arr) & (arr == np.floor(arr)) & (arr > 0)
        return np.where(whole, arr, 0).astype(np.int64)
    if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
        return np.where(arr < 0, 0, arr)
    return arr


def distance_metrics(gt: np.ndarray, seg: np.ndarray, spacing: Sequence[float] | None = None,
                     metrics: Iterable[str] = DISTANCE_METRICS) -> dict:
    """HD95 and MASD of one case, per label and as the case value, in mm.

    Conventions as :func:`case_metrics`: labels are ``1..gt.max()``; labels of ``seg`` above
    ``gt.max()`` are ignored; 2D arrays are scored in pixels (spacing ``(1, 1)``, whatever
    ``spacing`` says, as the challenge scores 2D cases); 3D arrays need ``spacing`` (mm per array
    axis); a ``gt`` label above :data:`MAX_LABEL` is a ValueError.  ``metrics``: any of ``"hd95"``,
    ``"masd"``.

    Definitions (those of MONAI's ``compute_hausdorff_distance(..., percentile=95, spacing=...)``
    and ``compute_average_surface_distance(..., symmetric=True, spacing=...)``), per label, with
    ``G`` and ``S`` the label's ground-truth and predicted masks:

    * surface ``dG``: the voxels of ``G`` that have at least one face neighbour (4-neighbourhood
      in 2D, 6 in 3D) outside ``G``, the outside of the image counting as background, i.e.
      ``G & ~binary_erosion(G)``; likewise ``dS``;
    * directed distances ``d(x, dS)``: for each ``x`` in ``dG``, the Euclidean distance in mm
      (array offsets times ``spacing``) between voxel centres to the nearest voxel of ``dS``;
      and ``d(y, dG)`` for each ``y`` in ``dS``;
    * ``hd95 = max(P95{d(x, dS) : x in dG}, P95{d(y, dG) : y in dS})``, where ``P95`` is the
      95th percentile with linear interpolation between order statistics (numpy's and torch's
      default);
    * ``masd = (sum_x d(x, dS) + sum_y d(y, dG)) / (|dG| + |dS|)``: the mean over both surfaces'
      distances taken together (not the mean of the two directed means).

    Empty masks (:data:`EMPTY_MASK_POLICY`): a label absent from both masks is NaN and left out of
    the case mean; a label present in exactly one gets the image diagonal in mm,
    ``sqrt(sum((n_i * s_i)**2))``.  The case value is the mean over the non-NaN labels, NaN when
    there are none.

    Each label is computed on the union bounding box of its two masks plus a one-voxel margin
    (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing`` on that crop).

    Returns ``{name: case value, name + "_per_label": tuple of per-label values}`` for each
    requested name, in :data:`DISTANCE_METRICS` order.
    """
    wanted = [str(m).strip().lower() for m in metrics]
    unknown = sorted(set(wanted) - set(DISTANCE_METRICS))
    if unknown:
        raise ValueError(f"unknown distance metric(s) {', '.join(unknown)}; valid: {', '.join(DISTANCE_METRICS)}")
    names = [m for m in DISTANCE_METRICS if m in wanted]
    gt = np.asarray(gt)
    seg = np.asarray(seg)
    sp = _case_spacing(gt, seg, spacing)
    if not names:
        return {}

    gt_i = _label_image(gt)
    seg_i = _label_image(seg)
    max_label = _top_label(gt_i)
    per_label: dict[str, list[float]] = {name: [] for name in names}
    if max_label > 0:
        diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(gt.shape, sp)))
        gt_boxes = ndimage.find_objects(gt_i, max_label=max_label)
        seg_boxes = list(ndimage.find_objects(seg_i, max_label=max_label))
        seg_boxes += [None] * (max_label - len(seg_boxes))
        for label in range(1, max_label + 1):
            in_gt, in_seg = gt_boxes[label - 1], seg_boxes[label - 1]
            if in_gt is None and in_seg is None:
                values = {name: math.nan for name in names}
            elif in_gt is None or in_seg is None:
                values = {name: diagonal for name in names}
            else:
                box = _merge_boxes(in_gt, in_seg)
                gt_to_seg, seg_to_gt = _directed_distances(gt_i[box] == label, seg_i[box] == label, sp)
                values = {}
                if "hd95" in names:
                    values["hd95"] = float(max(np.percentile(gt_to_seg, HD_PERCENTILE),
                                               np.percentile(seg_to_gt, HD_PERCENTILE)))
                if "masd" in names:
                    values["masd"] = float((gt_to_seg.sum() + seg_to_gt.sum()) / (gt_to_seg.size + seg_to_gt.size))
            for name in names:
                per_label[name].append(values[name])
    out: dict = {}
    for name in names:
        labels = tuple(per_label[name])
        present = [v for v in labels if not math.isnan(v)]
        out[name] = float(np.mean(present)) if present else math.nan
        out[f"{name}_per_label"] = labels
    return out
