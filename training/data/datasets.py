"""The training datasets: :class:`DistillDataset` (encoder distillation pairs) and
:class:`FinetuneDataset` (images, masks and boxes), each turning a sampler tuple into tensors with the
letterbox transforms the inference engine uses (:mod:`models.inference.preprocess`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from models.inference.preprocess import letterbox_size, mask_bbox, preprocess_image
from training.augment import MODES, augment
from training.data.index import Item, load_item


def letterbox_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Letterbox an (H, W) label map to (size, size) like the image: the long side scaled to
    ``size`` (:func:`models.inference.preprocess.letterbox_size`), nearest-exact sampling (torch
    ``nearest-exact``: source index ``floor((i + 0.5) * in / out)``), zero pad bottom/right."""
    h, w = labels.shape
    new_h, new_w = letterbox_size(h, w, size)
    rows = np.minimum(((np.arange(new_h) + 0.5) * (h / new_h)).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) * (w / new_w)).astype(np.int64), w - 1)
    out = np.zeros((size, size), dtype=labels.dtype)
    out[:new_h, :new_w] = labels[rows[:, None], cols[None, :]]
    return out


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
    same augmented uint8 image twice through :func:`models.inference.preprocess.preprocess_image`:
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
    2. letterbox the image (:func:`models.inference.preprocess.preprocess_image`) and the label map
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
