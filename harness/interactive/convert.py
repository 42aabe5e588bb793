"""``harness convert --to interactive``: 2024-format 3D cases to 2025-format interactive inputs.

A 2024 case (``DIR/imgs/<name>.npz`` with ``imgs``, ``boxes``, ``spacing`` and ``DIR/gts/<name>.npz``
with ``gts``) becomes ``OUT/imgs/<name>.npz`` with ``imgs``, ``spacing`` and ``boxes`` (one dict per
class, see :func:`boxes_from_gts`), and ``OUT/gts/<name>.npz`` with ``gts`` and ``spacing``: the
ground truth never goes into the input, as in the 2025 challenge. 2D cases are skipped (the protocol
is 3D). Only ``OUT`` is written, each file atomically; ``OUT`` may not be ``DIR`` itself nor hold
``DIR``'s ``imgs``/``gts`` folders. One bad case is reported and the others still convert.

The boxes follow the organisers' published rule (repository JunMa11/CVPR-MedSegFMCompetition,
``get_boxes.py``, with the middle-slice fix of its issue #7).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.atomic import atomic_writer
from harness.cases import CaseError, discover_cases, load_case, load_ground_truth
from harness.interactive.clicks import click_classes
from harness.interactive.safe_npz import write_interactive_input

__all__ = ["BOX_SEED", "MAX_BOX_SHIFT", "boxes_from_gts", "ConvertReport", "convert_to_interactive"]

#: The seed of the box perturbation (the organisers seed numpy's generator with 2025).
BOX_SEED = 2025
#: Each box side grows by a random 0..MAX_BOX_SHIFT pixels, scaled by image size / 256.
MAX_BOX_SHIFT = 5


def boxes_from_gts(gts: np.ndarray, seed: int = BOX_SEED) -> list[dict]:
    """The 2025 box prompts of a 3D ground truth: one dict per class (``np.unique(gts)[1:]``, in order).

    Per class: ``z_min``/``z_max`` the first and last slices holding it; ``z_mid = unique_z[len(unique_z) // 2]``
    (the middle of the slices holding it, the upper one of two); on that slice the class's x/y extent,
    grown on every side by one random ``shift`` in 0..5 drawn per class (``randint(0, 6, 1)[0]`` of a
    ``numpy.random.RandomState(seed)``), scaled per axis as ``int(shift * W / 256)`` for x and
    ``int(shift * H / 256)`` for y, then clipped to the image. The organisers seed once per worker
    process, so their draws depend on how files fell to workers; this reseeds per case, so a case's
    boxes depend on that case alone (the same draws as the organisers' for a worker's first file).
    """
    gts = np.asarray(gts)
    if gts.ndim != 3:
        raise ValueError(f"boxes_from_gts takes a 3D (D, H, W) ground truth; got shape {gts.shape}")
    rng = np.random.RandomState(seed)
    _, h, w = gts.shape
    boxes = []
    for label in click_classes(gts):
        mask = gts == label
        z_slices = np.flatnonzero(mask.any(axis=(1, 2)))
        z_mid = int(z_slices[len(z_slices) // 2])
        ys, xs = np.nonzero(mask[z_mid])
        shift = int(rng.randint(0, MAX_BOX_SHIFT + 1, 1)[0])
        dx, dy = int(shift * w / 256), int(shift * h / 256)
        boxes.append({
            "z_min": int(z_slices[0]),
            "z_max": int(z_slices[-1]),
            "z_mid": z_mid,
            "z_mid_x_min": max(0, int(xs.min()) - dx),
            "z_mid_y_min": max(0, int(ys.min()) - dy),
            "z_mid_x_max": min(w - 1, int(xs.max()) + dx),
            "z_mid_y_max": min(h - 1, int(ys.max()) + dy),
        })
    return boxes


@dataclass
class ConvertReport:
    """What :func:`convert_to_interactive` did: names converted, 2D names skipped, and per-case errors."""

    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def _gts_dir(data_dir: Path) -> Path:
    return data_dir / "gts"


def convert_to_interactive(data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                           seed: int = BOX_SEED) -> ConvertReport:
    """Convert every 3D case of ``data_dir`` (2024 layout) into ``out_dir`` (2025 layout); see the module doc.

    Raises ValueError before writing anything when ``out_dir`` would overwrite the inputs, and
    FileNotFoundError when ``data_dir`` has no cases folder.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    files = discover_cases(data_dir)
    imgs_dir = files[0].parent if files else data_dir / "imgs"
    gts_dir = _gts_dir(data_dir)
    inputs = {p.resolve() for p in (data_dir, imgs_dir, gts_dir)}
    for dst in (out_dir, out_dir / "imgs", out_dir / "gts"):
        if dst.resolve() in inputs:
            raise ValueError(f"{out_dir}: writing there would overwrite the input cases in {data_dir}; "
                             "choose another output folder")
    report = ConvertReport()
    for path in files:
        name = path.name
        try:
            case = load_case(path)
            if case.dim != 3:
                report.skipped.append(name)
                continue
            gt_path = gts_dir / name
            truth = load_ground_truth(gt_path, case)
            gts = truth.gts
            if not click_classes(gts):
                raise CaseError(gt_path, "gts has no labelled voxel; the interactive protocol needs at least one class")
            boxes = boxes_from_gts(gts, seed)
            spacing = truth.spacing if truth.spacing is not None else case.spacing
            write_interactive_input(out_dir / "imgs" / name, case.imgs, spacing, boxes=boxes)
            with atomic_writer(out_dir / "gts" / name, "wb") as fh:
                np.savez_compressed(fh, gts=gts, spacing=np.asarray(spacing, dtype=np.float64))
            report.converted.append(name)
        except (CaseError, ValueError, OSError) as exc:
            report.errors[name] = str(exc)
    return report
