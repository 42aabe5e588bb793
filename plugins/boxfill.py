"""Box-fill baseline: every pixel inside box i gets label i+1 (every slice of a 3D box).

It is the floor any model must beat (a model near it only echoes the prompt), and a zero-weight
segmenter for fast tests of the harness itself.
"""
from __future__ import annotations

import numpy as np

from harness import Case, LoadOptions, SegmenterSpec, hookimpl


class BoxFill:
    """Fill each (inclusive) box with its label; later boxes overwrite earlier ones."""

    def segment(self, case: Case) -> np.ndarray:
        segs = np.zeros(case.spatial_shape, dtype=np.uint16)
        for i, box in enumerate(case.boxes):
            if case.dim == 2:
                x0, y0, x1, y1 = box
                segs[_span(y0, y1), _span(x0, x1)] = i + 1
            else:
                x0, y0, z0, x1, y1, z1 = box
                segs[_span(z0, z1), _span(y0, y1), _span(x0, x1)] = i + 1
        return segs

    def describe(self) -> dict:
        return {"params": 0, "flops": 0, "weights": None}


def _span(lo, hi) -> slice:
    """Inclusive pixel range covering [lo, hi] (fractional coordinates widen outwards)."""
    return slice(int(np.floor(lo)), int(np.ceil(hi)) + 1)


def load(options: LoadOptions) -> BoxFill:
    if options.weights is not None:
        raise ValueError("boxfill has no weights; drop --weights boxfill=...")
    return BoxFill()


@hookimpl
def harness_segmenters():
    return [
        SegmenterSpec(
            name="boxfill",
            title="Box fill (baseline)",
            family="baseline",
            load=load,
            resolution=None,
            reference="no model: fills each prompt box",
            description="Fills each box with its label; the floor every model must beat.",
        )
    ]
