"""Pipeline presets: :class:`PipelineConfig`, the options in which the upstream box-prompt pipelines
differ, one named preset per upstream script, and :func:`z_plan`, the slices a 3D box visits.

Every difference between the upstream pipelines is a config field; the engine
(:mod:`models.inference.engine`) runs any of them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Tuple

import numpy as np

__all__ = [
    "PipelineConfig",
    "EXECUTION_PATHS",
    "LITEMEDSAM_CVPR24",
    "LITEMEDSAM_SRC_INFER",
    "MEDFICIENTSAM_DOCKER",
    "MEDFICIENTSAM_SRC_INFER",
    "MEDSAM_MFS",
    "PRESETS",
    "z_plan",
]


@dataclass(frozen=True)
class PipelineConfig:
    """Options that distinguish the upstream box-prompt pipelines, and the execution path.

    input_size      letterbox side fed to the image encoder (256 / 512 / 1024).
    prompt_size     frame the boxes are scaled into: ``int(b * prompt_size / max(H, W))``.
    resize          ``"area"``: cv2 INTER_AREA on uint8 HWC + float64 min-max (LiteMedSAM);
                    ``"bilinear_u8"``: torch bilinear on the uint8 tensor + float32 min-max
                    (medficientsam).
    postprocess     ``"crop_resize"``: crop the 256 logits then resize to (H, W) (LiteMedSAM);
                    ``"upsample_crop_resize"``: 256 -> S, crop, resize to (H, W) (medficientsam).
    threshold       ``"sigmoid"``: ``sigmoid > 0.5`` (LiteMedSAM); ``"logit"``: ``> 0``.
    z_range         ``"inclusive"``: slices z_middle..z_max and z_middle-1..z_min, both ends
                    included and clipped to the volume (LiteMedSAM);
                    ``"exclusive"``: z_middle..z_max-1 and z_middle-1..z_min (medficientsam).
    z_middle        ``"lite"``: ``int((z_max - z_min) / 2 + z_min)``;
                    ``"mfs"``: ``(z_min + z_max) // 2`` on float32 values.
    propagate_box   ``"prev_mask_256_shift3"``: previous slice's label mask letterboxed with
                    INTER_AREA, padded, bbox grown by ``propagate_shift`` and clamped to the
                    input frame (LiteMedSAM); ``"prev_mask_tight"``: tight bbox of the previous
                    slice's mask at original resolution, rescaled like the input boxes
                    (medficientsam).  Empty previous mask -> the slice box given as input.
    propagate_shift bbox growth for ``prev_mask_256_shift3`` (upstream: 3).
    clamp_z         clamp z_min/z_max to [0, D] before planning (medficientsam src/infer.py).
                    Without it an ``"exclusive"`` plan indexes exactly as upstream does
                    (negative z wraps, z >= D raises IndexError).
    batch_boxes_2d  decode all 2D boxes in one decoder call (src/infer.py) instead of one
                    call per box (the challenge/Docker scripts).
    fast            the fast execution path (False = the faithful path, the upstream call
                    pattern): same pipeline semantics, fewer and larger model calls.  3D: every
                    slice the boxes' z-plans visit is encoded once into a per-case cache
                    (:class:`~models.inference.slice_cache.SliceCache`, within ``cache_mb``; a
                    slice that finds no room is encoded again at its next visit, never more often
                    than on the faithful path).  2D: the boxes of an image in decoder calls of
                    ``decoder_batch`` boxes.  Batched calls can differ from one-at-a-time calls in
                    the last float bits; the masks agree within the reference bars.
    encoder_batch   most slices per encoder call on the fast path (default 1: fastest on CPU).
    decoder_batch   most 2D boxes per decoder call on the fast path (default 1: fastest on CPU).
    fold_batchnorm  on the fast path, fold each BatchNorm that follows a conv into the conv
                    (:func:`models.export.optimize.fold_batchnorm`, done by the segmenter that
                    owns the model, after loading its weights).
    channels_last   on the fast path, keep the model's 4D weights channels-last
                    (:func:`models.export.optimize.to_channels_last`).
    cache_mb        byte budget of the fast path's slice-embedding cache (MiB).

    Measurements behind the defaults: docs/performance-notes.md.
    """

    name: str = "custom"
    input_size: int = 256
    prompt_size: int = 256
    resize: str = "area"
    postprocess: str = "crop_resize"
    threshold: str = "sigmoid"
    z_range: str = "inclusive"
    z_middle: str = "lite"
    propagate_box: str = "prev_mask_256_shift3"
    propagate_shift: int = 3
    clamp_z: bool = False
    batch_boxes_2d: bool = False
    fast: bool = False
    encoder_batch: int = 1
    decoder_batch: int = 1
    cache_mb: float = 1024.0
    fold_batchnorm: bool = True
    channels_last: bool = False

    def __post_init__(self) -> None:
        choices = {
            "resize": ("area", "bilinear_u8"),
            "postprocess": ("crop_resize", "upsample_crop_resize"),
            "threshold": ("sigmoid", "logit"),
            "z_range": ("inclusive", "exclusive"),
            "z_middle": ("lite", "mfs"),
            "propagate_box": ("prev_mask_256_shift3", "prev_mask_tight"),
        }
        for field_name, allowed in choices.items():
            if getattr(self, field_name) not in allowed:
                raise ValueError(f"{field_name}={getattr(self, field_name)!r}; expected one of {allowed}")
        if self.propagate_box == "prev_mask_256_shift3" and self.prompt_size != self.input_size:
            raise ValueError("prev_mask_256_shift3 builds boxes in the input frame; needs prompt_size == input_size")
        if self.postprocess == "crop_resize" and self.input_size != 256:
            raise ValueError("crop_resize crops the 256x256 logits; needs input_size == 256")
        if int(self.encoder_batch) < 1:
            raise ValueError(f"encoder_batch must be >= 1, got {self.encoder_batch}")
        if int(self.decoder_batch) < 1:
            raise ValueError(f"decoder_batch must be >= 1, got {self.decoder_batch}")
        if self.cache_mb < 0:
            raise ValueError(f"cache_mb must be >= 0, got {self.cache_mb}")

    def with_options(self, **changes) -> "PipelineConfig":
        return replace(self, **changes)

    @property
    def path(self) -> str:
        """The execution path: ``"fast"`` or ``"faithful"``."""
        return "fast" if self.fast else "faithful"

    def fast_variant(self, **changes) -> "PipelineConfig":
        """This pipeline on the fast execution path (same semantics, batched and cached calls)."""
        return replace(self, fast=True, **changes)

    def faithful_variant(self) -> "PipelineConfig":
        """This pipeline on the faithful execution path (the upstream call pattern)."""
        return replace(self, fast=False)

    def for_path(self, path: str) -> "PipelineConfig":
        """``fast_variant()`` or ``faithful_variant()`` by name (one of :data:`EXECUTION_PATHS`)."""
        if path not in EXECUTION_PATHS:
            raise ValueError(f"execution path {path!r}; expected one of {EXECUTION_PATHS}")
        return self.fast_variant() if path == "fast" else self.faithful_variant()

    def boxes_per_decoder_call(self, n_boxes: int) -> int:
        """2D boxes per decoder call: ``decoder_batch`` on the fast path; on the faithful path all of
        them with ``batch_boxes_2d`` (src/infer.py), else one (the challenge/Docker scripts)."""
        if self.fast:
            return int(self.decoder_batch)
        return max(1, n_boxes) if self.batch_boxes_2d else 1


EXECUTION_PATHS = ("faithful", "fast")


# LiteMedSAM challenge baseline: bowang-lab/MedSAM@LiteMedSAM CVPR24_LiteMedSAM_infer.py.
LITEMEDSAM_CVPR24 = PipelineConfig(
    name="litemedsam_cvpr24",
    input_size=256,
    prompt_size=256,
    resize="area",
    postprocess="crop_resize",
    threshold="sigmoid",
    z_range="inclusive",
    z_middle="lite",
    propagate_box="prev_mask_256_shift3",
    clamp_z=False,
    batch_boxes_2d=False,
)

# medficientsam Docker submission: infer_scripts/infer_torch.py (512 / prompt 512, per-box 2D decode,
# no z clamp).
MEDFICIENTSAM_DOCKER = PipelineConfig(
    name="medficientsam_docker",
    input_size=512,
    prompt_size=512,
    resize="bilinear_u8",
    postprocess="upsample_crop_resize",
    threshold="logit",
    z_range="exclusive",
    z_middle="mfs",
    propagate_box="prev_mask_tight",
    clamp_z=False,
    batch_boxes_2d=False,
)

# medficientsam src/infer.py with experiment=infer_finetuned_l{0,1,2} (512 / prompt 512, batched 2D,
# z clamped).
MEDFICIENTSAM_SRC_INFER = MEDFICIENTSAM_DOCKER.with_options(
    name="medficientsam_src_infer", clamp_z=True, batch_boxes_2d=True
)

# medficientsam src/infer.py + MedSAMInferDataset with experiment=infer_lite_medsam (256 / prompt 256).
LITEMEDSAM_SRC_INFER = MEDFICIENTSAM_SRC_INFER.with_options(
    name="litemedsam_src_infer", input_size=256, prompt_size=256
)

# MedSAM ViT-B as medficientsam runs it: src/infer.py with experiment=infer_medsam (letterbox 1024,
# prompt 1024).  Not MedSAM's own squash-resize MedSAM_Inference.py.
MEDSAM_MFS = MEDFICIENTSAM_SRC_INFER.with_options(name="medsam_mfs", input_size=1024, prompt_size=1024)

PRESETS: Dict[str, PipelineConfig] = {
    c.name: c
    for c in (LITEMEDSAM_CVPR24, LITEMEDSAM_SRC_INFER, MEDFICIENTSAM_DOCKER, MEDFICIENTSAM_SRC_INFER, MEDSAM_MFS)
}


def z_plan(z_min, z_max, depth: int, config: PipelineConfig) -> Tuple[int, List[int], List[int]]:
    """(z_middle, upward slices, downward slices) for one 3D box, as the upstream loops run them.

    The upward list starts at z_middle (prompted with the given box); every later slice is
    prompted from its neighbour towards z_middle.  Indices are returned as upstream computes
    them (an unclamped ``"exclusive"`` plan can contain negative z, which index from the end).
    """
    if config.clamp_z:
        z_min = max(z_min, 0)
        z_max = min(z_max, depth)
    if config.z_middle == "lite":
        z_mid = int((z_max - z_min) / 2 + z_min)
    else:  # medficientsam keeps boxes as float32 tensors
        z_mid = float(np.floor_divide(np.float32(z_max) + np.float32(z_min), np.float32(2)))
    if config.z_range == "inclusive":
        upward = list(range(int(z_mid), min(int(z_max) + 1, depth)))
        downward = list(range(int(z_mid) - 1, max(-1, int(z_min) - 1), -1))
    else:
        upward = list(range(int(z_mid), int(z_max)))
        downward = list(range(int(z_mid - 1), int(z_min - 1), -1))
    return int(z_mid), upward, downward
