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

Hostile files are refused before they cost memory: each member's shape and dtype are read from its
``.npy`` header inside the zip without decompressing anything (:func:`npz_members`), a header whose
claim disagrees with the zip's declared uncompressed size is an error, and a case whose arrays would
take more than a limit once decompressed is refused (``--max-case-gb``; by default a quarter of the
machine's physical memory, see :func:`max_case_bytes`). Ground-truth labels above :data:`MAX_LABEL`
are refused, since the metrics index labels ``1..gts.max()``.
"""
from __future__ import annotations

import io
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from numpy.lib import format as npy_format

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
    "read_spacing",
    "discover_cases",
    "MAX_LABEL",
    "MAX_CASE_ENV",
    "NpyMember",
    "npz_members",
    "default_max_case_bytes",
    "max_case_bytes",
    "set_max_case_gb",
]

#: The highest ground-truth label the harness scores. Segmentations are stored as uint16 (the challenge
#: format), so no prediction can carry a higher label, and the metrics index labels ``1..gts.max()``:
#: a gts with one voxel labelled 2e8 would otherwise allocate gigabytes of per-label counts.
MAX_LABEL = int(np.iinfo(np.uint16).max)

#: The environment variable that holds the decompressed-size limit of one case file, in GB (10^9 bytes).
#: ``harness run --max-case-gb`` sets it, so that processes the run starts (``harness predict`` under the
#: subprocess runner, a local Ray instance's workers) apply the same limit.
MAX_CASE_ENV = "HARNESS_MAX_CASE_GB"

_GB = 10**9


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

    Interactive prompts (the 2025 protocol, :mod:`harness.interactive.run`; None in a 2024 case):
    ``clicks`` maps a label (``i + 1`` for box ``i``) to its clicks in the order they were given, each
    ``(z, y, x, is_foreground)`` (3D; a 2D click has z 0); ``prev_segs`` is the previous step's
    segmentation (labels as in ``segs``). A segmenter that accepts only boxes ignores both
    (:attr:`harness.plugin_api.SegmenterSpec.prompts`).
    """

    name: str
    path: Path
    dim: int
    modality: str
    imgs: np.ndarray = field(repr=False)
    boxes: np.ndarray = field(repr=False)
    spacing: tuple[float, float, float] | None = None
    warnings: tuple[str, ...] = ()
    clicks: dict[int, list[tuple[int, int, int, bool]]] | None = field(default=None, repr=False)
    prev_segs: np.ndarray | None = field(default=None, repr=False)

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


def default_max_case_bytes() -> int:
    """A quarter of this machine's physical memory: the default limit on one case file's decompressed size."""
    import psutil

    return int(psutil.virtual_memory().total // 4)


def max_case_bytes() -> int:
    """The decompressed-size limit of one case file, in bytes: :data:`MAX_CASE_ENV` (GB) when set, else
    :func:`default_max_case_bytes`. A malformed value is a ValueError naming the variable."""
    text = os.environ.get(MAX_CASE_ENV, "").strip()
    if not text:
        return default_max_case_bytes()
    try:
        gb = float(text)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb > 0):
        raise ValueError(f"{MAX_CASE_ENV}={text!r}: expected a positive number of GB")
    return int(gb * _GB)


def set_max_case_gb(gb: float | None) -> None:
    """Set the decompressed-size limit of the case files this process (and the processes it starts
    later) reads, in GB; None leaves the current setting (:func:`max_case_bytes`)."""
    if gb is None:
        return
    if not (math.isfinite(gb) and gb > 0):
        raise ValueError(f"the case size limit must be a positive number of GB, got {gb}")
    os.environ[MAX_CASE_ENV] = repr(float(gb))


def _gb(n_bytes: int) -> str:
    return f"{n_bytes / _GB:.2f} GB" if n_bytes >= _GB // 100 else f"{n_bytes} bytes"


@dataclass(frozen=True)
class NpyMember:
    """One member of an npz file as its zip entry and ``.npy`` header declare it (nothing decompressed).

    ``shape`` and ``dtype`` are None for a member that is not a ``.npy`` array (numpy would read its
    raw bytes). ``nbytes`` is what reading it takes: the array's data, or the member's size.
    """

    key: str
    member: str
    shape: tuple[int, ...] | None
    dtype: np.dtype | None
    nbytes: int

    def describe(self) -> str:
        if self.shape is None:
            return f"member '{self.member}' (not a .npy array, {self.nbytes} bytes)"
        return f"member '{self.member}' (shape {self.shape}, dtype {self.dtype})"


_MAX_NPY_HEADER = 100_000  # numpy itself refuses headers over 10000 bytes by default


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, key: str) -> tuple[tuple, np.dtype, int]:
    """Shape, dtype and header length of a ``.npy`` member, read from its first bytes only."""
    with zf.open(info) as fh:
        prefix = fh.read(12)
        if len(prefix) < 10 or not prefix.startswith(npy_format.MAGIC_PREFIX):
            raise CaseError(path, f"key '{key}' is not a .npy array (no .npy header in member '{info.filename}')")
        major = prefix[6]
        if major == 1:
            header_len = 10 + struct.unpack("<H", prefix[8:10])[0]
        elif major == 2:
            header_len = 12 + struct.unpack("<I", prefix[8:12])[0]
        else:
            raise CaseError(path, f"key '{key}' has a .npy header of version {major}.{prefix[7]}, which is not "
                                  "supported (numpy writes 1.0 or 2.0 for numeric arrays)")
        if header_len > _MAX_NPY_HEADER:
            raise CaseError(path, f"key '{key}' has a .npy header of {header_len} bytes (a forged file)")
        head = prefix + fh.read(header_len - len(prefix))
    buf = io.BytesIO(head)
    try:
        version = npy_format.read_magic(buf)
        reader = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _fortran, dtype = reader(buf, max_header_size=_MAX_NPY_HEADER)
    except (ValueError, TypeError, SyntaxError, struct.error) as exc:
        raise CaseError(path, f"key '{key}' has a malformed .npy header ({exc})") from None
    if buf.tell() != len(head):
        raise CaseError(path, f"key '{key}' has a truncated .npy header")
    return tuple(int(n) for n in shape), dtype, header_len


