"""Reading and writing 2025-format (interactive) input files, with a restricted unpickler.

The 2025 interactive protocol (the CVPR 2025 "Foundation Models for Interactive 3D Biomedical Image
Segmentation" challenge; public evaluator: repository JunMa11/CVPR-MedSegFMCompetition,
``CVPR25_iter_eval.py``) stores three keys of its input npz files as pickled numpy object arrays:

* ``boxes``: one dict per class with the integer keys ``z_min``, ``z_max``, ``z_mid``,
  ``z_mid_x_min``, ``z_mid_y_min``, ``z_mid_x_max``, ``z_mid_y_max``;
* ``clicks``: one dict per class, ``{"fg": [[z, y, x], ...], "bg": [[z, y, x], ...]}``;
* ``clicks_order``: one list per class of ``"fg"``, ``"bg"`` or ``None`` (no click: the class was
  already perfect), one entry per click step. As every class gets one entry per step, numpy stores
  it as a 2D object array (classes x steps).

Unpickling runs code named by the file, so ``np.load(..., allow_pickle=True)`` on a file from
elsewhere can run anything. Here those keys are read with :class:`RestrictedUnpickler`, which builds
only ``dict``, ``list``, ``tuple``, ``int``, ``float``, ``str``, ``bool``, ``None`` and numpy
numeric scalars and arrays, and refuses every other global the pickle names (``os.system``,
``builtins.eval``, ...) with a :class:`~harness.cases.CaseError` naming the file, the key and the
refused global, before anything is called. Plain keys (``imgs``, ``spacing``, ``prev_pred``) are
read with ``allow_pickle=False``. A key whose decompressed size exceeds the case-size limit
(:func:`harness.cases.max_case_bytes`) is refused before it is decompressed.
"""
from __future__ import annotations

import io
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.atomic import atomic_writer
from harness.cases import MAX_CASE_ENV, CaseError, max_case_bytes

__all__ = [
    "BOX_KEYS",
    "PICKLED_KEYS",
    "RestrictedUnpickler",
    "InteractiveInput",
    "read_pickled_key",
    "read_interactive_input",
    "is_interactive_input",
    "stored_shape",
    "write_interactive_input",
    "parse_boxes",
    "parse_clicks",
    "parse_clicks_order",
]

#: The keys of one class's box dict, in the order the organisers' files list them.
BOX_KEYS = ("z_min", "z_max", "z_mid", "z_mid_x_min", "z_mid_y_min", "z_mid_x_max", "z_mid_y_max")
#: Keys of a 2025 input file that hold pickled object arrays.
PICKLED_KEYS = ("boxes", "clicks", "clicks_order")

# numpy moved its C core from numpy.core to numpy._core in 2.0; files written by either name them.
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")
# Simple dtype strings an object array or a scalar may be made of (what np.save writes for the object
# arrays of these keys and the numpy integer / float / bool scalars inside them).
_SCALAR_KINDS = "biuf"


def _safe_dtype(*args: Any) -> np.dtype:
    """``numpy.dtype`` limited to plain numeric, bool and object dtypes (no structured or void ones)."""
    dt = np.dtype(*args)
    if dt.fields is not None or dt.subdtype is not None or dt.kind not in _SCALAR_KINDS + "O":
        raise pickle.UnpicklingError(f"dtype {dt!r} is not allowed")
    return dt


def _safe_scalar(dtype: np.dtype, *args: Any) -> Any:
    """numpy's scalar reconstructor, only for numeric and bool dtypes (never object: no pointers)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in _SCALAR_KINDS or dtype.fields is not None:
        raise pickle.UnpicklingError(f"numpy scalar of dtype {dtype!r} is not allowed")
    return _numpy_core().scalar(dtype, *args)


def _safe_reconstruct(cls: Any, *args: Any) -> np.ndarray:
    """numpy's array reconstructor, only for ``numpy.ndarray`` itself (no subclasses)."""
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"array class {cls!r} is not allowed")
    return _numpy_core()._reconstruct(cls, *args)


