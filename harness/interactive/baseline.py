"""A torch-free interactive baseline: fill each box, then add or carve a ball at every click.

Not a model: a yardstick and a test double for the protocol (what any learned model should beat),
the interactive counterpart of the ``boxfill`` segmenter. For class position ``i`` (written as label
``i + 1``): step 1 fills the box's rectangle on every slice from ``z_min`` to ``z_max``; from then on
the input's ``prev_pred`` is kept for that label, a foreground click sets a ball of ``radius`` voxels
around it to the label and a background click clears the label from such a ball. Only the newest
click of each class is applied to ``prev_pred`` (the older ones already are).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.interactive.safe_npz import InteractiveInput, read_interactive_input

__all__ = ["DEFAULT_RADIUS", "box_click_fill", "baseline_step"]

#: Radius, in voxels, of the ball a click adds or carves.
DEFAULT_RADIUS = 3


def _ball(shape: tuple[int, ...], center: list[int], radius: int) -> tuple[tuple[slice, ...], np.ndarray]:
    lo = [max(0, c - radius) for c in center]
    hi = [min(n, c + radius + 1) for c, n in zip(center, shape)]
    grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    dist2 = sum((g - c) ** 2 for g, c in zip(grids, center))
    return tuple(slice(a, b) for a, b in zip(lo, hi)), dist2 <= radius * radius


def box_click_fill(case: InteractiveInput, radius: int = DEFAULT_RADIUS) -> np.ndarray:
    """The baseline's segmentation (uint8) of one 2025-format input; see the module docstring."""
    shape = case.shape
    if case.clicks is None or case.prev_pred is None:
        segs = np.zeros(shape, np.uint8)
        for i, box in enumerate(case.boxes or []):
            segs[box["z_min"]:box["z_max"] + 1, box["z_mid_y_min"]:box["z_mid_y_max"] + 1,
                 box["z_mid_x_min"]:box["z_mid_x_max"] + 1] = i + 1
        return segs
    segs = case.prev_pred.astype(np.uint8, copy=True)
    order = case.clicks_order or [[] for _ in case.clicks]
    for i, (clicks, kinds) in enumerate(zip(case.clicks, order)):
        if not kinds or kinds[-1] is None:
            continue
        kind = kinds[-1]
        where, ball = _ball(shape, clicks[kind][-1], radius)
        region = segs[where]
        if kind == "fg":
            region[ball] = i + 1
        else:
            region[ball & (region == i + 1)] = 0
    return segs


def baseline_step(input_path: Path, outputs_dir: Path) -> np.ndarray:
    """A :data:`~harness.interactive.protocol.StepFunction` running :func:`box_click_fill`."""
    return box_click_fill(read_interactive_input(input_path))
