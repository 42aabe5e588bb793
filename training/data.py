"""Training data: an index of 2D images / 3D slices, a resumable sampler and two datasets.

Data layouts (the challenge's npz format, and the layouts medficientsam's data modules read), detected per root:

* **evaluation layout**: ``<root>/imgs/<case>.npz`` (``imgs``) with ``<root>/gts/<case>.npz``
  (``gts``), matched by file name;
* **training layout**: ``<root>/**/*.npz`` (challenge ``train_npz/<Modality>/...``), one file
  holding both ``imgs`` and ``gts``.

``imgs`` is (H, W, 3) / (H, W) uint8 for 2D and (D, H, W) uint8 for 3D; ``gts`` is an integer label
map of the same spatial shape.  As in the MedficientSAM distillation dataset (section 5.1) one
:class:`Item` is every 2D image whose ground truth has foreground plus every 3D slice that has
foreground.

Pieces:

* :func:`build_index` scans the roots (skipping bad files with a logged reason) and caches the
  result as JSON; :func:`load_item` reads one item back.
* :func:`modality_weights` gives per-item weights for modality-balanced sampling.
* :class:`ResumableSampler` is an infinite, rank-sharded, seeded stream of
  ``(item_index, item_seed)`` tuples with an exact resume point (advanced by the loop).
* :class:`DistillDataset` and :class:`FinetuneDataset` turn such a tuple into training tensors
  with the same letterbox transforms the inference engine uses (:mod:`models.preprocess`).
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
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from harness.atomic import atomic_writer
from harness.cases import MODALITY_ALIASES, modality_from_name
from models.preprocess import ensure_rgb, letterbox_size, mask_bbox, preprocess_image
from training.augment import MODES, augment

__all__ = [
    "Item",
    "INDEX_VERSION",
    "DEFAULT_CACHE_DIR",
    "build_index",
    "load_item",
    "letterbox_labels",
    "modality_weights",
    "ResumableSampler",
    "DistillDataset",
    "FinetuneDataset",
]

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


def letterbox_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Letterbox an (H, W) label map to (size, size) like the image: the long side scaled to
    ``size`` (:func:`models.preprocess.letterbox_size`), nearest-exact sampling (torch
    ``nearest-exact``: source index ``floor((i + 0.5) * in / out)``), zero pad bottom/right."""
    h, w = labels.shape
    new_h, new_w = letterbox_size(h, w, size)
    rows = np.minimum(((np.arange(new_h) + 0.5) * (h / new_h)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) * (w / new_w)).astype(np.int64), w - 1)
    out = np.zeros((size, size), dtype=labels.dtype)
    out[:new_h, :new_w] = labels[rows[:, None], cols[None, :]]
    return out


# --------------------------------------------------------------------------- sampling
def modality_weights(items: Sequence[Item]) -> np.ndarray:
    """Per-item weights (float64, summing to 1) giving every modality the same total weight."""
    if not items:
        return np.zeros(0, dtype=np.float64)
    names = [it.modality for it in items]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    n_modalities = len(counts)
    return np.array([1.0 / (n_modalities * counts[name]) for name in names], dtype=np.float64)


