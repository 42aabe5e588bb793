"""Training-time augmentation of an image and its label map (numpy + cv2 only).

The recipes follow the MedficientSAM training configs (hieplpvip/medficientsam, ``configs/data/``):

* ``"full"``: HorizontalFlip(p=0.5), VerticalFlip(p=0.5), ShiftScaleRotate(shift 0.0625,
  scale 0.2, rotate 90, constant-0 border, p=0.5): the fine-tuning "augmented" recipe.
* ``"flips"``: the two flips only: the fine-tuning "unaugmented" recipe and the distillation recipe.
* ``"none"``: identity.

Every random decision is drawn from the numpy ``Generator`` passed in, in a fixed order, so a
given generator state always gives the same result.  The image and the label map always receive
the same geometric transform: the image is interpolated bilinearly and the labels with nearest
neighbour, so no label value is ever invented.
"""
from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np

__all__ = ["MODES", "hflip", "vflip", "shift_scale_rotate", "shift_scale_rotate_matrix", "augment"]

MODES = ("full", "flips", "none")

# float32 holds every integer up to 2**24 exactly, so label maps are warped as float32 (cv2 has no
# 64-bit integer warp) and converted back without loss.
_MAX_EXACT_LABEL = 1 << 24


def hflip(image: np.ndarray, masks: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Mirror left-right (the column axis, axis 1). ``masks`` may be None."""
    out_masks = None if masks is None else np.ascontiguousarray(masks[:, ::-1])
    return np.ascontiguousarray(image[:, ::-1]), out_masks


def vflip(image: np.ndarray, masks: Optional[np.ndarray] = None) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Mirror top-bottom (the row axis, axis 0). ``masks`` may be None."""
    out_masks = None if masks is None else np.ascontiguousarray(masks[::-1])
    return np.ascontiguousarray(image[::-1]), out_masks


def shift_scale_rotate_matrix(
    height: int, width: int, angle: float, scale: float, dx: float, dy: float
) -> np.ndarray:
    """The 2x3 forward affine matrix (source pixel -> destination pixel).

    Rotation by ``angle`` degrees (counter-clockwise on screen, cv2's convention) and isotropic
    ``scale`` about the image centre, then a shift of ``dx * width`` and ``dy * height`` pixels.
    The centre is the pixel-centre midpoint ``((W - 1) / 2, (H - 1) / 2)`` (recent albumentations
    releases; older ones used ``(W / 2, H / 2)``, half a pixel off), so that a rotation by a
    multiple of 90 degrees of a square image maps pixels exactly onto pixels.
    """
    centre = ((width - 1) / 2.0, (height - 1) / 2.0)
    matrix = cv2.getRotationMatrix2D(centre, float(angle), float(scale))
    matrix[0, 2] += dx * width
    matrix[1, 2] += dy * height
    return matrix


def _warp_labels(masks: np.ndarray, matrix: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour warp of an integer (or bool) label map / mask stack, dtype preserved."""
    if masks.size and (masks.min() < -_MAX_EXACT_LABEL or masks.max() > _MAX_EXACT_LABEL):
        raise ValueError(f"label values beyond +-2**24 cannot be warped exactly (range {masks.min()}..{masks.max()})")
    as_float = masks.astype(np.float32)
    if as_float.ndim == 3 and as_float.shape[-1] > 4:
        # cv2 warps at most 4 channels at once; warp a (H, W, K) stack channel by channel.
        planes = [
            cv2.warpAffine(as_float[..., k], matrix, (width, height), flags=cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            for k in range(as_float.shape[-1])
        ]
        warped = np.stack(planes, axis=-1)
    else:
        warped = cv2.warpAffine(as_float, matrix, (width, height), flags=cv2.INTER_NEAREST,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if as_float.ndim == 3 and warped.ndim == 2:  # cv2 drops a trailing channel axis of size 1
            warped = warped[..., None]
    return warped.astype(masks.dtype)


def shift_scale_rotate(
    image: np.ndarray,
    masks: Optional[np.ndarray],
    rng: np.random.Generator,
    shift: float = 0.0625,
    scale: float = 0.2,
    rotate: float = 90,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Random affine transform with albumentations ShiftScaleRotate semantics.

    Parameters are drawn in this order: angle ~ U(-rotate, rotate) degrees, scale factor
    ~ 1 + U(-scale, scale), dx ~ U(-shift, shift) (fraction of the width), dy ~ U(-shift, shift)
    (fraction of the height).  The image (H, W) or (H, W, C) is warped bilinearly, ``masks`` (an
    (H, W) label map or an (H, W, K) stack; may be None) with nearest neighbour; both keep their
    shape and dtype and the area brought in from outside is 0.
    """
    angle = rng.uniform(-rotate, rotate)
    factor = 1.0 + rng.uniform(-scale, scale)
    dx = rng.uniform(-shift, shift)
    dy = rng.uniform(-shift, shift)
    height, width = image.shape[:2]
    matrix = shift_scale_rotate_matrix(height, width, angle, factor, dx, dy)
    out = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if image.ndim == 3 and out.ndim == 2:
        out = out[..., None]
    out_masks = None
    if masks is not None:
        if masks.shape[:2] != (height, width):
            raise ValueError(f"masks shape {masks.shape} does not match the image {image.shape}")
        out_masks = _warp_labels(masks, matrix, height, width)
    return out, out_masks


def augment(
    image: np.ndarray,
    labels: Optional[np.ndarray],
    rng: np.random.Generator,
    mode: str = "full",
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Augment an (H, W, 3) uint8 image and its (H, W) integer label map together.

    ``mode`` is ``"full"``, ``"flips"`` or ``"none"`` (see the module docstring).  ``labels`` may
    be None (distillation needs no labels); it is then returned as None.  Draw order: the
    horizontal-flip coin, the vertical-flip coin, then (``"full"`` only) the ShiftScaleRotate coin
    and, if it fires, its four parameters.  ``"none"`` draws nothing and returns the inputs as is.
    """
    if mode not in MODES:
        raise ValueError(f"unknown augmentation mode {mode!r}; expected one of {MODES}")
    if labels is not None and labels.shape[:2] != image.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} does not match the image {image.shape}")
    if mode == "none":
        return image, labels
    if rng.random() < 0.5:
        image, labels = hflip(image, labels)
    if rng.random() < 0.5:
        image, labels = vflip(image, labels)
    if mode == "full" and rng.random() < 0.5:
        image, labels = shift_scale_rotate(image, labels, rng)
    return image, labels
