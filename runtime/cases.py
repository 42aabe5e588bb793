"""Challenge cases: reading ``imgs``/``boxes`` from an ``.npz`` with clear errors, writing ``segs``.

The checks are the harness's (``harness/cases.py``): no pickled content; ``imgs`` (H, W, 3), (H, W) or
(D, H, W), the name's ``2D``/``3D`` prefix honoured; non-uint8 intensities in 0..255 converted (floats
rounded); boxes (N, 4) or (N, 6), inverted or fully outside boxes refused, boxes sticking out clipped to
the image.  ``segs`` is written as uint16 into a compressed npz through a temporary file in the same
folder, renamed over the target when complete.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Tuple

import numpy as np

__all__ = ["CaseError", "Case", "load_case", "save_segs", "discover_cases", "TEMP_SUFFIX"]

TEMP_SUFFIX = ".medsam-runtime.tmp"


class CaseError(ValueError):
    """A case file that cannot be used; the message names the file and the problem."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


@dataclass
class Case:
    name: str
    path: Path
    dim: int
    imgs: np.ndarray
    boxes: np.ndarray
    warnings: Tuple[str, ...] = ()


def _open_npz(path: Path) -> dict:
    if not path.is_file():
        raise CaseError(path, "file not found")
    if not zipfile.is_zipfile(path):
        raise CaseError(path, "not an npz file (not a zip archive, or truncated)")
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in ("imgs", "boxes"):
                if key not in npz.files:
                    present = ", ".join(sorted(npz.files)) or "none"
                    raise CaseError(path, f"missing key '{key}' (keys present: {present})")
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


def _declared_dim(name: str):
    return 2 if name.startswith("2D") else 3 if name.startswith("3D") else None


def _check_image(imgs: np.ndarray, name: str, path: Path) -> Tuple[np.ndarray, int]:
    if imgs.size == 0:
        raise CaseError(path, f"imgs is empty (shape {imgs.shape})")
    declared = _declared_dim(name)
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


def _as_uint8(imgs: np.ndarray, path: Path, warnings: List[str]) -> np.ndarray:
    if imgs.dtype == np.uint8:
        return imgs
    if imgs.dtype.kind not in "iuf":
        raise CaseError(path, f"imgs has dtype {imgs.dtype}; expected uint8")
    if imgs.dtype.kind == "f" and not np.isfinite(imgs).all():
        raise CaseError(path, "imgs contains NaN or infinite values")
    lo, hi = imgs.min(), imgs.max()
    if lo < 0 or hi > 255:
        raise CaseError(path, f"imgs has dtype {imgs.dtype} with values in [{lo}, {hi}]; expected uint8 0..255")
    warnings.append(f"imgs dtype {imgs.dtype} converted to uint8")
    return np.rint(imgs).astype(np.uint8) if imgs.dtype.kind == "f" else imgs.astype(np.uint8)


def _check_boxes(boxes: np.ndarray, dim: int, shape, path: Path, warnings: List[str]) -> np.ndarray:
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
                raise CaseError(path, f"box {i} {row.tolist()} lies entirely outside the image along {axis} "
                                      f"(valid 0..{size - 1})")
            clipped[i, lo] = max(row[lo], 0)
            clipped[i, hi] = min(row[hi], size - 1)
        if not np.array_equal(clipped[i], row):
            warnings.append(f"box {i} {row.tolist()} partly outside the image, clipped to {clipped[i].tolist()}")
    return clipped


def load_case(path: str | os.PathLike) -> Case:
    """Read and check one case; raises :class:`CaseError` naming the file and the problem."""
    path = Path(path)
    arrays = _open_npz(path)
    warnings: List[str] = []
    imgs, dim = _check_image(arrays["imgs"], path.name, path)
    imgs = _as_uint8(imgs, path, warnings)
    shape = imgs.shape[:2] if dim == 2 else imgs.shape
    boxes = _check_boxes(np.asarray(arrays["boxes"]), dim, shape, path, warnings)
    return Case(name=path.name, path=path, dim=dim, imgs=np.ascontiguousarray(imgs), boxes=boxes,
                warnings=tuple(warnings))


def discover_cases(folder: str | os.PathLike) -> List[Path]:
    """``folder/*.npz`` in name order (or ``folder/imgs/*.npz`` when the folder has an ``imgs`` subfolder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such input folder")
    if (folder / "imgs").is_dir():
        folder = folder / "imgs"
    return sorted(p for p in folder.glob("*.npz") if p.is_file() and not p.name.startswith("."))


def save_segs(path: str | os.PathLike, segs: np.ndarray) -> None:
    """Write ``segs`` (key ``segs``, uint16) into a compressed npz, atomically (temporary file + rename)."""
    path = Path(path)
    if segs.size and (segs.min() < 0 or segs.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"{path}: segs labels out of the uint16 range")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=TEMP_SUFFIX)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, segs=segs.astype(np.uint16, copy=False))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
