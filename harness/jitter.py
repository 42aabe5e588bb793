"""Box robustness sweeps (``harness run --box-jitter 0,5,10,20``): every model under perturbed boxes.

For a level ``L`` (pixels, for a 256-pixel image), every side of every box moves independently by a
random whole number of pixels drawn uniformly from ``-a..a`` (negative: inward, positive: outward),
where ``a = floor(L * size / 256)`` and ``size`` is the image's width for x and its height for y (the
scaling of the 2025 challenge's box perturbation). A 3D box's z sides move too, by up to the same
physical distance as the in-plane sides: ``a_z = floor(L * mean(W * s_x, H * s_y) / 256 / s_z)``
slices, with ``s`` the spacing in mm (so z moves on thick-slice volumes as well). Sides are then
clipped to the image; a box whose sides crossed (an inward move past the other side) collapses to
their midpoint.

The draws are seeded by ``(seed, L, crc32(case file name))``: the same seed gives every model, every
runner and every resumed run the same perturbed boxes, whatever the order of the cases. Level 0 uses
the cases as they are, so its entry equals the plain run.

Each level other than 0 writes perturbed copies of the case files under
``OUT/box-jitter/seed-<seed>/level-<L>/imgs/`` (``gts`` there is a link to the data's ``gts/``); a case
that cannot be read is linked unchanged, so the run records its error as usual. Each level is its own
leaderboard entry, ``<entry>[jitter=L]`` (e.g. ``litemedsam[jitter=10]``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np

from harness.atomic import atomic_writer

if TYPE_CHECKING:  # pragma: no cover
    from harness.run import RunConfig, RunReport

__all__ = ["parse_levels", "jitter_amplitudes", "jitter_boxes", "jittered_data_dir", "run_box_jitter"]


def parse_levels(text: str | Iterable) -> tuple[int, ...]:
    """``"0,5,10,20"`` as ``(0, 5, 10, 20)``: non-negative whole pixels, repeats dropped, order kept."""
    items = text.split(",") if isinstance(text, str) else list(text)
    levels: list[int] = []
    for item in items:
        raw = str(item).strip()
        if not raw:
            continue
        try:
            level = int(raw)
        except ValueError:
            raise ValueError(f"box jitter level {raw!r} is not a whole number of pixels") from None
        if level < 0:
            raise ValueError(f"box jitter level {level} is negative")
        if level not in levels:
            levels.append(level)
    if not levels:
        raise ValueError("no box jitter level given (e.g. 0,5,10,20)")
    return tuple(levels)


def jitter_amplitudes(level: int, shape: tuple[int, ...], spacing=None) -> tuple[int, ...]:
    """Largest move per side, in pixels: ``(a_x, a_y)`` for a 2D ``(H, W)`` image, ``(a_x, a_y, a_z)`` for 3D."""
    if len(shape) == 2:
        h, w = shape
        return (int(math.floor(level * w / 256)), int(math.floor(level * h / 256)))
    d, h, w = shape
    sz, sy, sx = (float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    a_x, a_y = level * w / 256, level * h / 256
    a_z = (a_x * sx + a_y * sy) / 2 / sz
    return (int(math.floor(a_x)), int(math.floor(a_y)), int(math.floor(a_z)))


def jitter_boxes(boxes: np.ndarray, shape: tuple[int, ...], level: int, rng: np.random.Generator,
                 spacing=None) -> np.ndarray:
    """Perturbed copy of ``boxes`` ((N, 4) ``[x0, y0, x1, y1]`` or (N, 6) ``[x0, y0, z0, x1, y1, z1]``).

    ``shape``: ``(H, W)`` or ``(D, H, W)``. One draw per side from ``rng`` in ``-a..a`` (see the module
    docstring); clipped to the image; crossed sides collapse to their midpoint. The dtype is kept.
    """
    boxes = np.asarray(boxes)
    dim = boxes.shape[1] // 2
    amps = jitter_amplitudes(level, shape, spacing)
    extent = (shape[1], shape[0]) if dim == 2 else (shape[2], shape[1], shape[0])  # x, y[, z] sizes
    out = boxes.astype(np.float64, copy=True)
    for axis in range(dim):
        a = amps[axis]
        lo, hi = out[:, axis], out[:, axis + dim]
        lo -= rng.integers(-a, a + 1, size=len(out))  # positive draw: outward
        hi += rng.integers(-a, a + 1, size=len(out))
        np.clip(lo, 0, extent[axis] - 1, out=lo)
        np.clip(hi, 0, extent[axis] - 1, out=hi)
        crossed = lo > hi
        mid = np.floor((lo + hi) / 2)
        lo[crossed] = mid[crossed]
        hi[crossed] = mid[crossed]
    return out.astype(boxes.dtype) if boxes.dtype.kind in "iu" else out


def _case_rng(seed: int, level: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(level), zlib.crc32(name.encode())])


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        link.unlink()
    link.symlink_to(target)


def jittered_data_dir(data_dir: Path, out_dir: Path, level: int, seed: int,
                      cases: list[Path] | None = None) -> Path:
    """The data folder of one jitter level: ``data_dir`` itself for level 0, else perturbed copies under ``out_dir``.

    Existing copies are kept (they are written atomically and depend only on the case, level and seed).
    """
    from harness.cases import CaseError, discover_cases, load_case

    if level == 0:
        return data_dir
    root = out_dir / "box-jitter" / f"seed-{seed}" / f"level-{level}"
    imgs = root / "imgs"
    imgs.mkdir(parents=True, exist_ok=True)
    gts = data_dir / "gts"
    if gts.is_dir():
        _link(gts.resolve(), root / "gts")
    for path in cases if cases is not None else discover_cases(data_dir):
        target = imgs / path.name
        if target.is_file() and not target.is_symlink():
            continue
        try:
            case = load_case(path)
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (CaseError, OSError, ValueError):
            _link(path.resolve(), target)  # the run reports why it cannot be read
            continue
        shape = case.spatial_shape
        arrays["boxes"] = jitter_boxes(case.boxes, shape, level, _case_rng(seed, level, path.name), case.spacing)
        if target.is_symlink():
            target.unlink()
        with atomic_writer(target, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return root


def run_box_jitter(config: "RunConfig", levels: Iterable[int], seed: int = 0, plugins=None, log=print) -> "RunReport":
    """:func:`harness.run.run` once per level, each on its (perturbed) cases and under ``<entry>[jitter=L]``.

    The level travels as ``box_jitter`` on a copy of ``config``, which :func:`harness.choices.variant_tags`
    turns into the entry's ``jitter=L`` tag. A run of a docker image (``--image``) names its entry
    from the image and cannot carry the tag: refused.
    """
    from harness.cases import discover_cases
    from harness.run import RunReport, run
    from harness.runners.base import RunnerError

    if config.image:
        raise RunnerError("--box-jitter is not available with --image (an image's entry name cannot carry the level)")
    try:
        levels = parse_levels(levels)
    except ValueError as exc:
        raise RunnerError(f"--box-jitter: {exc}") from None
    total = RunReport()
    cases = discover_cases(config.data_dir, config.limit)
    for level in levels:
        data = jittered_data_dir(Path(config.data_dir), Path(config.out_dir), level, seed, cases)
        level_config = dataclasses.replace(config, data_dir=data)
        level_config.box_jitter = level  # type: ignore[attr-defined]
        log(f"box jitter {level} px (seed {seed}): cases from {data}")
        report = run(level_config, plugins, log)
        total.done += report.done
        total.errors += report.errors
        total.skipped += report.skipped
        total.failed_models.update(report.failed_models)
    return total
