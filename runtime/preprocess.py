"""Image, box and mask transforms of the box-prompt pipelines, in numpy and OpenCV (no torch; OpenCV only
for LiteMedSAM's INTER_AREA letterbox, imported when first used).

They compute what the harness engine's transforms compute (the preprocessing module of the ``models`` package), which reproduce
the upstream scripts (bowang-lab/MedSAM@LiteMedSAM ``CVPR24_LiteMedSAM_infer.py``; hieplpvip/medficientsam
``infer_scripts/infer_torch.py`` and ``src/infer.py``):

* LiteMedSAM: cv2 INTER_AREA letterbox on uint8 HWC, float64 min-max, zero pad, crop the 256 logits and
  resize them to the original size, ``sigmoid > 0.5``.
* medficientsam / MedSAM: torch's uint8 bilinear letterbox (no antialias, result stays uint8), float32
  min-max, zero pad, logits 256 -> S, crop, resize to the original size, ``> 0``.

Sizes and boxes follow the upstream arithmetic exactly (``int(x + 0.5)`` letterbox size,
``int(b * P / max(H, W))`` box truncation).  The uint8 bilinear resize is torch's CPU kernel
reproduced bit for bit (a horizontal then a vertical pass, each with integer weights and
round-half-up); the float logit resizes are torch's float bilinear (``align_corners=False``) in
numpy, equal to it up to the last float bit.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "letterbox_size",
    "ensure_rgb",
    "resize_area_u8",
    "resize_bilinear_u8",
    "minmax_scale_f64",
    "minmax_scale_f32",
    "pad_bottom_right",
    "preprocess_image",
    "scale_box",
    "mask_bbox",
    "letterbox_mask_bbox",
    "postprocess_logits",
    "logits_to_mask",
]


def letterbox_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """(new_h, new_w) after scaling the long side to ``size``: ``int(old * size / long + 0.5)``."""
    scale = size * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def ensure_rgb(image: np.ndarray) -> np.ndarray:
    """An (H, W, 3) array; a grey (H, W) or (H, W, 1) image is repeated on 3 channels."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 1:
        return np.repeat(image, 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 3:
        return image
    raise ValueError(f"expected a (H, W) or (H, W, 3) image, got shape {image.shape}")


def resize_area_u8(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """cv2 INTER_AREA resize (the LiteMedSAM letterbox); HxW or HxWxC arrays.  OpenCV is imported here, on
    first use: only the pipelines with ``resize="area"`` or the ``prev_mask_256_shift3`` box need it
    (:attr:`runtime.pipelines.Pipeline.needs_opencv`), and the slim images of the others leave it out."""
    import cv2

    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)


@lru_cache(maxsize=64)
def _bilinear_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Two-tap integer weights of torch's CPU uint8 bilinear (align_corners=False) along one axis.

    Source position ``max((i + 0.5) * in / out - 0.5, 0)``; weights ``1 - frac`` and ``frac``
    (summed when both taps are the last pixel), scaled by ``2**p`` and rounded, where ``p`` is the
    largest precision <= 22 that keeps the largest weight below ``2**15``.
    Returns (lo, hi, w_lo, w_hi, p).
    """
    scale = in_size / out_size
    src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    lo = np.floor(src).astype(np.int64)
    frac = src - lo
    hi = np.minimum(lo + 1, in_size - 1)
    w_lo = 1.0 - frac
    w_hi = frac.copy()
    same = hi == lo
    w_lo[same] += w_hi[same]
    w_hi[same] = 0.0
    largest = max(float(w_lo.max(initial=0.0)), float(w_hi.max(initial=0.0)))
    precision = 22
    while precision > 0 and largest * (1 << precision) >= (1 << 15):
        precision -= 1
    q_lo = np.round(w_lo * (1 << precision)).astype(np.int64)
    q_hi = np.round(w_hi * (1 << precision)).astype(np.int64)
    return lo, hi, q_lo, q_hi, precision


def _fixed_point_pass(x: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    lo, hi, w_lo, w_hi, precision = _bilinear_taps(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    y = np.take(x, lo, axis=axis) * w_lo.reshape(shape) + np.take(x, hi, axis=axis) * w_hi.reshape(shape)
    y += 1 << (precision - 1)
    y >>= precision
    return np.clip(y, 0, 255, out=y)


def resize_bilinear_u8(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """torch's CPU ``F.interpolate(uint8, mode="bilinear", align_corners=False)`` on (…, H, W) arrays.

    The medficientsam letterbox resizes the uint8 tensor itself: a horizontal pass, then a vertical
    pass, each in fixed point with round-half-up back to integers (about 20% of pixels differ by 1
    from rounding the float result).  As upstream, an axis whose size is unchanged is not resampled.
    """
    if image.dtype != np.uint8:
        raise TypeError(f"resize_bilinear_u8 expects uint8, got {image.dtype}")
    if tuple(image.shape[-2:]) == (new_h, new_w):
        return image
    x = image.astype(np.int64)
    if x.shape[-1] != new_w:
        x = _fixed_point_pass(x, new_w, x.ndim - 1)
    if x.shape[-2] != new_h:
        x = _fixed_point_pass(x, new_h, x.ndim - 2)
    return x.astype(np.uint8)


def minmax_scale_f64(image_u8: np.ndarray) -> np.ndarray:
    """LiteMedSAM: ``(x - min) / clip(max - min, 1e-8)`` over all channels, in float64."""
    lo = float(image_u8.min())
    span = max(float(image_u8.max()) - lo, 1e-8)
    return (image_u8.astype(np.float64) - lo) / span


def minmax_scale_f32(image: np.ndarray) -> np.ndarray:
    """medficientsam: min-max over the whole (C, H, W) array in float32."""
    image = image.astype(np.float32, copy=False)
    lo = image.min()
    span = np.float32(max(float(image.max() - lo), 1e-8))
    return (image - lo) / span


def pad_bottom_right(image: np.ndarray, size: int, channels_first: bool = False) -> np.ndarray:
    """Zero-pad to ``size`` x ``size`` at the bottom and right: (H, W[, C]), or (C, H, W) when
    ``channels_first``."""
    if channels_first:
        h, w = image.shape[-2:]
        return np.pad(image, ((0, 0),) * (image.ndim - 2) + ((0, size - h), (0, size - w)))
    h, w = image.shape[:2]
    return np.pad(image, ((0, size - h), (0, size - w)) + ((0, 0),) * (image.ndim - 2))


def preprocess_image(image_rgb: np.ndarray, size: int, resize: str) -> Tuple[np.ndarray, Tuple[int, int]]:
    """(H, W, 3) uint8 -> ((1, 3, size, size) float32 in [0, 1], (new_h, new_w)).

    ``"area"``: cv2 INTER_AREA on HWC uint8, float64 min-max, pad (LiteMedSAM).
    ``"bilinear_u8"``: torch's uint8 bilinear on CHW, float32 min-max, pad (medficientsam).
    """
    if image_rgb.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image_rgb.dtype}")
    h, w = image_rgb.shape[:2]
    new_h, new_w = letterbox_size(h, w, size)
    if resize == "area":
        small = resize_area_u8(image_rgb, new_h, new_w)
        padded = pad_bottom_right(minmax_scale_f64(small), size)
        return np.ascontiguousarray(padded.astype(np.float32).transpose(2, 0, 1)[None]), (new_h, new_w)
    if resize == "bilinear_u8":
        chw = np.ascontiguousarray(image_rgb.transpose(2, 0, 1))
        small = resize_bilinear_u8(chw, new_h, new_w)
        return np.ascontiguousarray(pad_bottom_right(minmax_scale_f32(small), size, channels_first=True)[None]), (new_h, new_w)
    raise ValueError(f"unknown resize mode {resize!r}")


def scale_box(box, original_size: Sequence[int], prompt_size: int) -> np.ndarray:
    """Box from original pixels into the prompt frame: ``int(b * prompt_size / max(H, W))``.

    As upstream the result keeps the input dtype and each coordinate is truncated toward zero; the
    product follows numpy's promotion (int -> float64, a float32 box in float32).
    """
    box = np.asarray(box)
    ratio = prompt_size / max(original_size)
    return np.trunc(box * ratio).astype(box.dtype)


def mask_bbox(mask: np.ndarray) -> Optional[np.ndarray]:
    """Tight [x_min, y_min, x_max, y_max] (int64) of ``mask > 0``, or None if it is empty."""
    rows = np.flatnonzero((mask > 0).any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero((mask > 0).any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.int64)


def letterbox_mask_bbox(mask: np.ndarray, size: int, shift: int = 3) -> Optional[np.ndarray]:
    """LiteMedSAM's 3D propagation box in the ``size`` letterbox frame.

    The previous slice's uint8 mask (holding the label value, which changes INTER_AREA's rounding)
    is letterboxed with INTER_AREA; if nothing survives, None.  Otherwise its bbox in the padded
    frame is grown by ``shift`` and clamped to [0, size] (upstream clamps to W/H, not W-1/H-1).
    """
    h, w = mask.shape[:2]
    new_h, new_w = letterbox_size(h, w, size)
    small = resize_area_u8(mask, new_h, new_w)
    if small.max() <= 0:
        return None
    x0, y0, x1, y1 = (int(v) for v in mask_bbox(small))  # padding adds zeros only: same bbox
    return np.array([max(0, x0 - shift), max(0, y0 - shift), min(size, x1 + shift), min(size, y1 + shift)],
                    dtype=np.int64)


@lru_cache(maxsize=64)
def _linear_taps(in_size: int, out_size: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Taps of torch's CPU float bilinear (align_corners=False) along one axis, as it computes them:
    ``scale = float32(in) / out``, source ``max(scale * (i + 0.5) - 0.5, 0)`` rounded once to float32
    (a fused multiply-add), ``l1 = src - floor(src)``, ``l0 = 1 - l1``, in float32."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    lo = src.astype(np.int64)
    l1 = (src - lo.astype(np.float32)).astype(np.float32)
    return lo, np.minimum(lo + 1, in_size - 1), (np.float32(1) - l1).astype(np.float32), l1


def _resize_linear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """``F.interpolate(x, (out_h, out_w), mode="bilinear", align_corners=False)`` on a float32 (H, W)
    array: the same taps and weights, equal up to the last float bit (OpenCV's bilinear computes its
    source positions in lower precision, off by up to 5e-4 on large images)."""
    if x.shape == (out_h, out_w):
        return x
    lo, hi, l0, l1 = _linear_taps(x.shape[1], out_w)
    rows = x[:, lo] * l0 + x[:, hi] * l1
    lo, hi, l0, l1 = _linear_taps(x.shape[0], out_h)
    return rows[lo] * l0[:, None] + rows[hi] * l1[:, None]


def postprocess_logits(low_res: np.ndarray, new_size: Tuple[int, int], original_size: Tuple[int, int],
                       mode: str) -> np.ndarray:
    """(h, w) float32 low-res logits -> (H, W) float32 logits at the original size.

    ``"crop_resize"`` (LiteMedSAM): crop to ``[:new_h, :new_w]`` and resize to the original size.
    ``"upsample_crop_resize"`` (medficientsam): resize to ``max(new_size)`` squared, crop, resize.
    All resizes bilinear with half-pixel centres (``align_corners=False``).
    """
    new_h, new_w = int(new_size[0]), int(new_size[1])
    out_h, out_w = int(original_size[0]), int(original_size[1])
    x = np.asarray(low_res, dtype=np.float32)
    if mode == "crop_resize":
        if max(new_h, new_w) != x.shape[-1]:
            raise ValueError("crop_resize needs the letterbox size to equal the low-res mask size")
        x = x[:new_h, :new_w]
    elif mode == "upsample_crop_resize":
        side = max(new_h, new_w)
        x = _resize_linear(x, side, side)[:new_h, :new_w]
    else:
        raise ValueError(f"unknown postprocess mode {mode!r}")
    return _resize_linear(np.ascontiguousarray(x), out_h, out_w)


# torch's float32 sigmoid rounds to exactly 0.5 for every logit up to this one (1.5 * 2**-24 less one ulp)
# and is above 0.5 from the next float32 on, so ``sigmoid(x) > 0.5`` is ``x > _SIGMOID_HALF``.
_SIGMOID_HALF = np.float32(8.940697e-08)


def logits_to_mask(logits: np.ndarray, threshold: str) -> np.ndarray:
    """Boolean mask: ``"sigmoid"`` is LiteMedSAM's float32 ``torch.sigmoid(x) > 0.5`` (evaluated literally,
    so positive logits below 9e-8, whose sigmoid rounds to 0.5, stay background); ``"logit"`` is ``x > 0``."""
    if threshold == "logit":
        return logits > 0
    if threshold == "sigmoid":
        return logits > _SIGMOID_HALF
    raise ValueError(f"unknown threshold mode {threshold!r}")
