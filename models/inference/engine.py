"""One box-prompt inference engine (2D images and 3D slice propagation) for SAM-style models.

The engine takes any module with the interface of :class:`models.nets.promptable_sam.PromptableSAM`::

    model.image_encoder(x)                      (B, 3, S, S) float32 -> (B, 256, 64, 64)
    model.decode_boxes(embedding, boxes)        (1, 256, 64, 64), (B, 4) in the prompt frame
                                                -> (low_res (B, 1, 256, 256), iou (B, 1))

and a :class:`~models.inference.pipelines.PipelineConfig` (the presets live in
:mod:`models.inference.pipelines`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from models.hardware import cpu_bf16_support
from models.inference import preprocess as pp
from models.inference.pipelines import LITEMEDSAM_CVPR24, PipelineConfig, z_plan
from models.inference.slice_cache import SliceCache, _nbytes

__all__ = [
    "BoxPromptEngine",
    "EngineStats",
    "PRECISIONS",
]

PRECISIONS = ("fp32", "bf16")


@dataclass
class EngineStats:
    """Counters of one engine since it was built (or since :meth:`BoxPromptEngine.reset_stats`).

    encoder_calls     image-encoder forward calls (a batch of k slices is one call);
    images_encoded    images (2D) and slices (3D) encoded, summed over those calls;
    encoder_batches   the batch size of each encoder call, in order;
    decoder_calls     prompt encoder + mask decoder calls (a batch of boxes is one call);
    cache_hits / cache_misses
                      slice-embedding cache lookups that found / missed an entry;
    peak_cache_bytes  the most bytes the slice cache held at any time;
    encoder_seconds   wall time spent inside image-encoder calls (for the encoder's GFLOP/s);
    """

    encoder_calls: int = 0
    images_encoded: int = 0
    encoder_batches: List[int] = field(default_factory=list)
    decoder_calls: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    peak_cache_bytes: int = 0
    encoder_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


# One (1, 256, 64, 64) float32 embedding: the engine's model interface, assumed until the first
# encoder call of an engine shows the real size.
_ASSUMED_EMBEDDING_BYTES = 256 * 64 * 64 * 4


class BoxPromptEngine:
    """Box-prompted segmentation of a 2D image or a 3D volume with one SAM-style model.

    ``config.fast`` selects the fast execution path (see :class:`PipelineConfig`); the counters of
    :class:`EngineStats` (``engine.stats``) show what it saved.

    ``precision="bf16"`` runs the image encoder under bfloat16 autocast (matmuls and convolutions in
    bf16, accumulation and norms as torch's autocast policy keeps them) and hands the decoder the
    embedding in float32; the prompt encoder, mask decoder and postprocessing stay float32.  It is
    refused (ValueError) on a CPU without bf16 arithmetic (:func:`cpu_bf16_support`).
    """

    def __init__(self, model: torch.nn.Module, config: PipelineConfig = LITEMEDSAM_CVPR24, device=None,
                 precision: str = "fp32"):
        self.model = model
        self.config = config
        if device is None:
            try:
                device = next(model.parameters()).device
            except StopIteration:
                device = torch.device("cpu")
        self.device = torch.device(device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
        if precision == "bf16" and self.device.type == "cpu" and not cpu_bf16_support():
            raise ValueError("precision bf16 needs a CPU with AMX-BF16 or AVX512-BF16 (not found in "
                             "/proc/cpuinfo flags); use --precision fp32")
        self.precision = precision
        self._volume: Optional[np.ndarray] = None
        self.stats = EngineStats()
        self._slice_cache = SliceCache(0, self.stats)
        self._new_size: Tuple[int, int] = (0, 0)
        self._embedding_bytes: Optional[int] = None  # bytes of one slice embedding, once known
        # what decodes point prompts (decode_prompts); None: ``model`` itself (a torch PromptableSAM)
        self.point_decoder: Optional[torch.nn.Module] = None

    @property
    def encoder_calls(self) -> int:
        """How often the image encoder ran (the slice cache's and batching's effect shows here)."""
        return self.stats.encoder_calls

    def reset_stats(self) -> None:
        self.stats = EngineStats()
        self._slice_cache.stats = self.stats

    # ------------------------------------------------------------------ public API
    def segment(self, imgs: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """uint16 label map with the spatial shape of ``imgs``; box row i -> label i + 1.

        2D: ``imgs`` (H, W) or (H, W, 3), ``boxes`` (N, 4) [x_min, y_min, x_max, y_max].
        3D: ``imgs`` (D, H, W) (or (D, H, W, 3)), ``boxes`` (N, 6)
        [x_min, y_min, z_min, x_max, y_max, z_max].  Later boxes overwrite earlier ones.
        """
        imgs = _as_uint8(np.asarray(imgs))
        boxes = np.asarray(boxes)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 6 if _looks_3d(imgs, None) else 4)
        if boxes.ndim == 1:
            boxes = boxes[None]
        is_3d = _looks_3d(imgs, boxes)
        with torch.inference_mode():
            if is_3d:
                return self.segment_3d(imgs, boxes)
            return self.segment_2d(imgs, boxes)

    def segment_2d(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        cfg = self.config
        rgb = pp.ensure_rgb(image)
        original_size = rgb.shape[:2]
        segs = np.zeros(original_size, dtype=np.uint16)
        if len(boxes) == 0:
            return segs
        if boxes.shape[-1] != 4:
            raise ValueError(f"2D boxes must be (N, 4), got {boxes.shape}")
        with torch.inference_mode():
            tensor, new_size = pp.preprocess_image(rgb, cfg.input_size, cfg.resize)
            embedding = self.encode(tensor)
            prompts = np.stack([pp.scale_box(b, original_size, cfg.prompt_size) for b in boxes])
            step = cfg.boxes_per_decoder_call(len(prompts))
            groups = [np.arange(i, min(i + step, len(prompts))) for i in range(0, len(prompts), step)]
            for group in groups:
                low_res = self.decode(embedding, prompts[group])
                for row, i in enumerate(group):  # postprocess one box at a time (same numbers, less memory)
                    mask = self.to_mask(low_res[row : row + 1], new_size, original_size)
                    segs[mask] = i + 1
        return segs

    def segment_3d(self, volume: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        cfg = self.config
        depth = volume.shape[0]
        original_size = volume.shape[1:3]
        segs = np.zeros(volume.shape[:3], dtype=np.uint16)
        if len(boxes) == 0:
            return segs
        if boxes.shape[-1] != 6:
            raise ValueError(f"3D boxes must be (N, 6), got {boxes.shape}")
        self.begin_volume(volume, boxes)
        try:
            with torch.inference_mode():
                for i, box in enumerate(boxes):
                    label = i + 1
                    x_min, y_min, z_min, x_max, y_max, z_max = box
                    default_box = pp.scale_box(np.array([x_min, y_min, x_max, y_max]), original_size, cfg.prompt_size)
                    z_mid, upward, downward = z_plan(z_min, z_max, depth, cfg)
                    # LiteMedSAM keeps the label value in its uint8 per-box volume and letterboxes it
                    # for propagation; the value changes INTER_AREA rounding, so keep it (<= 255).
                    fill = min(label, 255) if cfg.propagate_box == "prev_mask_256_shift3" else 1
                    temp = np.zeros(volume.shape[:3], dtype=np.uint8)
                    for step, z in enumerate(upward):
                        prompt = default_box if step == 0 else self.propagated_box(temp[z - 1], default_box)
                        temp[z][self.segment_slice(z, prompt)] = fill
                    for z in downward:
                        prompt = self.propagated_box(temp[z + 1], default_box)
                        temp[z][self.segment_slice(z, prompt)] = fill
                    segs[temp > 0] = label
        finally:
            self.end_volume()
        return segs

    def segment_with_clicks(self, volume: np.ndarray, boxes: np.ndarray, clicks: Dict[int, list],
                            prev_segs: Optional[np.ndarray] = None, propagate: bool = True) -> np.ndarray:
        """3D segmentation corrected by clicks (the 2025 interactive protocol); uint16 like :meth:`segment`.

        ``boxes`` (N, 6) as in :meth:`segment`; ``clicks`` maps a label (``i + 1`` for box ``i``) to its
        clicks in the order given, ``(z, y, x, is_foreground)``; ``prev_segs`` is the previous step's
        segmentation (None: the box-only :meth:`segment` of the volume stands in for it).

        The rule, per label with clicks (labels without clicks keep the previous prediction):

        1. the start slice is the slice of the label's latest click;
        2. that slice is decoded again with its box (the bounding box of the label's previous mask on
           that slice together with its foreground clicks there, brought into the prompt frame as
           propagation brings it; the class box when that mask is empty) and all of the label's clicks
           on that slice, as SAM's labelled points (1 foreground, 0
           background; (x, y) scaled into the prompt frame as boxes are);
        3. propagation resumes from there over the slices whose box-only propagation passed through the
           start slice: from a slice above the box's middle slice upward to the top of the class's z
           range, from one below it downward to the bottom, from the middle slice both ways; each slice
           is prompted with the box of its neighbour's new mask (the propagation rule of the preset;
           grown to its own foreground clicks) plus its own clicks, if any. The z range is the slices
           the box-only propagation visits, widened to any foreground click outside it. The slices
           between the middle slice and the start slice keep their masks: their chain does not pass
           through the clicked slice (re-propagating them from the clicked slice, without the box's
           middle-slice prompt, was measured to lower 3D Dice);
        4. the label's voxels on the re-decoded slices are replaced by the new masks (other slices keep
           the previous prediction); a voxel another label held stays with it unless the new mask
           covers it.

        ``propagate=False``: step 3 is skipped, only the start slice is decoded again (a more conservative
        rule, compared with this one by ``bench/bench_click_rules.py``).

        The models were trained with boxes only: SAM's point embeddings are used as they come.
        """
        volume = _as_uint8(np.asarray(volume))
        if volume.ndim == 4:
            volume = volume[..., 0]
        if volume.ndim != 3:
            raise ValueError(f"clicks are supported on 3D volumes (D, H, W); got imgs of shape {volume.shape}")
        boxes = np.asarray(boxes).reshape(-1, 6)
        if prev_segs is None:
            with torch.inference_mode():
                prev = self.segment_3d(volume, boxes)
        else:
            prev = np.asarray(prev_segs).astype(np.uint16, copy=True)
            if prev.shape != volume.shape:
                raise ValueError(f"prev_segs has shape {prev.shape}; the volume has {volume.shape}")
        clicked = {int(k): list(v) for k, v in (clicks or {}).items() if v}
        if not clicked:
            return prev
        cfg = self.config
        depth = volume.shape[0]
        original_size = volume.shape[1:3]
        out = prev.copy()
        self.begin_volume(volume, None)  # no visit plan: the clicks decide where propagation goes
        try:
            with torch.inference_mode():
                for label in sorted(clicked):
                    if not 1 <= label <= len(boxes):
                        raise ValueError(f"clicks for label {label}; the case has {len(boxes)} box(es)")
                    x_min, y_min, z_min, x_max, y_max, z_max = boxes[label - 1]
                    default_box = pp.scale_box(np.array([x_min, y_min, x_max, y_max]), original_size,
                                               cfg.prompt_size)
                    z_mid, upward, downward = z_plan(z_min, z_max, depth, cfg)
                    visited = [z for z in upward + downward if 0 <= z < depth]
                    fg_z = [int(c[0]) for c in clicked[label] if c[3]]
                    lo = min(visited + fg_z) if visited or fg_z else 0
                    hi = max(visited + fg_z) if visited or fg_z else depth - 1
                    start = int(clicked[label][-1][0])
                    lo, hi = min(lo, start), max(hi, start)
                    fill = min(label, 255) if cfg.propagate_box == "prev_mask_256_shift3" else 1
                    temp = np.where(prev == label, fill, 0).astype(np.uint8)
                    new = np.zeros(volume.shape, dtype=bool)
                    order = [(start, start)]  # (slice, the slice its box comes from)
                    if propagate and start >= z_mid:  # the slices whose propagation chain passes through the start slice
                        order += [(z, z - 1) for z in range(start + 1, hi + 1)]
                    if propagate and start <= z_mid:
                        order += [(z, z + 1) for z in range(start - 1, lo - 1, -1)]
                    lo, hi = min(z for z, _ in order), max(z for z, _ in order)
                    for z, source in order:
                        guide = self._with_clicks(temp[source], z, clicked[label], fill)
                        new[z] = self._decode_slice_with_clicks(z, self.propagated_box(guide, default_box),
                                                                clicked[label], original_size)
                        temp[z] = np.where(new[z], fill, 0)
                    span = np.zeros(depth, dtype=bool)
                    span[lo:hi + 1] = True
                    out[(out == label) & span[:, None, None]] = 0
                    out[new] = label
        finally:
            self.end_volume()
        return out

    @staticmethod
    def _with_clicks(mask: np.ndarray, z: int, clicks: list, fill: int) -> np.ndarray:
        """The mask a slice's box is taken from: ``mask`` plus the foreground clicks on slice ``z``, so the
        box covers them; an empty ``mask`` stays empty (the class box is used then)."""
        here = [c for c in clicks if int(c[0]) == z and c[3]]
        if not here or not mask.any():
            return mask
        mask = mask.copy()
        for _, y, x, _ in here:
            mask[int(y), int(x)] = fill
        return mask

    def _decode_slice_with_clicks(self, z: int, prompt_box: np.ndarray, clicks: list, original_size) -> np.ndarray:
        """Slice ``z`` decoded with ``prompt_box`` and the clicks of ``clicks`` that lie on it (box only
        when none does)."""
        here = [c for c in clicks if int(c[0]) == z]
        if not here:
            return self.segment_slice(z, prompt_box)
        embedding = self.encode_slice(z)
        points = np.stack([pp.scale_box(np.array([c[2], c[1]], dtype=np.float64), original_size,
                                        self.config.prompt_size) for c in here])
        labels = np.array([1 if c[3] else 0 for c in here], dtype=np.int64)
        low_res = self.decode_points(embedding, prompt_box, points, labels)
        return self.to_mask(low_res, self._new_size, original_size)

    # ------------------------------------------------------------------ building blocks
    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, 256, 64, 64) of a (B, 3, S, S) batch: one image-encoder call."""
        self.stats.encoder_calls += 1
        self.stats.images_encoded += int(tensor.shape[0])
        self.stats.encoder_batches.append(int(tensor.shape[0]))
        start = time.perf_counter()
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                embedding = self.model.image_encoder(tensor.to(self.device)).float()
        else:
            embedding = self.model.image_encoder(tensor.to(self.device))
        self.stats.encoder_seconds += time.perf_counter() - start
        return embedding

    def decode(self, embedding: torch.Tensor, prompt_boxes: np.ndarray) -> torch.Tensor:
        """Low-res logits (B, 1, 256, 256) for B boxes already in the prompt frame."""
        self.stats.decoder_calls += 1
        boxes = torch.as_tensor(np.asarray(prompt_boxes, dtype=np.float64).reshape(-1, 4), dtype=torch.float32)
        low_res, _ = self.model.decode_boxes(embedding, boxes.to(self.device))
        return low_res

    def decode_points(self, embedding: torch.Tensor, prompt_box: np.ndarray, points: np.ndarray,
                      labels: np.ndarray) -> torch.Tensor:
        """Low-res logits (1, 1, 256, 256) for one box and N labelled points, all in the prompt frame:
        ``point_decoder.decode_prompts`` (the torch model's own prompt encoder and mask decoder; on an
        export backend, whose decoder graph takes boxes only, the torch copy the segmenter kept)."""
        decoder = self.point_decoder if self.point_decoder is not None else self.model
        if not hasattr(decoder, "decode_prompts"):
            raise ValueError(f"{type(decoder).__name__} cannot decode point prompts (no decode_prompts)")
        self.stats.decoder_calls += 1
        box = torch.as_tensor(np.asarray(prompt_box, dtype=np.float64).reshape(1, 4), dtype=torch.float32)
        coords = torch.as_tensor(np.asarray(points, dtype=np.float64).reshape(1, -1, 2), dtype=torch.float32)
        point_labels = torch.as_tensor(np.asarray(labels).reshape(1, -1), dtype=torch.int64)
        device = next(decoder.parameters()).device if isinstance(decoder, torch.nn.Module) else self.device
        embedding = torch.as_tensor(embedding, dtype=torch.float32).to(device)
        low_res, _ = decoder.decode_prompts(embedding, box.to(device), coords.to(device), point_labels.to(device))
        return low_res

    def to_mask(self, low_res: torch.Tensor, new_size, original_size) -> np.ndarray:
        """(1, 1, h, w) logits -> boolean (H, W) mask at the original size."""
        logits = pp.postprocess_logits(low_res, new_size, original_size, self.config.postprocess)
        return pp.logits_to_mask(logits, self.config.threshold)[0, 0].cpu().numpy()

    def propagated_box(self, previous_mask: np.ndarray, default_box: np.ndarray) -> np.ndarray:
        cfg = self.config
        if cfg.propagate_box == "prev_mask_256_shift3":
            box = pp.letterbox_mask_bbox(previous_mask, cfg.input_size, cfg.propagate_shift)
            return default_box if box is None else box
        box = pp.mask_bbox(previous_mask)
        if box is None:
            return default_box
        return pp.scale_box(box, previous_mask.shape[:2], cfg.prompt_size)

    # ------------------------------------------------------------------ per-volume state
    def begin_volume(self, volume: np.ndarray, boxes: Optional[np.ndarray] = None) -> None:
        """Start a 3D case; on the fast path ``boxes`` gives the slice visit plan."""
        self._volume = volume
        budget = int(self.config.cache_mb * 2**20) if self.config.fast else 0
        self._slice_cache = SliceCache(budget, self.stats)
        self._new_size = pp.letterbox_size(volume.shape[1], volume.shape[2], self.config.input_size)
        self._plan: Optional[List[int]] = None
        self._plan_pos = 0
        self._remaining: Dict[int, int] = {}
        if self.config.fast and boxes is not None:
            self._plan = self.planned_visits(boxes)
            for key in self._plan:
                self._remaining[key] = self._remaining.get(key, 0) + 1

    def end_volume(self) -> None:
        self._volume = None
        self._slice_cache.clear()
        self._plan = None
        self._remaining = {}

    def _slice_key(self, z: int) -> Optional[int]:
        return _slice_index(z, self._volume.shape[0])

    def planned_visits(self, boxes: np.ndarray, depth: Optional[int] = None) -> List[int]:
        """The slices the propagation will encode, in order (box by box, upward then downward), as
        non-negative indices.  The embeddings depend on the slice alone, so this is known before
        any mask is.  Stops at the first out-of-range z (where the propagation itself raises).
        ``depth``: the volume's (default: the current volume's)."""
        depth = self._volume.shape[0] if depth is None else depth
        visits: List[int] = []
        for box in np.asarray(boxes).reshape(-1, 6):
            _, upward, downward = z_plan(box[2], box[5], depth, self.config)
            for z in upward + downward:
                key = _slice_index(z, depth)
                if key is None:
                    return visits
                visits.append(key)
        return visits

    def planned_slices(self, boxes: np.ndarray, depth: Optional[int] = None) -> List[int]:
        """Sorted union of the slices the boxes' z-plans visit."""
        return sorted(set(self.planned_visits(boxes, depth)))

    def slice_tensor(self, z: int) -> torch.Tensor:
        """Encoder input (1, 3, S, S) for slice z of the current volume."""
        rgb = pp.ensure_rgb(self._volume[z])
        tensor, _ = pp.preprocess_image(rgb, self.config.input_size, self.config.resize)
        return tensor

    def encode_slice(self, z: int) -> torch.Tensor:
        """Embedding (1, 256, 64, 64) of slice z of the current volume.

        Faithful path: recomputed at every visit, as upstream does.  Fast path: see
        :meth:`_encode_planned` (without a visit plan, each slice is kept in the bounded cache for
        the rest of the case while it fits).
        """
        if not self.config.fast:
            return self.encode(self.slice_tensor(z))
        key = self._slice_key(z)
        if key is None:
            return self.encode(self.slice_tensor(z))  # out of range: raises IndexError, as upstream
        if self._plan is not None:
            return self._encode_planned(key)
        cached = self._slice_cache.get(key)
        if cached is not None:
            return cached
        embedding = self.encode(self.slice_tensor(key))
        self._slice_cache.put(key, embedding)
        return embedding

    def _encode_planned(self, key: int) -> torch.Tensor:
        """Fast path: the visit plan says which slices come next and how often each is visited.

        A slice missing from the cache is encoded together with the next slices of the plan that
        are not cached yet (at most ``encoder_batch`` per encoder call, and only as many as the
        byte budget holds); each entry is an owned copy, kept until its last planned visit and
        then handed over (earlier visits get a copy).  With budget to spare every slice of the
        case is encoded exactly once; with too little, a slice that found no room is encoded
        again at its next visit (never more often than on the faithful path).
        """
        plan = self._plan
        if self._plan_pos < len(plan) and plan[self._plan_pos] == key:
            self._plan_pos += 1
        else:  # the propagation left the plan (cannot happen with z_plan): plain caching from here
            self._plan = None
            return self.encode_slice(key)
        self._remaining[key] -= 1
        last_visit = self._remaining[key] == 0
        cache = self._slice_cache
        if key in cache:
            return cache.pop(key) if last_visit else cache.get(key)
        self.stats.cache_misses += 1
        batch = [key]
        per_slice = self._embedding_bytes or _ASSUMED_EMBEDDING_BYTES
        for ahead in plan[self._plan_pos :]:
            if len(batch) >= self.config.encoder_batch:
                break
            if ahead in cache or ahead in batch:
                continue
            if cache.bytes + per_slice * len(batch) > cache.budget_bytes:
                break  # no room to keep it: encoded at its own visit instead
            batch.append(ahead)
        tensor = torch.cat([self.slice_tensor(k) for k in batch], dim=0) if len(batch) > 1 else self.slice_tensor(key)
        embeddings = self.encode(tensor)
        self._embedding_bytes = _nbytes(embeddings[:1])
        # Nothing is evicted on this path: an entry that does not fit is simply not kept, so every
        # encoded slice serves at least one visit and the fast path never encodes more than the
        # faithful one.  Slices due soonest (the look-ahead) take the room first.
        for row, ahead in enumerate(batch[1:], start=1):
            cache.put(ahead, embeddings[row : row + 1])
        own = embeddings if len(batch) == 1 else embeddings[:1].clone()  # never a view of the batch
        if not last_visit:
            cache.put(key, own)  # stores its own copy
        return own

    def segment_slice(self, z: int, prompt_box: np.ndarray) -> np.ndarray:
        embedding = self.encode_slice(z)
        low_res = self.decode(embedding, prompt_box)
        return self.to_mask(low_res, self._new_size, self._volume.shape[1:3])


def _slice_index(z: int, depth: int) -> Optional[int]:
    """The non-negative index slice z reads (numpy indexing), or None if it is out of range."""
    if -depth <= z < 0:
        return z + depth
    return z if 0 <= z < depth else None


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
