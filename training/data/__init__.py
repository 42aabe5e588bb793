"""Training data: an index of 2D images / 3D slices (:mod:`.index`), a resumable sampler (:mod:`.sampler`)
and two datasets (:mod:`.datasets`).

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
  with the same letterbox transforms the inference engine uses (:mod:`models.inference.preprocess`).
"""
from __future__ import annotations

from training.data.datasets import DistillDataset, FinetuneDataset, letterbox_labels
from training.data.index import DEFAULT_CACHE_DIR, INDEX_VERSION, Item, build_index, load_item
from training.data.sampler import ResumableSampler, modality_weights

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