def _numpy_core() -> Any:
    """numpy's C core module (``numpy._core.multiarray`` in numpy 2, ``numpy.core.multiarray`` before)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    return multiarray


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _safe_dtype}
for _mod in _NUMPY_CORE:
    _ALLOWED_GLOBALS[(_mod, "_reconstruct")] = _safe_reconstruct
    _ALLOWED_GLOBALS[(_mod, "scalar")] = _safe_scalar
# numpy >= 1.25 pickles dtypes by class (e.g. numpy.dtypes.Int64DType) in some paths; those are
# reduced to numpy.dtype calls by np.save, so they are not needed and stay refused.


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals numpy's object-array pickles need.

    Allowed: ``numpy.ndarray`` (as the class argument of the array reconstructor only),
    ``numpy.dtype`` (plain numeric, bool and object dtypes), ``numpy.core.multiarray._reconstruct``
    / ``numpy._core.multiarray._reconstruct`` and ``numpy.core.multiarray.scalar`` /
    ``numpy._core.multiarray.scalar`` (numeric and bool scalars). Containers and atoms (dict, list,
    tuple, int, float, str, bytes, bool, None) need no global. Anything else raises
    ``pickle.UnpicklingError("refused global 'module.name'")`` before it is looked up, so it never
    runs; persistent ids are refused too.
    """

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refused global '{module}.{name}'")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 10**7 else f"{n_bytes} bytes"


def _read_member(path: Path, zf: zipfile.ZipFile, key: str) -> np.ndarray:
    member = f"{key}.npy"
    size, limit = zf.getinfo(member).file_size, max_case_bytes()
    if size > limit:  # the zip directory's uncompressed size, known before anything is decompressed
        raise CaseError(path, f"key '{key}' would take {_size(size)} decompressed, over the limit of "
                              f"{_size(limit)} (--max-case-gb / {MAX_CASE_ENV})")
    with zf.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        if not dtype.hasobject:
            fh.close()
            with zf.open(member) as again:
                return np.lib.format.read_array(again, allow_pickle=False)
        if dtype != np.dtype(object):
            raise CaseError(path, f"key '{key}' has dtype {dtype} with object fields, which is refused")
        try:
            value = RestrictedUnpickler(io.BufferedReader(fh)).load()
        except pickle.UnpicklingError as exc:
            raise CaseError(path, f"key '{key}': unsafe pickled content, {exc}; nothing from it was run") from None
        except Exception as exc:  # malformed pickle data
            raise CaseError(path, f"key '{key}': pickled content cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(value, np.ndarray):
        raise CaseError(path, f"key '{key}': pickled content is a {type(value).__name__}, not an array")
    if value.shape != tuple(shape):
        raise CaseError(path, f"key '{key}': pickled array has shape {value.shape}, header says {tuple(shape)}")
    return value


def read_pickled_key(path: str | os.PathLike, key: str) -> np.ndarray | None:
    """The array stored under ``key`` in npz ``path`` (None when absent), object arrays unpickled safely.

    Non-object arrays are read with ``allow_pickle=False``. Raises :class:`CaseError` for a missing
    or corrupt file and for pickled content that names any global outside the allowed set.
    """
    path = Path(path)
    if not path.is_file():
        raise CaseError(path, "file not found")
    try:
        with zipfile.ZipFile(path) as zf:
            if f"{key}.npy" not in zf.namelist():
                return None
            return _read_member(path, zf, key)
    except CaseError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
        raise CaseError(path, f"corrupt or truncated npz ({type(exc).__name__}: {exc})") from None


def _header(zf: zipfile.ZipFile, member: str) -> tuple:
    """``(shape, fortran_order, dtype)`` of an ``.npy`` member, from its header alone."""
    with zf.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fh)
        return np.lib.format.read_array_header_2_0(fh)


def is_interactive_input(path: str | os.PathLike) -> bool:
    """Whether npz ``path`` is a 2025-format input: one of :data:`PICKLED_KEYS` is stored as an object
    array (the per-class dicts of ``boxes``, ``clicks``). Only the ``.npy`` headers are read, nothing is
    unpickled; a file that cannot be read as an npz is not one (its loader then says what is wrong)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            return any(_header(zf, f"{key}.npy")[2].hasobject for key in PICKLED_KEYS if f"{key}.npy" in names)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError):
        return False


def stored_shape(path: str | os.PathLike, key: str = "imgs") -> tuple[int, ...]:
    """The shape of ``key`` in npz ``path``, from its header alone (nothing decompressed past it);
    CaseError naming the file when the key is missing or the file unreadable."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            if f"{key}.npy" not in zf.namelist():
                raise CaseError(path, f"missing key '{key}'")
            return tuple(int(n) for n in _header(zf, f"{key}.npy")[0])
    except CaseError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as exc:
        raise CaseError(path, f"corrupt or truncated npz ({type(exc).__name__}: {exc})") from None


