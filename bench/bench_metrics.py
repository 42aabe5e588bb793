"""Speed and parity benchmark: harness.metrics.case_metrics vs the official-style computation.

Baseline ("official style"): DeepMind's surface-distance package as published on
PyPI (``pip install surface-distance==0.1``), wrapped in the per-label loop and
DSC > 0.2 gate of the challenge's ``evaluation/compute_metrics.py`` (our own few
lines below).  Both run side by side in one process on the same arrays.

Cases:
* the real 3D validation cases in ``shared/data/validation`` (gts from gts/,
  spacing from the gts file), scored against a box-fill prediction: label i
  fills its 3D box ``[x_min, y_min, z_min, x_max, y_max, z_max]`` (inclusive,
  from the imgs file), later boxes overwrite earlier ones;
* the 3D challenge-metric reference cases in ``shared/reference/metrics``
  (their own segs).
``--with-2d`` adds the 2D validation cases (box-filled too) and the 2D reference cases.

Usage::

    pip install -e ".[dev]"        # the dev extra brings surface-distance==0.1, the baseline
    python bench/bench_metrics.py [--repeat 3] [--with-2d]

Prints a markdown table with per-case times (best of ``--repeat``), the
speed-up ratio and the largest |difference| of DSC/NSD; exits non-zero if any
value differs by more than 1e-6.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.cases import load_case, load_ground_truth  # noqa: E402
from harness.metrics import case_metrics  # noqa: E402
from plugins.boxfill import BoxFill  # noqa: E402


def _shared_dir() -> Path:
    return Path(os.environ.get("HARNESS_SHARED_DIR", ROOT.parent / "shared"))


def _load_baseline():
    """Import DeepMind's PyPI surface-distance, with the NumPy 2 aliases it needs.

    surface-distance 0.1 uses ``np.Inf`` (when one mask is empty) and ``np.NaN``
    (DSC of two empty masks); both aliases were removed in NumPy 2.0.  We restore
    them here, for this benchmark process only, so the unmodified package runs.
    Its ``scipy.ndimage.filters`` / ``scipy.ndimage.morphology`` imports still
    exist (deprecated) in SciPy 1.x; their warnings are silenced.
    """
    if not hasattr(np, "Inf"):
        np.Inf = np.inf  # type: ignore[attr-defined]
    if not hasattr(np, "NaN"):
        np.NaN = np.nan  # type: ignore[attr-defined]
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        import surface_distance  # type: ignore
    except ImportError as exc:  # pragma: no cover - informative exit
        sys.exit(f"baseline missing: pip install surface-distance==0.1 ({exc})")
    return surface_distance


def official_style(sd, gt: np.ndarray, seg: np.ndarray, spacing, tolerance: float = 2.0):
    """The challenge's compute_metrics.py logic around the DeepMind functions (our own lines)."""
    n = int(gt.max())
    dsc = np.mean([sd.compute_dice_coefficient(gt == i, seg == i) for i in range(1, n + 1)])
    if dsc > 0.2:
        if gt.ndim == 2:
            gt, seg, spacing = gt[..., None], seg[..., None], [1.0, 1.0, 1.0]
        nsd_list = []
        for i in range(1, n + 1):
            dist = sd.compute_surface_distances(gt == i, seg == i, spacing_mm=spacing)
            nsd_list.append(sd.compute_surface_dice_at_tolerance(dist, tolerance))
        nsd = np.mean(nsd_list)
    else:
        nsd = 0.0
    return float(dsc), float(nsd)


def load_cases(with_2d: bool):
    shared = _shared_dir()
    cases = []
    val = shared / "data" / "validation"
    for gpath in sorted((val / "gts").glob("*.npz")):
        if not with_2d and not gpath.name.startswith("3D"):
            continue
        case = load_case(val / "imgs" / gpath.name)
        gt = load_ground_truth(gpath, case)
        cases.append((f"val/{gpath.stem}", gt.gts, BoxFill().segment(case), gt.spacing))
    ref = shared / "reference" / "metrics"
    if not ref.is_dir():
        print(f"note: {ref} absent; benchmarking the validation cases only", file=sys.stderr)
        return cases
    meta = json.loads((ref / "challenge_metric_cases.json").read_text())
    with np.load(ref / "challenge_metric_cases.npz") as z:
        for c in meta:
            if not with_2d and not c["is3d"]:
                continue
            k = c["case"]
            gt = z[f"{k}__gts"]
            cases.append((f"ref/{k}", gt, z[f"{k}__segs"], z[f"{k}__spacing"] if gt.ndim == 3 else None))
    return cases


def best_time(fn, repeat: int):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per case and side (best is kept)")
    ap.add_argument("--with-2d", action="store_true", help="also benchmark the 2D cases")
    args = ap.parse_args(argv)

    sd = _load_baseline()
    cases = load_cases(args.with_2d)
    case_metrics(np.ones((2, 2, 2), np.uint8), np.ones((2, 2, 2), np.uint8), (1, 1, 1))  # build the table once

    rows = []
    tot_ours = tot_base = 0.0
    max_diff = 0.0
    for name, gt, seg, spacing in cases:
        t_ours, m = best_time(lambda: case_metrics(gt, seg, spacing), args.repeat)
        t_base, (b_dsc, b_nsd) = best_time(lambda: official_style(sd, gt, seg, spacing), args.repeat)
        diff = max(abs(m.dsc - b_dsc) if not (np.isnan(m.dsc) and np.isnan(b_dsc)) else 0.0,
                   abs(m.nsd - b_nsd))
        max_diff = max(max_diff, diff)
        tot_ours += t_ours
        tot_base += t_base
        rows.append((name, "x".join(map(str, gt.shape)), int(gt.max()), m.dsc, m.nsd,
                     t_base * 1e3, t_ours * 1e3, t_base / t_ours, diff))

    print("| case | shape | labels | DSC | NSD | official-style ms | ours ms | speed-up | max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.4f} | {r[4]:.4f} | {r[5]:.1f} | {r[6]:.1f} | "
              f"{r[7]:.1f}x | {r[8]:.1e} |")
    print(f"| **total ({len(rows)} cases)** | | | | | {tot_base * 1e3:.1f} | {tot_ours * 1e3:.1f} | "
          f"**{tot_base / tot_ours:.1f}x** | {max_diff:.1e} |")
    same = max_diff <= 1e-6
    print(f"\nvalues identical (|diff| <= 1e-6 on every case): {'yes' if same else 'NO'}; "
          f"max |diff| = {max_diff:.3e}; total speed-up {tot_base / tot_ours:.2f}x "
          f"(best of {args.repeat} runs per case; numpy {np.__version__})")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
