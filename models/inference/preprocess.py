"""Per-model image / box / mask transforms for box-prompted SAM-style inference.

Everything here is a small pure function (numpy, torch or cv2) so that each upstream
pipeline can be assembled from the same parts by :mod:`models.inference.engine`.  The upstream
pipelines these functions reproduce (read in bowang-lab/MedSAM, branch LiteMedSAM, and hieplpvip/medficientsam):

* LiteMedSAM, ``CVPR24_LiteMedSAM_infer.py``: cv2 INTER_AREA letterbox on uint8 HWC,
  float64 min-max, zero pad, crop the 256 logits and resize to the original size,
  ``sigmoid > 0.5``.
* medficientsam, ``src/infer.py`` and ``infer_scripts/infer_torch.py``: torch bilinear
  letterbox on the uint8 NCHW tensor (no antialias, result stays uint8), float32 min-max,
  zero pad, logits 256 -> S, crop, resize to the original size, ``> 0``.

Sizes and boxes follow the upstream arithmetic exactly (``int(x + 0.5)`` letterbox size,
``int(b * P / max(H, W))`` box truncation).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "letterbox_size",
    "ensure_rgb",
    "resize_area_u8",
    "resize_bilinear_u8",
    "minmax_scale_numpy",
    "minmax_scale_torch",
    "pad_bottom_right",
    "preprocess_image",
    "scale_box",
    "mask_bbox",
    "letterbox_mask_bbox",
    "postprocess_logits",
    "logits_to_mask",
]


# --------------------------------------------------------------------------- sizes
def letterbox_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """(new_h, new_w) after scaling the long side to ``size``: ``int(old * size / long + 0.5)``."""
    scale = size * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


# --------------------------------------------------------------------------- channels
def ensure_rgb(image: np.ndarray) -> np.ndarray:
    """Return an (H, W, 3) array; a grey (H, W) or (H, W, 1) image is repeated on 3 channels."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 3:
        return image
    raise ValueError(f"expected a (H, W) or (H, W, 3) image, got shape {image.shape}")