def npz_members(path: str | os.PathLike) -> list[NpyMember]:
    """The members of an npz file with their declared shape, dtype and size, from the zip directory and
    each member's ``.npy`` header: nothing is decompressed beyond those headers.

    A pickled (object) dtype, a malformed header, and a header whose shape and dtype claim more or fewer
    bytes than the zip entry declares uncompressed (a forged or corrupt file) raise :class:`CaseError`.
    """
    path = Path(path)
    members = []
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                name = info.filename
                key = name[: -len(".npy")] if name.endswith(".npy") else name
                if not name.endswith(".npy"):
                    members.append(NpyMember(key, name, None, None, int(info.file_size)))
                    continue
                shape, dtype, header_len = _npy_header(zf, info, path, key)
                if dtype.hasobject:
                    raise CaseError(path, f"key '{key}' holds pickled (object) content, which is refused")
                nbytes = math.prod(shape) * dtype.itemsize
                if header_len + nbytes != info.file_size:
                    raise CaseError(
                        path,
                        f"key '{key}': the .npy header of member '{name}' claims shape {shape}, dtype {dtype} "
                        f"({nbytes} bytes of data) but the zip entry declares {info.file_size} bytes "
                        f"uncompressed, {header_len + nbytes} expected (a forged or corrupt file)",
                    )
                members.append(NpyMember(key, name, shape, dtype, nbytes))
    except CaseError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise CaseError(path, f"corrupt or truncated npz ({type(exc).__name__}: {exc})") from None
    return members


def _check_path(path: Path) -> None:
    """A clear CaseError for what is not a regular file: missing, a dangling link, a folder."""
    if path.is_file():
        return
    if path.is_symlink() and not path.exists():
        raise CaseError(path, f"dangling symbolic link (its target {os.readlink(path)} does not exist)")
    if path.is_dir():
        what = f"a symbolic link to the folder {os.readlink(path)}" if path.is_symlink() else "a folder"
        raise CaseError(path, f"is {what}, not an npz file")
    if path.exists():
        raise CaseError(path, "is not a regular file (a device, pipe or socket), not an npz file")
    raise CaseError(path, "file not found")


