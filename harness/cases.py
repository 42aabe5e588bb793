"""The case contract: load and validate challenge npz files.

A *case* is one ``imgs/<name>.npz`` file of the CVPR 2024 "MedSAM on Laptop" format:

* 2D (``2DBox_<Modality>_<id>.npz``): ``imgs`` (H, W, 3) or (H, W) uint8 and ``boxes`` (N, 4)
  ``[x_min, y_min, x_max, y_max]``.
* 3D (``3DBox_<Modality>_<id>.npz``): ``imgs`` (D, H, W) uint8, ``boxes`` (N, 6)
  ``[x_min, y_min, z_min, x_max, y_max, z_max]`` and ``spacing`` (3,) in array-axis order.

Box row ``i`` prompts label ``i + 1``. Box maxima are inclusive pixel indices. Ground truth lives in
``gts/<name>.npz`` (``gts``: integer labels 0..N with the image's spatial shape; 3D files carry
``spacing``). Segmentations are written as ``segs`` (uint16) under the same file name.

Every violation raises :class:`CaseError`, whose message names the file and what is wrong. Files are
read with ``allow_pickle=False``: a pickled (object) array is refused, never executed.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from harness.atomic import atomic_writer

__all__ = [
    "CaseError",
    "Case",
    "GroundTruth",
    "MODALITY_ALIASES",
    "modality_from_name",
    "load_case",
    "load_ground_truth",
    "save_segs",
    "load_segs",
    "discover_cases",
]


class CaseError(ValueError):
    """A case file violates the challenge format. ``str(err)`` is ``"<file>: <problem>"``."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# Spellings seen in challenge file names and write-ups, mapped to one canonical modality name.
# Keys are compared case-insensitively with '-', '_' and spaces removed.
MODALITY_ALIASES: dict[str, str] = {
    "ct": "CT",
    "mr": "MR",
    "mri": "MR",
    "pet": "PET",
    "us": "US",
    "ultrasound": "US",
    "ultra": "US",
    "xray": "X-Ray",
    "cxr": "X-Ray",
    "xr": "X-Ray",
    "dermoscopy": "Dermoscopy",
    "dermatoscopy": "Dermoscopy",
    "endoscopy": "Endoscopy",
    "endoscope": "Endoscopy",
    "fundus": "Fundus",
    "microscopy": "Microscopy",
    "microscope": "Microscopy",
    "mammography": "Mammography",
    "mammo": "Mammography",
    "oct": "OCT",
}


def modality_from_name(name: str) -> str:
    """Modality of a case from its file name: the second ``_`` token, through :data:`MODALITY_ALIASES`.

    ``"2DBox_X-Ray_0053.npz" -> "X-Ray"``, ``"2DBox_Microscope_0008" -> "Microscopy"``.
    An unknown spelling is returned as written; a name without a second token gives ``"unknown"``.
    """
    stem = Path(name).name
    if stem.endswith(".npz"):
        stem = stem[: -len(".npz")]
    parts = stem.split("_")
    if len(parts) < 2 or not parts[1]:
        return "unknown"
    token = parts[1]
    return MODALITY_ALIASES.get(token.lower().replace("-", "").replace(" ", ""), token)


@dataclass(frozen=True)
class Case:
    """One validated input case.

    ``imgs`` is uint8, (H, W, 3) for 2D (grey images are repeated to 3 channels) or (D, H, W) for 3D.
    ``boxes`` is (N, 4) or (N, 6), in the file's numeric dtype (integers stay integers), with boxes
    partly outside the image clipped to it (each clip is listed in ``warnings``).
    """

    name: str
    path: Path
    dim: int
    modality: str
    imgs: np.ndarray = field(repr=False)
    boxes: np.ndarray = field(repr=False)
    spacing: tuple[float, float, float] | None = None
    warnings: tuple[str, ...] = ()

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """(H, W) for 2D, (D, H, W) for 3D: the shape of ``segs`` and ``gts``."""
        return self.imgs.shape[:2] if self.dim == 2 else self.imgs.shape

    @property
    def n_boxes(self) -> int:
        return int(self.boxes.shape[0])


