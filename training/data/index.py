"""The training data index: every 2D image whose ground truth has foreground and every 3D slice that
has foreground (:class:`Item`), scanned from the data roots and cached as JSON (:func:`build_index`),
and read back one item at a time (:func:`load_item`). Layouts: see :mod:`training.data`.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from harness.atomic import atomic_writer
from harness.cases import MODALITY_ALIASES, modality_from_name
from models.inference.preprocess import ensure_rgb

INDEX_VERSION = 1
DEFAULT_CACHE_DIR = Path("~/.cache/medsam-harness")

# Bound on the per-process cache of decompressed 3D volumes used by load_item (each DataLoader
# worker holds its own).  A volume larger than the byte budget is read but not kept.
VOLUME_CACHE_MAX_ITEMS = 4
VOLUME_CACHE_MAX_BYTES = 1 << 30

_CANONICAL_MODALITIES = frozenset(MODALITY_ALIASES.values())


@dataclass(frozen=True)
class Item:
    """One training sample: a 2D image (``z`` None) or slice ``z`` of a 3D volume.

    ``labels_path`` is the file holding ``gts`` when it is not ``path`` itself (the evaluation
    layout's ``gts/<case>.npz``); None means ``path`` holds both arrays.
    """

    path: str
    z: Optional[int]
    modality: str
    labels_path: Optional[str] = None


# --------------------------------------------------------------------------- file checks
class _Skip(Exception):
    """Internal: the file cannot be used; the message says why."""


def _member_names(zf: zipfile.ZipFile) -> list[str]:
    return [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not zipfile.is_zipfile(path):
        raise _Skip("not an npz file (not a zip archive, or truncated)")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _Skip(f"unreadable npz ({type(exc).__name__}: {exc})") from None


def _require_key(zf: zipfile.ZipFile, key: str, where: str = "") -> None:
    keys = _member_names(zf)
    if key not in keys:
        present = ", ".join(sorted(keys)) or "none"
        raise _Skip(f"missing key '{key}'{where} (keys present: {present})")


def _array_header(zf: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of ``key`` from the .npy header only, without decompressing the data."""
    _require_key(zf, key)
    try:
        with zf.open(f"{key}.npy") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                shape = dtype = None
        if shape is None:  # a rarer header version (3.0): read the array itself
            array = _read_array(zf, key)
            shape, dtype = array.shape, array.dtype
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise _Skip(f"key '{key}' cannot be read ({type(exc).__name__}: {exc})") from None
    return tuple(int(s) for s in shape), np.dtype(dtype)


def _read_array(zf: zipfile.ZipFile, key: str, where: str = "") -> np.ndarray:
    _require_key(zf, key, where)
    try:
        with zf.open(f"{key}.npy") as fh:
            return np.lib.format.read_array(fh, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise _Skip(f"key '{key}'{where} cannot be read ({type(exc).__name__}: {exc})") from None


def _scan_file(path: Path, labels_path: Optional[Path]) -> Optional[list[int]]:
    """Validate one case; return None for a usable 2D image with foreground, the list of
    foreground slice indices for a 3D volume (possibly empty), or ``[]`` for an empty 2D image.

    Only the ``imgs`` header is read (shape and dtype); ``gts`` is read in full to find the
    foreground.  Raises :class:`_Skip` with the reason for a bad file.
    """
    with _open_zip(path) as zf:
        shape, dtype = _array_header(zf, "imgs")
        if labels_path is None:
            gts = _read_array(zf, "gts")
    if labels_path is not None:
        with _open_zip(labels_path) as zf:
            gts = _read_array(zf, "gts", where=f" in {labels_path}")

    if dtype != np.uint8:
        raise _Skip(f"imgs has dtype {dtype}; expected uint8")
    if gts.dtype.kind not in "iub":
        raise _Skip(f"gts has dtype {gts.dtype}; expected an integer label map")
    if 0 in shape or gts.size == 0:
        raise _Skip(f"empty array (imgs {shape}, gts {gts.shape})")
    declared = {"2D": 2, "3D": 3}.get(path.name[:2])
    if gts.ndim == 2:
        if declared == 3:
            raise _Skip(f"the name says 3D but gts has shape {gts.shape}")
        image_ok = len(shape) == 2 or (len(shape) == 3 and shape[2] in (1, 3))
        if not image_ok:
            raise _Skip(f"2D imgs has shape {shape}; expected (H, W, 3), (H, W, 1) or (H, W)")
        if tuple(shape[:2]) != gts.shape:
            raise _Skip(f"shape mismatch: imgs {shape} vs gts {gts.shape}")
        return None if gts.any() else []
    if gts.ndim == 3:
        if declared == 2:
            raise _Skip(f"the name says 2D but gts has shape {gts.shape}")
        if shape != gts.shape:
            raise _Skip(f"shape mismatch: imgs {shape} vs gts {gts.shape}")
        return np.flatnonzero(gts.reshape(gts.shape[0], -1).any(axis=1)).tolist()
    raise _Skip(f"gts has {gts.ndim} dimensions (shape {gts.shape}); expected (H, W) or (D, H, W)")


# --------------------------------------------------------------------------- layouts
def _is_eval_layout(root: Path) -> bool:
    return (root / "imgs").is_dir() and (root / "gts").is_dir()


def _known_modality(token: str) -> Optional[str]:
    """Canonical modality for a folder name / name token, or None if it is not a known spelling."""
    canonical = modality_from_name(f"x_{token}")
    return canonical if canonical in _CANONICAL_MODALITIES else None


def _modality(path: Path, root: Path, training_layout: bool) -> str:
    """The file name's modality if it is a known one; else (training layout) the first known
    folder name from the root down, else the top folder under the root as written."""
    from_name = modality_from_name(path.name)
    if from_name in _CANONICAL_MODALITIES or not training_layout:
        return from_name
    folders = path.relative_to(root).parts[:-1]
    for part in (root.name,) + folders:
        known = _known_modality(part)
        if known is not None:
            return known
    return folders[0] if folders else from_name


def _list_cases(root: Path) -> list[tuple[Path, Optional[Path], bool]]:
    """(image file, separate label file or None, training layout?) for every npz under ``root``."""
    if _is_eval_layout(root):
        return [(p, root / "gts" / p.name, False) for p in sorted((root / "imgs").glob("*.npz"))]
    return [(p, None, True) for p in sorted(root.rglob("*.npz")) if p.is_file()]


def _stat_entry(path: Path) -> list:
    try:
        st = path.stat()
        return [str(path), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(path), None, None]


def _sha256(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- index
def build_index(
    roots: Sequence[str | os.PathLike] | str | os.PathLike,
    cache_dir: Optional[str | os.PathLike] = None,
    log: Callable[[str], None] = print,
) -> list[Item]:
    """Index every 2D image with foreground and every 3D slice with foreground under ``roots``.

    Each root is either an evaluation-layout folder (``imgs/`` + ``gts/``) or a training-layout
    folder (any ``*.npz`` below it holding ``imgs`` and ``gts``).  Bad files (unreadable, missing
    keys, imgs/gts shape mismatch, wrong dtype or dimensions) are skipped and logged as
    ``"skip <file>: <reason>"``; this function never raises for a bad file.  The modality comes
    from the file name (:func:`harness.cases.modality_from_name`) or, in the training layout, from
    the ``<Modality>`` folder.  Items are sorted by (path, z).

    The index is cached as ``<cache_dir>/index-<hash of roots>.json`` (default cache_dir
    ``~/.cache/medsam-harness``) together with a fingerprint of every file's path, size and
    mtime; any change rebuilds it.  The cache file is written atomically.
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    root_paths = list(dict.fromkeys(Path(r).expanduser().resolve() for r in roots))  # dedupe, keep order
    for root in root_paths:
        if not root.is_dir():
            raise FileNotFoundError(f"data root {root} is not a folder")
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_CACHE_DIR.expanduser()

    listing = [(root, case) for root in root_paths for case in _list_cases(root)]
    stats = [
        _stat_entry(img) + (_stat_entry(lab) if lab is not None else [])
        for _, (img, lab, _) in listing
    ]
    root_strings = [str(r) for r in root_paths]
    cache_file = cache_root / f"index-{_sha256([INDEX_VERSION, root_strings])[:20]}.json"
    fingerprint = _sha256([INDEX_VERSION, root_strings, stats])

    cached = _read_cache(cache_file, fingerprint)
    if cached is not None:
        items, skipped = cached
        for path, reason in skipped:
            log(f"skip {path}: {reason}")
        log(f"index: {len(items)} items from cache {cache_file} ({len(skipped)} files skipped)")
        return items

    files, skipped = [], []
    n_empty = 0
    for root, (img, lab, training_layout) in listing:
        try:
            if lab is not None and not lab.is_file():
                raise _Skip(f"no ground truth file {lab}")
            slices = _scan_file(img, lab)
        except _Skip as why:
            skipped.append([str(img), str(why)])
            log(f"skip {img}: {why}")
            continue
        if slices == []:
            n_empty += 1
            continue
        files.append({
            "path": str(img),
            "labels_path": None if lab is None else str(lab),
            "modality": _modality(img, root, training_layout),
            "z": slices,
        })
    items = _items_from_files(files)
    log(
        f"index: {len(items)} items from {len(files)} files "
        f"({len(skipped)} skipped, {n_empty} without foreground); cached in {cache_file}"
    )
    payload = {
        "version": INDEX_VERSION,
        "roots": root_strings,
        "fingerprint": fingerprint,
        "files": files,
        "skipped": skipped,
    }
    try:
        with atomic_writer(cache_file, "w") as fh:
            json.dump(payload, fh)
    except OSError as exc:  # a read-only cache folder must not stop training
        log(f"index: cannot write the cache {cache_file} ({exc})")
    return items


def _items_from_files(files: Iterable[dict]) -> list[Item]:
    items = []
    for f in files:
        zs = f["z"]
        for z in ([None] if zs is None else zs):
            items.append(Item(f["path"], None if z is None else int(z), f["modality"], f["labels_path"]))
    items.sort(key=lambda it: (it.path, -1 if it.z is None else it.z))
    return items


def _read_cache(cache_file: Path, fingerprint: str):
    """(items, skipped) from a cache file whose fingerprint matches, else None."""
    try:
        with open(cache_file) as fh:
            payload = json.load(fh)
        if payload.get("version") != INDEX_VERSION or payload.get("fingerprint") != fingerprint:
            return None
        return _items_from_files(payload["files"]), payload["skipped"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# --------------------------------------------------------------------------- loading
_VOLUMES: "OrderedDict[tuple, dict[str, np.ndarray]]" = OrderedDict()


def _load_arrays(path: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{path}: cannot read {list(keys)} ({type(exc).__name__}: {exc})") from None


def _volume(path: str, key: str) -> np.ndarray:
    """``key`` of the 3D file ``path`` through a small LRU cache (bounded by count and bytes)."""
    st = os.stat(path)
    cache_key = (path, st.st_size, st.st_mtime_ns)
    entry = _VOLUMES.get(cache_key)
    if entry is not None:
        _VOLUMES.move_to_end(cache_key)
        if key in entry:
            return entry[key]
    array = _load_arrays(path, [key])[key]
    if array.nbytes > VOLUME_CACHE_MAX_BYTES:
        return array
    if entry is None:
        entry = _VOLUMES.setdefault(cache_key, {})
    entry[key] = array
    while _VOLUMES and (
        len(_VOLUMES) > VOLUME_CACHE_MAX_ITEMS
        or sum(a.nbytes for e in _VOLUMES.values() for a in e.values()) > VOLUME_CACHE_MAX_BYTES
    ):
        oldest = next(iter(_VOLUMES))
        if oldest == cache_key and len(_VOLUMES) == 1:
            break
        _VOLUMES.pop(oldest)
    return array


def load_item(item: Item, with_labels: bool = True) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(image (H, W, 3) uint8, labels (H, W) int64) of a 2D image or of slice ``item.z``.

    Grey images and slices are repeated on 3 channels.  With ``with_labels=False`` the label map
    is not read and None is returned in its place.  Files are read with ``allow_pickle=False``;
    recently used 3D volumes are kept decompressed in a small per-process LRU cache.  A file that
    changed or broke since indexing raises ValueError naming it.
    """
    label_file = item.labels_path or item.path
    if item.z is None:
        image = _load_arrays(item.path, ["imgs"])["imgs"]
        labels = _load_arrays(label_file, ["gts"])["gts"] if with_labels else None
    else:
        volume = _volume(item.path, "imgs")
        if not 0 <= item.z < volume.shape[0]:
            raise ValueError(f"{item.path}: slice {item.z} outside 0..{volume.shape[0] - 1}")
        image = volume[item.z]
        labels = _volume(label_file, "gts")[item.z] if with_labels else None
    if image.dtype != np.uint8:
        raise ValueError(f"{item.path}: imgs has dtype {image.dtype}; expected uint8")
    image = np.ascontiguousarray(ensure_rgb(image))
    if labels is not None:
        if labels.shape != image.shape[:2]:
            raise ValueError(f"{label_file}: gts shape {labels.shape} does not match imgs {image.shape}")
        labels = labels.astype(np.int64)
    return image, labels