class ResumableSampler(Sampler):
    """Infinite, seeded, rank-sharded stream of ``(item_index, item_seed)`` tuples.

    Epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(num_items)`` or, with
    ``weights``, ``epoch_size`` (default ``num_items``) draws with replacement by those weights.
    The epoch's order is padded by wrapping around to a multiple of ``world_size`` and rank ``r``
    takes positions ``r, r + world_size, ...``: every rank yields :attr:`epoch_length` tuples per
    epoch and the ranks never overlap within an epoch (except on the wrapped padding).
    ``item_seed`` is a deterministic 63-bit int of ``(seed, epoch, position in the padded epoch
    order)``; seed the item's augmentation RNG with it.

    Resuming: the *committed* state is ``{"epoch", "position"}``, where ``position`` counts the
    tuples of this rank consumed in that epoch.  Iterating does not change it: a DataLoader
    prefetches (the sampler runs ahead of the training loop), so the loop calls
    :meth:`advance` with the number of tuples it actually consumed (``batch_size * grad_accum``
    per optimiser step, per rank) and checkpoints :meth:`state_dict`.  ``iter()`` always starts
    at the committed state, so after :meth:`load_state_dict` (or with the same ``advance`` calls)
    a new iterator yields exactly the continuation of the uninterrupted stream.
    :meth:`state_at` gives the state after a total number of consumed tuples.  There is no
    ``__len__``: the stream is infinite (``len(DataLoader)`` is undefined; train by steps).
    """

    def __init__(
        self,
        num_items: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        weights: Optional[Sequence[float]] = None,
        epoch_size: Optional[int] = None,
    ):
        if num_items <= 0:
            raise ValueError("num_items must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        super().__init__()
        self.num_items = int(num_items)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.weights = None
        if weights is not None:
            w = np.asarray(weights, dtype=np.float64)
            if w.shape != (self.num_items,) or (w < 0).any() or not w.sum() > 0:
                raise ValueError("weights must be num_items non-negative numbers with a positive sum")
            self.weights = w / w.sum()
        elif epoch_size is not None:
            raise ValueError("epoch_size is only used with weights (a permutation has num_items positions)")
        self.epoch_size = int(epoch_size) if epoch_size is not None else self.num_items
        if self.epoch_size <= 0:
            raise ValueError("epoch_size must be positive")
        self.epoch_length = -(-self.epoch_size // self.world_size)  # per rank, per epoch
        self._epoch = 0
        self._position = 0

    # -- order ----------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> np.ndarray:
        """The full (all ranks, unpadded) item order of ``epoch``."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        if self.weights is None:
            return rng.permutation(self.num_items)
        return rng.choice(self.num_items, size=self.epoch_size, replace=True, p=self.weights)

    def rank_positions(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, positions in the padded epoch order) of this rank for ``epoch``."""
        order = self.epoch_order(epoch)
        positions = np.arange(self.rank, self.epoch_length * self.world_size, self.world_size)
        return order[positions % order.size], positions

    def item_seed(self, epoch: int, position: int) -> int:
        """Deterministic augmentation seed of the padded position ``position`` of ``epoch``."""
        state = np.random.SeedSequence([self.seed, int(epoch), int(position)]).generate_state(2, np.uint32)
        return int((int(state[0]) << 31) ^ int(state[1]))

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Yield from the committed state onwards, forever; the committed state is not changed."""
        epoch, start = self._epoch, self._position
        while True:
            indices, positions = self.rank_positions(epoch)
            for k in range(start, self.epoch_length):
                yield int(indices[k]), self.item_seed(epoch, int(positions[k]))
            epoch, start = epoch + 1, 0

    # -- state ----------------------------------------------------------------------------
    def advance(self, consumed: int) -> None:
        """Commit ``consumed`` more tuples of this rank as used by the training loop."""
        if consumed < 0:
            raise ValueError("consumed must be >= 0")
        total = self._epoch * self.epoch_length + self._position + int(consumed)
        self._epoch, self._position = divmod(total, self.epoch_length)

    def state_dict(self) -> dict:
        """The committed state ``{"epoch", "position"}`` (see :meth:`advance`)."""
        return {"epoch": self._epoch, "position": self._position}

    def load_state_dict(self, state: dict) -> None:
        """Commit ``state`` (from :meth:`state_dict` or :meth:`state_at`); the next ``iter()`` continues there."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.epoch_length:
            raise ValueError(f"invalid sampler state {state} (epoch length {self.epoch_length})")
        self._epoch, self._position = divmod(epoch * self.epoch_length + position, self.epoch_length)

    def state_at(self, consumed: int) -> dict:
        """The state after ``consumed`` tuples of this rank in total, counted from epoch 0 position 0."""
        if consumed < 0:
            raise ValueError("consumed must be >= 0")
        return {"epoch": consumed // self.epoch_length, "position": consumed % self.epoch_length}


# --------------------------------------------------------------------------- datasets
def _split_key(key) -> tuple[int, int]:
    """``(index, seed)`` from a sampler tuple; a bare index uses the index as its seed."""
    if isinstance(key, (tuple, list)):
        index, seed = key
        return int(index), int(seed)
    return int(key), int(key)


class DistillDataset(Dataset):
    """Encoder distillation pairs (upstream section 5.1).

    ``dataset[(index, seed)]`` loads ``items[index]``, augments it with
    ``np.random.default_rng(seed)`` (``augment`` mode, default flips only) and letterboxes the
    same augmented uint8 image twice through :func:`models.preprocess.preprocess_image`:
    ``{"student": (3, S, S) float32, "teacher": (3, T, T) float32, "modality": str}``, both
    min-max scaled to [0, 1] and zero padded (no mean/std).  Upstream's teacher is MedSAM ViT-B at
    1024 (pass ``teacher_size=1024``); the default here is 256 with INTER_AREA (LiteMedSAM).
    """

    def __init__(
        self,
        items: Sequence[Item],
        student_size: int = 512,
        student_resize: str = "bilinear_u8",
        teacher_size: int = 256,
        teacher_resize: str = "area",
        augment: str = "flips",
    ):
        if augment not in MODES:
            raise ValueError(f"unknown augmentation mode {augment!r}")
        self.items = list(items)
        self.student_size = int(student_size)
        self.student_resize = student_resize
        self.teacher_size = int(teacher_size)
        self.teacher_resize = teacher_resize
        self.augment = augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> dict:
        index, seed = _split_key(key)
        item = self.items[index]
        image, _ = load_item(item, with_labels=False)
        image, _ = augment(image, None, np.random.default_rng(seed), self.augment)
        student, _ = preprocess_image(image, self.student_size, self.student_resize)
        teacher, _ = preprocess_image(image, self.teacher_size, self.teacher_resize)
        return {"student": student[0], "teacher": teacher[0], "modality": item.modality}


class FinetuneDataset(Dataset):
    """Box-prompted fine-tuning samples (upstream section 5.2).

    ``dataset[(index, seed)]`` with ``rng = np.random.default_rng(seed)``:

    1. load ``items[index]`` and augment image and label map together at the original
       resolution (``augment`` mode, default ``"full"``);
    2. letterbox the image (:func:`models.preprocess.preprocess_image`) and the label map
       (:func:`letterbox_labels`, nearest-exact, same new size, zero pad) to ``size``;
    3. draw ``mask_num`` labels with replacement, uniformly from the labels still present in the
       letterboxed map (upstream draws from those present after augmentation; drawing after the
       resize also drops objects too small to survive it, which would give empty targets);
    4. per label: the binary mask and its tight bbox in the ``size`` frame grown by one shift
       ``s ~ U{0..box_jitter}`` on all four sides, clamped to ``[0, size - 1]``;
    5. if no label survived: ``mask_num`` random boxes inside the letterboxed image and empty
       masks.

    Returns ``{"image": (3, S, S) float32, "masks": (mask_num, S, S) float32 in {0, 1},
    "boxes": (mask_num, 4) float32 xyxy (inclusive pixel indices, S frame), "modality": str}``.
    Upstream feeds MedSAM's 1024 prompt encoder ``int(box * 1024 / S)``; that scaling is the
    model's job, not the dataset's.
    """

    def __init__(
        self,
        items: Sequence[Item],
        size: int = 512,
        resize: str = "bilinear_u8",
        mask_num: int = 5,
        box_jitter: int = 5,
        augment: str = "full",
    ):
        if augment not in MODES:
            raise ValueError(f"unknown augmentation mode {augment!r}")
        if mask_num < 1 or box_jitter < 0:
            raise ValueError("mask_num must be >= 1 and box_jitter >= 0")
        self.items = list(items)
        self.size = int(size)
        self.resize = resize
        self.mask_num = int(mask_num)
        self.box_jitter = int(box_jitter)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> dict:
        index, seed = _split_key(key)
        item = self.items[index]
        rng = np.random.default_rng(seed)
        image, labels = load_item(item)
        image, labels = augment(image, labels, rng, self.augment)
        tensor, (new_h, new_w) = preprocess_image(image, self.size, self.resize)
        small = letterbox_labels(labels, self.size)

        size = self.size
        masks = np.zeros((self.mask_num, size, size), dtype=np.float32)
        boxes = np.zeros((self.mask_num, 4), dtype=np.float32)
        present = np.unique(small)
        present = present[present != 0]
        if present.size:
            chosen = rng.choice(present, size=self.mask_num, replace=True)
            for k, label in enumerate(chosen):
                mask = small == label
                masks[k] = mask
                x0, y0, x1, y1 = (int(v) for v in mask_bbox(mask))
                s = int(rng.integers(0, self.box_jitter + 1))
                boxes[k] = np.clip([x0 - s, y0 - s, x1 + s, y1 + s], 0, size - 1)
        else:
            for k in range(self.mask_num):
                xs = np.sort(rng.integers(0, new_w, size=2))
                ys = np.sort(rng.integers(0, new_h, size=2))
                boxes[k] = [xs[0], ys[0], xs[1], ys[1]]
        return {
            "image": tensor[0],
            "masks": torch.from_numpy(masks),
            "boxes": torch.from_numpy(boxes),
            "modality": item.modality,
        }