def _check_size(path: Path, members: list[NpyMember], max_bytes: int | None) -> None:
    """Refuse a file whose members would take more than ``max_bytes`` decompressed."""
    limit = max_case_bytes() if max_bytes is None else int(max_bytes)
    total = sum(m.nbytes for m in members)
    if total <= limit:
        return
    biggest = max(members, key=lambda m: m.nbytes)
    whole = "" if biggest.nbytes >= 0.99 * total else f" (the arrays read total {_gb(total)})"
    raise CaseError(
        path,
        f"{biggest.describe()} takes {_gb(biggest.nbytes)} decompressed{whole}, over the {_gb(limit)} limit "
        "(refused before decompressing; raise it with --max-case-gb, or "
        f"{MAX_CASE_ENV}, if the file is genuine)",
    )


class _Arrays(dict):
    """The arrays read from an npz file, and the keys the file holds (``present``), read or not."""

    present: tuple[str, ...] = ()


def _open_npz(path: Path, max_bytes: int | None = None, keys: tuple[str, ...] | None = None,
              required: tuple[str, ...] = ()) -> _Arrays:
    """Read the arrays of an npz file (only ``keys`` when given), turning every failure into a CaseError.

    The file's declared sizes are checked first (:func:`npz_members`): a key in ``required`` that the
    file lacks, and arrays that would take more than ``max_bytes`` (default :func:`max_case_bytes`)
    decompressed, are refused before anything is decompressed; a MemoryError while decompressing is
    a CaseError naming the file too."""
    _check_path(path)
    if not zipfile.is_zipfile(path):
        raise CaseError(path, "not an npz file (not a zip archive, or truncated)")
    members = npz_members(path)
    arrays = _Arrays()
    arrays.present = tuple(m.key for m in members)
    for key in required:
        _require(arrays.present, key, path)
    if keys is not None:
        members = [m for m in members if m.key in keys]
    _check_size(path, members, max_bytes)
    try:
        with np.load(path, allow_pickle=False) as npz:
            for member in members:
                key = member.key
                try:
                    arrays[key] = npz[key]
                except ValueError as exc:
                    if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                        raise CaseError(path, f"key '{key}' holds pickled (object) content, which is refused") from None
                    raise CaseError(path, f"key '{key}' cannot be read: {exc}") from None
                except MemoryError:
                    raise CaseError(path, f"not enough memory to decompress {member.describe()} "
                                          f"({_gb(member.nbytes)}; MemoryError)") from None
    except CaseError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
        raise CaseError(path, f"corrupt or truncated npz ({type(exc).__name__}: {exc})") from None
    return arrays


def _require(present, key: str, path: Path) -> None:
    """CaseError unless the file holds ``key`` (``present``: the keys it holds)."""
    if key not in present:
        listed = ", ".join(sorted(present)) or "none"
        raise CaseError(path, f"missing key '{key}' (keys present: {listed})")


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


#: Public name of the image check for readers of other input formats (the 2025 interactive inputs).
as_uint8_image = _as_uint8_image


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


def load_case(path: str | os.PathLike, max_bytes: int | None = None) -> Case:
    """Load and validate one input case (``imgs/<name>.npz``). Raises :class:`CaseError`, also for a file
    whose arrays would take more than ``max_bytes`` decompressed (default :func:`max_case_bytes`)."""
    path = Path(path)
    arrays = _open_npz(path, max_bytes, keys=("imgs", "boxes", "spacing"), required=("imgs", "boxes"))
    name = path.name
    warnings: list[str] = []
    imgs = arrays["imgs"]
    boxes = arrays["boxes"]
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
    spacing: tuple[float, float, float] | Callable[[], tuple[float, float, float] | None] | None = None,
    max_bytes: int | None = None,
) -> GroundTruth:
    """Load ``gts/<name>.npz``; with ``case``, check it matches the case's shape.

    3D spacing comes from the gts file (as the challenge's compute_metrics.py reads it), else from
    ``case``, else from ``spacing`` (the numbers, or a function giving them, called only when needed).
    Labels must be integers in ``0..MAX_LABEL``. Raises :class:`CaseError`, also for a file whose
    arrays would take more than ``max_bytes`` decompressed (default :func:`max_case_bytes`).
    """
    path = Path(path)
    arrays = _open_npz(path, max_bytes, keys=("gts", "spacing"), required=("gts",))
    gts = arrays["gts"]
    if gts.size == 0:
        raise CaseError(path, f"gts is empty (shape {gts.shape})")
    if gts.dtype.kind not in "iub":
        raise CaseError(path, f"gts has dtype {gts.dtype}; expected integer labels")
    if gts.dtype.kind == "i" and gts.min() < 0:
        raise CaseError(path, f"gts has negative labels (min {gts.min()})")
    top = int(gts.max())
    if top > MAX_LABEL:
        where = tuple(int(i) for i in np.unravel_index(int(np.argmax(gts)), gts.shape))
        raise CaseError(path, f"gts has label {top} (at index {where}); labels above {MAX_LABEL} cannot be scored "
                              "(the metrics score every label 1..max, and segs are uint16)")
    if gts.ndim not in (2, 3):
        raise CaseError(path, f"gts has shape {gts.shape}; expected (H,W) or (D,H,W)")
    if case is not None and tuple(gts.shape) != tuple(case.spatial_shape):
        raise CaseError(path, f"gts shape {gts.shape} does not match imgs shape {case.spatial_shape} of {case.path}")
    fallback = case.spacing if case is not None and case.spacing is not None else spacing
    spacing = None
    if gts.ndim == 3:
        if "spacing" in arrays:
            spacing = _check_spacing(arrays["spacing"], path)
        else:
            spacing = fallback() if callable(fallback) else fallback
        if spacing is None:
            raise CaseError(path, "3D ground truth without 'spacing' (needed for NSD), and the case has none")
    return GroundTruth(path=path, gts=gts, spacing=spacing)