@dataclass(frozen=True)
class GroundTruth:
    """Validated ground truth: ``gts`` integer labels and the spacing to score with (None for 2D)."""

    path: Path
    gts: np.ndarray = field(repr=False)
    spacing: tuple[float, float, float] | None


def _open_npz(path: Path) -> dict[str, np.ndarray]:
    """Read every array of an npz file, turning every failure into a CaseError."""
    if not path.is_file():
        raise CaseError(path, "file not found")
    if not zipfile.is_zipfile(path):
        raise CaseError(path, "not an npz file (not a zip archive, or truncated)")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in npz.files:
                try:
                    arrays[key] = npz[key]
                except ValueError as exc:
                    if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                        raise CaseError(path, f"key '{key}' holds pickled (object) content, which is refused") from None
                    raise CaseError(path, f"key '{key}' cannot be read: {exc}") from None
    except CaseError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
        raise CaseError(path, f"corrupt or truncated npz ({type(exc).__name__}: {exc})") from None
    return arrays


def _require(arrays: dict[str, np.ndarray], key: str, path: Path) -> np.ndarray:
    if key not in arrays:
        present = ", ".join(sorted(arrays)) or "none"
        raise CaseError(path, f"missing key '{key}' (keys present: {present})")
    return arrays[key]


def _as_uint8_image(imgs: np.ndarray, path: Path, warnings: list[str]) -> np.ndarray:
    """Check the intensity dtype and range; non-uint8 images with values in 0..255 are converted."""
    if imgs.dtype == np.uint8:
        return imgs
    if imgs.dtype.kind not in "iuf":
        raise CaseError(path, f"imgs has dtype {imgs.dtype}; expected uint8")
    if imgs.dtype.kind == "f":
        finite = np.isfinite(imgs)
        if not finite.all():
            n_nan = int(np.isnan(imgs).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise CaseError(path, f"imgs contains {n_nan} NaN and {n_inf} infinite values")
    lo, hi = imgs.min(), imgs.max()
    if lo < 0 or hi > 255:
        raise CaseError(path, f"imgs has dtype {imgs.dtype} with values in [{lo}, {hi}]; expected uint8 0..255")
    warnings.append(f"imgs dtype {imgs.dtype} converted to uint8")
    return np.rint(imgs).astype(np.uint8) if imgs.dtype.kind == "f" else imgs.astype(np.uint8)


def _dim_from_name(name: str) -> int | None:
    if name.startswith("2D"):
        return 2
    if name.startswith("3D"):
        return 3
    return None


def _check_image(imgs: np.ndarray, name: str, path: Path) -> tuple[np.ndarray, int]:
    """Validate the image's shape; return it as (H, W, 3) or (D, H, W) and the case dimension."""
    if imgs.size == 0:
        raise CaseError(path, f"imgs is empty (shape {imgs.shape})")
    declared = _dim_from_name(name)
    if imgs.ndim == 2:
        dim = 2
    elif imgs.ndim == 3:
        if declared == 3:
            dim = 3
        elif declared == 2 or imgs.shape[-1] in (1, 3):
            dim = 2
        else:
            dim = 3
    else:
        raise CaseError(path, f"imgs has {imgs.ndim} dimensions (shape {imgs.shape}); expected (H,W,3), (H,W) or (D,H,W)")
    if declared is not None and declared != dim:
        raise CaseError(path, f"the name says {declared}D but imgs has shape {imgs.shape}")
    if dim == 2:
        if imgs.ndim == 3 and imgs.shape[-1] == 1:
            imgs = imgs[..., 0]
        if imgs.ndim == 2:
            imgs = np.repeat(imgs[:, :, None], 3, axis=-1)
        if imgs.shape[-1] != 3:
            raise CaseError(path, f"2D imgs has {imgs.shape[-1]} channels (shape {imgs.shape}); expected 3 (or 1)")
    return imgs, dim


def _check_spacing(spacing: np.ndarray, path: Path, key: str = "spacing") -> tuple[float, float, float]:
    spacing = np.asarray(spacing)
    if spacing.shape != (3,) or spacing.dtype.kind not in "iuf":
        raise CaseError(path, f"{key} must be 3 numbers, got shape {spacing.shape} dtype {spacing.dtype}")
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise CaseError(path, f"{key} must be finite and positive, got {spacing.tolist()}")
    return tuple(float(s) for s in spacing)


def _check_boxes(boxes: np.ndarray, dim: int, shape: tuple[int, ...], path: Path, warnings: list[str]) -> np.ndarray:
    """Validate boxes against the image; clip boxes that stick out, refuse those fully outside."""
    width = 4 if dim == 2 else 6
    if boxes.ndim != 2 or boxes.shape[1] != width:
        layout = "[x_min,y_min,x_max,y_max]" if dim == 2 else "[x_min,y_min,z_min,x_max,y_max,z_max]"
        raise CaseError(path, f"boxes has shape {boxes.shape}; a {dim}D case needs (N, {width}) rows {layout}")
    if boxes.shape[0] == 0:
        raise CaseError(path, "boxes has no rows; at least one box is needed")
    if boxes.dtype.kind not in "iuf":
        raise CaseError(path, f"boxes has dtype {boxes.dtype}; expected integers or floats")
    if boxes.dtype.kind == "f" and not np.isfinite(boxes).all():
        raise CaseError(path, "boxes contains NaN or infinite coordinates")
    if dim == 2:
        lo_cols, hi_cols, limits, axes = (0, 1), (2, 3), (shape[1], shape[0]), ("x", "y")
    else:
        lo_cols, hi_cols, limits, axes = (0, 1, 2), (3, 4, 5), (shape[2], shape[1], shape[0]), ("x", "y", "z")
    clipped = boxes.copy()
    for i, row in enumerate(boxes):
        for lo, hi, size, axis in zip(lo_cols, hi_cols, limits, axes):
            if row[lo] > row[hi]:
                raise CaseError(path, f"box {i} is inverted: {axis}_min {row[lo]} > {axis}_max {row[hi]}")
            if row[hi] < 0 or row[lo] > size - 1:
                raise CaseError(
                    path,
                    f"box {i} {row.tolist()} lies entirely outside the image along {axis} (valid 0..{size - 1})",
                )
            clipped[i, lo] = max(row[lo], 0)
            clipped[i, hi] = min(row[hi], size - 1)
        if not np.array_equal(clipped[i], row):
            warnings.append(f"box {i} {row.tolist()} partly outside the image, clipped to {clipped[i].tolist()}")
    return clipped


def load_case(path: str | os.PathLike) -> Case:
    """Load and validate one input case (``imgs/<name>.npz``). Raises :class:`CaseError`."""
    path = Path(path)
    arrays = _open_npz(path)
    name = path.name
    warnings: list[str] = []
    imgs = _require(arrays, "imgs", path)
    boxes = _require(arrays, "boxes", path)
    imgs, dim = _check_image(imgs, name, path)
    imgs = _as_uint8_image(imgs, path, warnings)
    shape = imgs.shape[:2] if dim == 2 else imgs.shape
    boxes = _check_boxes(np.asarray(boxes), dim, shape, path, warnings)
    spacing = None
    if dim == 3:
        if "spacing" in arrays:
            spacing = _check_spacing(arrays["spacing"], path)
        else:
            warnings.append("3D case without 'spacing' (models do not need it; scoring reads the gts file's)")
    return Case(
        name=name,
        path=path,
        dim=dim,
        modality=modality_from_name(name),
        imgs=np.ascontiguousarray(imgs),
        boxes=boxes,
        spacing=spacing,
        warnings=tuple(warnings),
    )


def load_ground_truth(
    path: str | os.PathLike,
    case: Case | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> GroundTruth:
    """Load ``gts/<name>.npz``; with ``case``, check it matches the case's shape.

    3D spacing comes from the gts file (as the challenge's compute_metrics.py reads it), else from
    ``case``, else from ``spacing``. Raises :class:`CaseError`.
    """
    path = Path(path)
    arrays = _open_npz(path)
    gts = _require(arrays, "gts", path)
    if gts.size == 0:
        raise CaseError(path, f"gts is empty (shape {gts.shape})")
    if gts.dtype.kind not in "iub":
        raise CaseError(path, f"gts has dtype {gts.dtype}; expected integer labels")
    if gts.dtype.kind == "i" and gts.min() < 0:
        raise CaseError(path, f"gts has negative labels (min {gts.min()})")
    if gts.ndim not in (2, 3):
        raise CaseError(path, f"gts has shape {gts.shape}; expected (H,W) or (D,H,W)")
    if case is not None and tuple(gts.shape) != tuple(case.spatial_shape):
        raise CaseError(path, f"gts shape {gts.shape} does not match imgs shape {case.spatial_shape} of {case.path}")
    fallback = case.spacing if case is not None and case.spacing is not None else spacing
    spacing = None
    if gts.ndim == 3:
        if "spacing" in arrays:
            spacing = _check_spacing(arrays["spacing"], path)
        elif fallback is not None:
            spacing = fallback
        else:
            raise CaseError(path, "3D ground truth without 'spacing' (needed for NSD), and the case has none")
    return GroundTruth(path=path, gts=gts, spacing=spacing)


def save_segs(path: str | os.PathLike, segs: np.ndarray) -> None:
    """Write ``segs`` as uint16 into a compressed npz, atomically (temp file + rename)."""
    path = Path(path)
    if segs.size and (segs.min() < 0 or segs.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"{path}: segs labels out of the uint16 range")
    with atomic_writer(path, "wb") as fh:
        np.savez_compressed(fh, segs=segs.astype(np.uint16, copy=False))


def load_segs(path: str | os.PathLike, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read a segmentation file (key ``segs``), optionally checking its shape. Raises :class:`CaseError`."""
    path = Path(path)
    arrays = _open_npz(path)
    segs = _require(arrays, "segs", path)
    if segs.dtype.kind not in "iub":
        raise CaseError(path, f"segs has dtype {segs.dtype}; expected integer labels")
    if shape is not None and tuple(segs.shape) != tuple(shape):
        raise CaseError(path, f"segs shape {segs.shape} does not match the expected {tuple(shape)}")
    return segs


def discover_cases(data_dir: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """The case files of a data folder: ``DIR/imgs/*.npz`` (challenge layout) or ``DIR/*.npz``.

    Sorted by name. With ``limit``, cases are taken round-robin over modalities (each modality's
    cases in name order), so a small limit still covers every modality, 2D and 3D alike.
    """
    data_dir = Path(data_dir)
    imgs_dir = data_dir / "imgs" if (data_dir / "imgs").is_dir() else data_dir
    if not imgs_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such data folder")
    files = sorted(p for p in imgs_dir.glob("*.npz") if p.is_file())
    if limit is None or limit >= len(files):
        return files
    by_modality: dict[str, list[Path]] = {}
    for p in files:
        by_modality.setdefault(modality_from_name(p.name), []).append(p)
    queues = [by_modality[m] for m in sorted(by_modality)]
    picked: list[Path] = []
    depth = 0
    while len(picked) < limit:
        for q in queues:
            if depth < len(q) and len(picked) < limit:
                picked.append(q[depth])
        depth += 1
    return sorted(picked)