def _as_int(value: Any, path: Path, where: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        raise CaseError(path, f"{where} is {value!r}; expected an integer")
    return int(value)


def parse_boxes(raw: np.ndarray | list | None, path: Path, shape: tuple[int, int, int] | None = None) -> list[dict] | None:
    """Validate a ``boxes`` value: a list of dicts with the :data:`BOX_KEYS` (plain ints returned).

    With ``shape`` (D, H, W), coordinates must lie in the image and ``min <= mid <= max`` in z.
    """
    if raw is None:
        return None
    items = list(raw.ravel()) if isinstance(raw, np.ndarray) else list(raw)
    boxes = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise CaseError(path, f"boxes[{i}] is a {type(item).__name__}; expected a dict with keys {', '.join(BOX_KEYS)}")
        missing = [k for k in BOX_KEYS if k not in item]
        if missing:
            raise CaseError(path, f"boxes[{i}] lacks {', '.join(missing)}")
        box = {k: _as_int(item[k], path, f"boxes[{i}]['{k}']") for k in BOX_KEYS}
        if not box["z_min"] <= box["z_mid"] <= box["z_max"]:
            raise CaseError(path, f"boxes[{i}] has z_min {box['z_min']}, z_mid {box['z_mid']}, z_max {box['z_max']}; "
                                  "expected z_min <= z_mid <= z_max")
        if box["z_mid_x_min"] > box["z_mid_x_max"] or box["z_mid_y_min"] > box["z_mid_y_max"]:
            raise CaseError(path, f"boxes[{i}] has a minimum above its maximum: {box}")
        if shape is not None:
            d, h, w = shape
            if box["z_min"] < 0 or box["z_max"] >= d or box["z_mid_x_min"] < 0 or box["z_mid_x_max"] >= w \
                    or box["z_mid_y_min"] < 0 or box["z_mid_y_max"] >= h:
                raise CaseError(path, f"boxes[{i}] {box} lies outside the image of shape (D, H, W) = {shape}")
        boxes.append(box)
    return boxes


def parse_clicks(raw: np.ndarray | list | None, path: Path, shape: tuple[int, int, int] | None = None) -> list[dict] | None:
    """Validate a ``clicks`` value: per class ``{"fg": [[z, y, x], ...], "bg": [...]}`` (plain ints)."""
    if raw is None:
        return None
    items = list(raw.ravel()) if isinstance(raw, np.ndarray) else list(raw)
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) - {"fg", "bg"}:
            raise CaseError(path, f"clicks[{i}] is {item!r}; expected a dict with keys 'fg' and 'bg'")
        entry: dict[str, list[list[int]]] = {"fg": [], "bg": []}
        for kind in ("fg", "bg"):
            points = item.get(kind, [])
            if isinstance(points, np.ndarray):
                points = points.tolist()
            if not isinstance(points, (list, tuple)):
                raise CaseError(path, f"clicks[{i}]['{kind}'] is a {type(points).__name__}; expected a list of [z, y, x]")
            for j, point in enumerate(points):
                if isinstance(point, np.ndarray):
                    point = point.tolist()
                if not isinstance(point, (list, tuple)) or len(point) != 3:
                    raise CaseError(path, f"clicks[{i}]['{kind}'][{j}] is {point!r}; expected [z, y, x]")
                zyx = [_as_int(v, path, f"clicks[{i}]['{kind}'][{j}]") for v in point]
                if shape is not None and not all(0 <= v < n for v, n in zip(zyx, shape)):
                    raise CaseError(path, f"clicks[{i}]['{kind}'][{j}] {zyx} lies outside the image of shape {shape}")
                entry[kind].append(zyx)
        out.append(entry)
    return out


def parse_clicks_order(raw: np.ndarray | list | None, path: Path) -> list[list[str | None]] | None:
    """Validate ``clicks_order``: per class a list of ``"fg"``, ``"bg"`` or ``None``."""
    if raw is None:
        return None
    rows = raw.tolist() if isinstance(raw, np.ndarray) else list(raw)
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, np.ndarray):
            row = row.tolist()
        if not isinstance(row, (list, tuple)):
            raise CaseError(path, f"clicks_order[{i}] is {row!r}; expected a list of 'fg', 'bg' or None")
        for j, kind in enumerate(row):
            if kind not in ("fg", "bg", None):
                raise CaseError(path, f"clicks_order[{i}][{j}] is {kind!r}; expected 'fg', 'bg' or None")
        out.append(list(row))
    return out


