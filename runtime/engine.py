"""2D and 3D box-prompt inference on exported graphs, in numpy: the harness engine's fast path.

2D: the image is encoded once, each box decoded on its own (one box per decoder call), its logits
upscaled to the image and thresholded; box row i paints label i + 1, later boxes over earlier ones.

3D: each box is segmented from its middle slice outwards (:func:`runtime.pipelines.z_plan`), every
slice after the first prompted by a box from its neighbour's mask (the pipeline's ``propagate_box``).
The embeddings depend on the slice alone, so the slices every box will visit are listed first, and a
slice's embedding is kept (within ``cache_mb``) until its last planned visit: each slice is encoded
once.  An embedding that does not fit the budget is not kept, and its slice is encoded again at its
next visit.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from . import preprocess as pp
from .pipelines import Pipeline, slice_index, z_plan

__all__ = ["Segmenter", "EngineStats"]


class EngineStats:
    """Counters since the segmenter was built: encoder and decoder calls."""

    def __init__(self) -> None:
        self.encoder_calls = 0
        self.decoder_calls = 0

    def as_dict(self) -> dict:
        return {"encoder_calls": self.encoder_calls, "decoder_calls": self.decoder_calls}


class Segmenter:
    """``segment(imgs, boxes) -> segs`` over ``graphs`` (a :class:`runtime.graphs.Graphs` or anything
    with ``encode`` and ``decode``) with ``pipeline``'s transforms."""

    def __init__(self, graphs, pipeline: Pipeline, cache_mb: float = 1024.0):
        input_size = getattr(graphs, "input_size", pipeline.input_size)
        if input_size != pipeline.input_size:
            raise ValueError(f"the encoder takes {input_size}px input but pipeline {pipeline.name} feeds "
                             f"{pipeline.input_size}px")
        if cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {cache_mb}")
        self.graphs = graphs
        self.pipeline = pipeline
        self.cache_bytes = int(cache_mb * 2**20)
        self.stats = EngineStats()

    # ------------------------------------------------------------------ public API
    def segment(self, imgs: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """uint16 label map with the spatial shape of ``imgs``; box row i -> label i + 1.

        2D: ``imgs`` (H, W) or (H, W, 3), ``boxes`` (N, 4) [x_min, y_min, x_max, y_max].
        3D: ``imgs`` (D, H, W), ``boxes`` (N, 6) [x_min, y_min, z_min, x_max, y_max, z_max].
        """
        imgs = _as_uint8(np.asarray(imgs))
        boxes = np.asarray(boxes)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 6 if _looks_3d(imgs, None) else 4)
        if boxes.ndim == 1:
            boxes = boxes[None]
        if _looks_3d(imgs, boxes):
            return self.segment_3d(imgs, boxes)
        return self.segment_2d(imgs, boxes)

    def segment_2d(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        p = self.pipeline
        rgb = pp.ensure_rgb(image)
        original_size = rgb.shape[:2]
        segs = np.zeros(original_size, dtype=np.uint16)
        if len(boxes) == 0:
            return segs
        if boxes.shape[-1] != 4:
            raise ValueError(f"2D boxes must be (N, 4), got {boxes.shape}")
        tensor, new_size = pp.preprocess_image(rgb, p.input_size, p.resize)
        embedding = self._encode(tensor)
        for i, box in enumerate(boxes):
            prompt = pp.scale_box(box, original_size, p.prompt_size)
            segs[self._mask(embedding, prompt, new_size, original_size)] = i + 1
        return segs

    def segment_3d(self, volume: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        p = self.pipeline
        if volume.ndim == 4 and volume.shape[-1] == 1:
            volume = volume[..., 0]
        depth = volume.shape[0]
        original_size = volume.shape[1:3]
        segs = np.zeros(volume.shape[:3], dtype=np.uint16)
        if len(boxes) == 0:
            return segs
        if boxes.shape[-1] != 6:
            raise ValueError(f"3D boxes must be (N, 6), got {boxes.shape}")
        new_size = pp.letterbox_size(original_size[0], original_size[1], p.input_size)
        slices = _SliceEmbeddings(self, volume, self.planned_visits(boxes, depth), self.cache_bytes)
        for i, box in enumerate(boxes):
            label = i + 1
            x_min, y_min, z_min, x_max, y_max, z_max = box
            default_box = pp.scale_box(np.array([x_min, y_min, x_max, y_max]), original_size, p.prompt_size)
            _, upward, downward = z_plan(z_min, z_max, depth, p)
            # LiteMedSAM keeps the label value in its uint8 per-box volume and letterboxes it for the
            # propagated box; the value changes INTER_AREA's rounding, so it is kept (<= 255).
            fill = min(label, 255) if p.propagate_box == "prev_mask_256_shift3" else 1
            temp = np.zeros(volume.shape[:3], dtype=np.uint8)
            for step, z in enumerate(upward):
                prompt = default_box if step == 0 else self.propagated_box(temp[z - 1], default_box)
                temp[z][self._mask(slices.get(z), prompt, new_size, original_size)] = fill
            for z in downward:
                prompt = self.propagated_box(temp[z + 1], default_box)
                temp[z][self._mask(slices.get(z), prompt, new_size, original_size)] = fill
            segs[temp > 0] = label
        return segs

    # ------------------------------------------------------------------ building blocks
    def planned_visits(self, boxes: np.ndarray, depth: int) -> List[int]:
        """The slices the propagation encodes, in order (box by box, upward then downward), as
        non-negative indices; stops at the first out-of-range z (where the propagation raises)."""
        visits: List[int] = []
        for box in np.asarray(boxes).reshape(-1, 6):
            _, upward, downward = z_plan(box[2], box[5], depth, self.pipeline)
            for z in upward + downward:
                key = slice_index(z, depth)
                if key is None:
                    return visits
                visits.append(key)
        return visits

    def propagated_box(self, previous_mask: np.ndarray, default_box: np.ndarray) -> np.ndarray:
        p = self.pipeline
        if p.propagate_box == "prev_mask_256_shift3":
            box = pp.letterbox_mask_bbox(previous_mask, p.input_size, p.propagate_shift)
            return default_box if box is None else box
        box = pp.mask_bbox(previous_mask)
        if box is None:
            return default_box
        return pp.scale_box(box, previous_mask.shape[:2], p.prompt_size)

    def slice_input(self, volume: np.ndarray, z: int) -> np.ndarray:
        tensor, _ = pp.preprocess_image(pp.ensure_rgb(volume[z]), self.pipeline.input_size, self.pipeline.resize)
        return tensor

    def _encode(self, tensor: np.ndarray) -> np.ndarray:
        self.stats.encoder_calls += 1
        return self.graphs.encode(tensor)

    def _mask(self, embedding: np.ndarray, prompt: np.ndarray, new_size, original_size) -> np.ndarray:
        self.stats.decoder_calls += 1
        low_res = self.graphs.decode(embedding, prompt)
        logits = pp.postprocess_logits(low_res[0, 0], new_size, original_size, self.pipeline.postprocess)
        return pp.logits_to_mask(logits, self.pipeline.threshold)


class _SliceEmbeddings:
    """One 3D case's slice embeddings: each kept until its last planned visit, within a byte budget."""

    def __init__(self, segmenter: Segmenter, volume: np.ndarray, plan: List[int], budget: int):
        self.segmenter = segmenter
        self.volume = volume
        self.budget = budget
        self.remaining: Dict[int, int] = {}
        for key in plan:
            self.remaining[key] = self.remaining.get(key, 0) + 1
        self.cache: Dict[int, np.ndarray] = {}
        self.bytes = 0

    def get(self, z: int) -> np.ndarray:
        key = slice_index(z, self.volume.shape[0])
        if key is None:  # as upstream: indexing the volume raises
            raise IndexError(f"slice {z} is outside the volume of {self.volume.shape[0]} slices")
        left = self.remaining.get(key, 0) - 1
        self.remaining[key] = left
        cached: Optional[np.ndarray] = self.cache.get(key)
        if cached is not None:
            if left <= 0:
                del self.cache[key]
                self.bytes -= cached.nbytes
            return cached
        embedding = self.segmenter._encode(self.segmenter.slice_input(self.volume, key))
        if left > 0 and self.bytes + embedding.nbytes <= self.budget:
            self.cache[key] = embedding
            self.bytes += embedding.nbytes
        return embedding


def _as_uint8(imgs: np.ndarray) -> np.ndarray:
    if imgs.dtype == np.uint8:
        return imgs
    if imgs.size and (imgs.min() < 0 or imgs.max() > 255):
        raise ValueError(f"images must be in [0, 255], got range [{imgs.min()}, {imgs.max()}]")
    return imgs.astype(np.uint8)


def _looks_3d(imgs: np.ndarray, boxes: Optional[np.ndarray]) -> bool:
    if boxes is not None and boxes.ndim == 2 and boxes.shape[1] in (4, 6):
        return boxes.shape[1] == 6
    if imgs.ndim == 2:
        return False
    if imgs.ndim == 3:
        return imgs.shape[-1] != 3
    return imgs.ndim == 4