def save_segs(path: str | os.PathLike, segs: np.ndarray) -> None:
    """Write ``segs`` as uint16 into a compressed npz, atomically (temp file + rename).

    A failed write (a full disk, no permission) leaves no partial file and raises OSError with
    ``filename`` set to ``path``, so that its message names the file."""
    path = Path(path)
    if segs.size and (segs.min() < 0 or segs.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"{path}: segs labels out of the uint16 range")
    try:
        with atomic_writer(path, "wb") as fh:
            np.savez_compressed(fh, segs=segs.astype(np.uint16, copy=False))
    except OSError as exc:
        if exc.filename is not None and Path(exc.filename) == path:
            raise
        raise OSError(exc.errno, f"cannot write the segmentation: {exc.strerror or exc}", str(path)) from exc


def read_spacing(path: str | os.PathLike, max_bytes: int | None = None) -> tuple[float, float, float] | None:
    """The ``spacing`` of an npz file (e.g. an images file, for a gts file without one), or None when it
    has none. Only that member is read; problems raise :class:`CaseError` naming the file."""
    path = Path(path)
    arrays = _open_npz(path, max_bytes, keys=("spacing",))
    return _check_spacing(arrays["spacing"], path) if "spacing" in arrays else None


def load_segs(path: str | os.PathLike, shape: tuple[int, ...] | None = None,
              max_bytes: int | None = None) -> np.ndarray:
    """Read a segmentation file (key ``segs``), optionally checking its shape. Raises :class:`CaseError`,
    also for a file whose arrays would take more than ``max_bytes`` decompressed (default
    :func:`max_case_bytes`)."""
    path = Path(path)
    arrays = _open_npz(path, max_bytes, keys=("segs",), required=("segs",))
    segs = arrays["segs"]
    if segs.dtype.kind not in "iub":
        raise CaseError(path, f"segs has dtype {segs.dtype}; expected integer labels")
    if shape is not None and tuple(segs.shape) != tuple(shape):
        raise CaseError(path, f"segs shape {segs.shape} does not match the expected {tuple(shape)}")
    return segs


def discover_cases(data_dir: str | os.PathLike, limit: int | None = None) -> list[Path]:
    """The case files of a data folder: ``DIR/imgs/*.npz`` (challenge layout) or ``DIR/*.npz``.

    Sorted by name. Every entry named ``*.npz`` is a case, also one that is not a readable file (a
    dangling symbolic link, a link to a folder): loading it raises a :class:`CaseError` naming it, so
    a run records it as an error instead of skipping it silently. With ``limit``, cases are taken round-robin over modalities (each modality's
    cases in name order), so a small limit still covers every modality, 2D and 3D alike.
    """
    data_dir = Path(data_dir)
    imgs_dir = data_dir / "imgs" if (data_dir / "imgs").is_dir() else data_dir
    if not imgs_dir.is_dir():
        raise FileNotFoundError(f"{data_dir}: no such data folder")
    files = sorted(imgs_dir.glob("*.npz"))
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