@dataclass(frozen=True)
class InteractiveInput:
    """One validated 2025-format input file (what a segmenter gets at one step)."""

    path: Path
    imgs: np.ndarray = field(repr=False)
    spacing: tuple[float, float, float]
    boxes: list[dict] | None = None
    clicks: list[dict] | None = None
    clicks_order: list[list[str | None]] | None = None
    prev_pred: np.ndarray | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.imgs.shape)  # type: ignore[return-value]


def read_interactive_input(path: str | os.PathLike) -> InteractiveInput:
    """Read and validate a 2025-format input file; raises :class:`CaseError` naming the file and problem.

    ``imgs`` must be a 3D (D, H, W) array, ``spacing`` 3 positive numbers; ``boxes``, ``clicks``,
    ``clicks_order`` and ``prev_pred`` are optional (step 1 has no clicks; some cases have no boxes).
    """
    path = Path(path)

    def plain(key: str) -> np.ndarray | None:
        value = read_pickled_key(path, key)
        if value is not None and value.dtype.hasobject:
            raise CaseError(path, f"key '{key}' holds pickled (object) content; expected a numeric array")
        return value

    imgs = plain("imgs")
    if imgs is None:
        raise CaseError(path, "missing key 'imgs'")
    if imgs.ndim != 3 or imgs.size == 0:
        raise CaseError(path, f"imgs has shape {imgs.shape}; the interactive protocol takes 3D (D, H, W) images")
    if imgs.dtype.kind not in "biuf":
        raise CaseError(path, f"imgs has dtype {imgs.dtype}; expected numbers")
    spacing_arr = plain("spacing")
    if spacing_arr is None:
        raise CaseError(path, "missing key 'spacing'")
    sp = np.asarray(spacing_arr, dtype=np.float64).ravel()
    if sp.size != 3 or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise CaseError(path, f"spacing is {spacing_arr.tolist()}; expected 3 positive numbers (z, y, x) in mm")
    shape = tuple(int(n) for n in imgs.shape)
    boxes = parse_boxes(read_pickled_key(path, "boxes"), path, shape)  # type: ignore[arg-type]
    clicks = parse_clicks(read_pickled_key(path, "clicks"), path, shape)  # type: ignore[arg-type]
    order = parse_clicks_order(read_pickled_key(path, "clicks_order"), path)
    prev = plain("prev_pred")
    if prev is not None and tuple(prev.shape) != shape:
        raise CaseError(path, f"prev_pred has shape {prev.shape}; imgs has {shape}")
    return InteractiveInput(path=path, imgs=imgs, spacing=tuple(float(v) for v in sp),  # type: ignore[arg-type]
                            boxes=boxes, clicks=clicks, clicks_order=order, prev_pred=prev)


def write_interactive_input(path: str | os.PathLike, imgs: np.ndarray, spacing, boxes: list[dict] | None = None,
                            clicks: list[dict] | None = None, clicks_order: list[list] | None = None,
                            prev_pred: np.ndarray | None = None) -> None:
    """Write a 2025-format input npz (compressed) atomically, keys as the official evaluator writes them.

    ``boxes``/``clicks``/``clicks_order`` are given as Python lists and stored as the evaluator's
    ``np.savez_compressed`` stores its lists: 1D object arrays of dicts whose numbers are
    ``numpy.int64`` for ``boxes`` and ``clicks``, and ``np.asanyarray(clicks_order)`` (a 2D array,
    object dtype when it holds None, unicode otherwise); ``prev_pred`` is stored as uint8, the cast
    the evaluator applies (labels above 255 wrap). Keys left as None are not written.
    """
    arrays: dict[str, Any] = {"imgs": imgs, "spacing": np.asarray(spacing, dtype=np.float64)}
    if clicks is not None:
        arrays["clicks"] = _object_array([{kind: [[np.int64(v) for v in p] for p in c.get(kind, [])]
                                           for kind in ("fg", "bg")} for c in clicks])
    if clicks_order is not None:
        try:  # what np.savez_compressed makes of the list: 2D, unicode when no None is in it
            arrays["clicks_order"] = np.asanyarray(clicks_order)
        except ValueError:  # rows of different lengths
            arrays["clicks_order"] = _object_array(list(clicks_order))
    if prev_pred is not None:
        arrays["prev_pred"] = np.asarray(prev_pred).astype(np.uint8)
    if boxes is not None:
        arrays["boxes"] = _object_array([{k: np.int64(v) for k, v in b.items()} for b in boxes])
    with atomic_writer(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _object_array(items: list) -> np.ndarray:
    """A 1D object array holding ``items`` (dicts), as ``np.asarray(list_of_dicts)`` gives."""
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out