# --------------------------------------------------------------------------- resize
def resize_area_u8(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """cv2 INTER_AREA resize (the LiteMedSAM letterbox); works on HxW or HxWxC arrays."""
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


def resize_bilinear_u8(image: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    """medficientsam letterbox: ``F.interpolate`` on the uint8 (N, C, H, W) tensor itself.

    bilinear, ``align_corners=False``, no antialias; the output stays uint8.  Upstream skips
    the call when the long side already has the target length, i.e. when the size is
    unchanged, and so do we.

    On CPU, torch computes uint8 bilinear with a separable fixed-point kernel: a horizontal
    pass and then a vertical pass, each with integer weights ``round(w * 2**p)`` and
    round-half-up back to uint8 in between (a numpy model in tests/test_inference_pipelines.py
    reproduces it bit for bit).  So this is neither floor nor round of the float result;
    about 20% of pixels differ by 1 from ``round(float bilinear)``.  We call the same torch
    op as upstream instead of re-deriving it.
    """
    if image.dtype != torch.uint8:
        raise TypeError(f"resize_bilinear_u8 expects a uint8 tensor, got {image.dtype}")
    if tuple(image.shape[-2:]) == (new_h, new_w):
        return image
    return F.interpolate(image, (new_h, new_w), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- intensity
def minmax_scale_numpy(image_u8: np.ndarray) -> np.ndarray:
    """LiteMedSAM: ``(x - min) / clip(max - min, 1e-8)`` over all channels, in float64."""
    lo = image_u8.min()
    span = np.clip(float(image_u8.max()) - float(lo), 1e-8, None)
    return (image_u8.astype(np.float64) - float(lo)) / span


def minmax_scale_torch(image: torch.Tensor) -> torch.Tensor:
    """medficientsam: min-max over the last three dims (C, H, W) of a float tensor, per sample.

    For uint8 inputs the float32 quotient equals the float64 one rounded to float32 (both
    are correctly rounded ratios of small integers), so the two variants agree exactly.
    """
    lo = image.amin(dim=(-3, -2, -1), keepdim=True)
    hi = image.amax(dim=(-3, -2, -1), keepdim=True)
    return (image - lo) / torch.clip(hi - lo, min=1e-8)


def pad_bottom_right(image, size: int):
    """Zero-pad to ``size`` x ``size`` at the bottom and right.

    numpy: (H, W) or (H, W, C);  torch: (…, H, W).
    """
    if isinstance(image, torch.Tensor):
        h, w = image.shape[-2:]
        return F.pad(image, (0, size - w, 0, size - h), value=0)
    h, w = image.shape[:2]
    pad = ((0, size - h), (0, size - w)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, pad)


def preprocess_image(image_rgb: np.ndarray, size: int, resize: str) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """(H, W, 3) uint8 -> ((1, 3, size, size) float32 in [0, 1], (new_h, new_w)).

    ``resize="area"``: LiteMedSAM (cv2 INTER_AREA on HWC uint8, numpy float64 min-max, pad).
    ``resize="bilinear_u8"``: medficientsam (torch bilinear on NCHW uint8, float32 min-max, pad).
    """
    if image_rgb.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image_rgb.dtype}")
    h, w = image_rgb.shape[:2]
    new_h, new_w = letterbox_size(h, w, size)
    if resize == "area":
        small = resize_area_u8(image_rgb, new_h, new_w)
        padded = pad_bottom_right(minmax_scale_numpy(small), size)
        tensor = torch.from_numpy(np.ascontiguousarray(padded)).float().permute(2, 0, 1).unsqueeze(0)
        return tensor.contiguous(), (new_h, new_w)
    if resize == "bilinear_u8":
        chw = torch.from_numpy(np.ascontiguousarray(np.transpose(image_rgb, (2, 0, 1)))).unsqueeze(0)
        small = resize_bilinear_u8(chw, new_h, new_w).to(torch.float32)
        return pad_bottom_right(minmax_scale_torch(small), size).contiguous(), (new_h, new_w)
    raise ValueError(f"unknown resize mode {resize!r}")


# --------------------------------------------------------------------------- boxes
def scale_box(box, original_size: Sequence[int], prompt_size: int) -> np.ndarray:
    """Box from original pixels into the prompt frame: ``int(b * prompt_size / max(H, W))``.

    As upstream (``new_box = np.zeros_like(box)``) the result keeps the input dtype, and each
    coordinate is truncated toward zero whatever that dtype is.  The product follows numpy's
    promotion rules (int -> float64; a float32 box is multiplied in float32).
    """
    box = np.asarray(box)
    ratio = prompt_size / max(original_size)
    return np.trunc(box * ratio).astype(box.dtype)


def mask_bbox(mask: np.ndarray) -> Optional[np.ndarray]:
    """Tight [x_min, y_min, x_max, y_max] (int64) of ``mask > 0``, or None if it is empty."""
    ys, xs = np.nonzero(mask > 0)
    if ys.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.int64)


def letterbox_mask_bbox(mask: np.ndarray, size: int, shift: int = 3) -> Optional[np.ndarray]:
    """LiteMedSAM's 3D propagation box, in the ``size`` letterbox frame.

    The previous slice's mask (uint8; LiteMedSAM stores the label value there, which matters
    because INTER_AREA rounds the averaged value) is letterboxed with INTER_AREA; if nothing
    survives, None.  Otherwise it is zero-padded to ``size`` and its bbox is grown by ``shift``
    on each side and clamped to [0, size] (upstream clamps to W/H, not W-1/H-1).
    """
    h, w = mask.shape[:2]
    new_h, new_w = letterbox_size(h, w, size)
    small = resize_area_u8(mask, new_h, new_w)
    if small.max() <= 0:
        return None
    box = mask_bbox(pad_bottom_right(small, size))
    x0, y0, x1, y1 = (int(v) for v in box)
    return np.array(
        [max(0, x0 - shift), max(0, y0 - shift), min(size, x1 + shift), min(size, y1 + shift)], dtype=np.int64
    )


# --------------------------------------------------------------------------- masks
def postprocess_logits(
    low_res: torch.Tensor,
    new_size: Tuple[int, int],
    original_size: Tuple[int, int],
    mode: str,
) -> torch.Tensor:
    """Low-res logits (B, C, h, w) -> logits at the original size (B, C, H, W).

    ``"crop_resize"`` (LiteMedSAM): crop the logits to ``[:new_h, :new_w]`` and resize to the
    original size; only valid when the logits are in the letterbox frame (input size 256).
    ``"upsample_crop_resize"`` (medficientsam ``BaseSAM.postprocess_masks``): resize to
    ``max(new_size)`` squared, crop, resize to the original size.
    All resizes are torch bilinear, ``align_corners=False``.
    """
    new_h, new_w = int(new_size[0]), int(new_size[1])
    out_size = (int(original_size[0]), int(original_size[1]))
    if mode == "crop_resize":
        if max(new_h, new_w) != low_res.shape[-1]:
            raise ValueError("crop_resize needs the letterbox size to equal the low-res mask size")
        x = low_res[..., :new_h, :new_w]
    elif mode == "upsample_crop_resize":
        side = max(new_h, new_w)
        x = F.interpolate(low_res, (side, side), mode="bilinear", align_corners=False)
        x = x[..., :new_h, :new_w]
    else:
        raise ValueError(f"unknown postprocess mode {mode!r}")
    return F.interpolate(x, out_size, mode="bilinear", align_corners=False)


def logits_to_mask(logits: torch.Tensor, threshold: str) -> torch.Tensor:
    """Boolean mask: ``"sigmoid"`` is LiteMedSAM's ``sigmoid(x) > 0.5`` (evaluated literally, so
    logits in (0, ~3e-8] that round to sigmoid == 0.5 stay background); ``"logit"`` is ``x > 0``."""
    if threshold == "sigmoid":
        return torch.sigmoid(logits) > 0.5
    if threshold == "logit":
        return logits > 0
    raise ValueError(f"unknown threshold mode {threshold!r}")
