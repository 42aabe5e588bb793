"""Pipeline presets: what distinguishes the upstream box-prompt scripts, and the 3D z-plan.

The fields and presets are the harness engine's (``PipelineConfig`` in the ``models`` package), restricted to
what changes the masks; the runtime always runs the engine's fast path (each slice of a 3D case encoded
once, one box per decoder call), which gives the same masks as the upstream call pattern.

input_size      letterbox side fed to the image encoder (256 / 512 / 1024).
prompt_size     frame the boxes are scaled into: ``int(b * prompt_size / max(H, W))``.
resize          ``"area"``: cv2 INTER_AREA on uint8 HWC + float64 min-max (LiteMedSAM,
                bowang-lab/MedSAM@LiteMedSAM ``CVPR24_LiteMedSAM_infer.py``);
                ``"bilinear_u8"``: torch's uint8 bilinear resize + float32 min-max (medficientsam,
                hieplpvip/medficientsam ``infer_scripts/infer_torch.py``), reproduced in numpy.
postprocess     ``"crop_resize"``: crop the 256 logits then resize to (H, W) (LiteMedSAM);
                ``"upsample_crop_resize"``: 256 -> S, crop, resize to (H, W) (medficientsam).
threshold       ``"sigmoid"``: ``sigmoid > 0.5`` in float32 (LiteMedSAM); ``"logit"``: ``> 0``.
z_range         ``"inclusive"``: z_middle..z_max and z_middle-1..z_min, ends included (LiteMedSAM);
                ``"exclusive"``: z_middle..z_max-1 and z_middle-1..z_min (medficientsam).
z_middle        ``"lite"``: ``int((z_max - z_min) / 2 + z_min)``; ``"mfs"``: ``(z_min + z_max) // 2`` in float32.
propagate_box   ``"prev_mask_256_shift3"``: previous slice's label mask letterboxed with INTER_AREA,
                padded, bbox grown by ``propagate_shift`` and clamped to the input frame (LiteMedSAM);
                ``"prev_mask_tight"``: tight bbox of the previous slice's mask, rescaled like the input
                boxes (medficientsam).  An empty previous mask gives the slice box of the input.
clamp_z         clamp z_min/z_max to [0, D] before planning (medficientsam ``src/infer.py``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

__all__ = ["Pipeline", "PRESETS", "MODEL_PIPELINES", "z_plan", "slice_index"]

_CHOICES = {
    "resize": ("area", "bilinear_u8"),
    "postprocess": ("crop_resize", "upsample_crop_resize"),
    "threshold": ("sigmoid", "logit"),
    "z_range": ("inclusive", "exclusive"),
    "z_middle": ("lite", "mfs"),
    "propagate_box": ("prev_mask_256_shift3", "prev_mask_tight"),
}


@dataclass(frozen=True)
class Pipeline:
    """The mask-relevant options of one upstream pipeline (see the module docstring)."""

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

    def __post_init__(self) -> None:
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"pipeline {self.name}: {name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.propagate_box == "prev_mask_256_shift3" and self.prompt_size != self.input_size:
            raise ValueError(f"pipeline {self.name}: prev_mask_256_shift3 needs prompt_size == input_size")
        if self.postprocess == "crop_resize" and self.input_size != 256:
            raise ValueError(f"pipeline {self.name}: crop_resize crops the 256x256 logits; needs input_size == 256")

    @property
    def needs_opencv(self) -> bool:
        """Whether this pipeline resizes with OpenCV (INTER_AREA letterbox or propagated box)."""
        return self.resize == "area" or self.propagate_box == "prev_mask_256_shift3"

    def with_options(self, **changes) -> "Pipeline":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "pipeline") -> "Pipeline":
        """A pipeline from a mapping of its fields (unknown keys are an error naming ``source``)."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: a pipeline must be a JSON object of fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown pipeline field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def resolve(cls, text: str) -> "Pipeline":
        """A preset name, a built-in model name (``litemedsam``, ``l0``, ...) or a JSON file of fields."""
        if text in PRESETS:
            return PRESETS[text]
        if text in MODEL_PIPELINES:
            return PRESETS[MODEL_PIPELINES[text]]
        path = Path(text)
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise ValueError(f"{path}: cannot read the pipeline ({error})") from None
            return cls.from_dict(data.get("pipeline", data) if isinstance(data, dict) else data, str(path))
        raise ValueError(f"unknown pipeline {text!r}: expected a preset ({', '.join(PRESETS)}), a model "
                         f"({', '.join(MODEL_PIPELINES)}) or a JSON file of pipeline fields")


# bowang-lab/MedSAM@LiteMedSAM CVPR24_LiteMedSAM_infer.py
LITEMEDSAM_CVPR24 = Pipeline(name="litemedsam_cvpr24")
# hieplpvip/medficientsam infer_scripts/infer_torch.py (the Docker submission)
MEDFICIENTSAM_DOCKER = Pipeline(
    name="medficientsam_docker", input_size=512, prompt_size=512, resize="bilinear_u8",
    postprocess="upsample_crop_resize", threshold="logit", z_range="exclusive", z_middle="mfs",
    propagate_box="prev_mask_tight",
)
# hieplpvip/medficientsam src/infer.py (z clamped)
MEDFICIENTSAM_SRC_INFER = MEDFICIENTSAM_DOCKER.with_options(name="medficientsam_src_infer", clamp_z=True)
LITEMEDSAM_SRC_INFER = MEDFICIENTSAM_SRC_INFER.with_options(name="litemedsam_src_infer", input_size=256, prompt_size=256)
# MedSAM ViT-B as medficientsam's src/infer.py runs it (experiment=infer_medsam)
MEDSAM_MFS = MEDFICIENTSAM_SRC_INFER.with_options(name="medsam_mfs", input_size=1024, prompt_size=1024)
# A distilled medficientsam encoder with MedSAM's prompt encoder and mask decoder (prompt frame 1024)
MEDFICIENTSAM_DISTILLED = MEDFICIENTSAM_SRC_INFER.with_options(name="medficientsam_distilled_p1024", prompt_size=1024)
# ... or with LiteMedSAM's (prompt frame 256)
MEDFICIENTSAM_DISTILLED_LITE = MEDFICIENTSAM_SRC_INFER.with_options(name="medficientsam_distilled_p256", prompt_size=256)

PRESETS: Dict[str, Pipeline] = {
    p.name: p for p in (LITEMEDSAM_CVPR24, LITEMEDSAM_SRC_INFER, MEDFICIENTSAM_DOCKER, MEDFICIENTSAM_SRC_INFER,
                        MEDSAM_MFS, MEDFICIENTSAM_DISTILLED, MEDFICIENTSAM_DISTILLED_LITE)
}

# The preset each built-in segmenter of the harness runs.
MODEL_PIPELINES: Dict[str, str] = {
    "litemedsam": "litemedsam_cvpr24",
    "medsam": "medsam_mfs",
    "l0": "medficientsam_docker",
    "l1": "medficientsam_docker",
    "l2": "medficientsam_docker",
    "l0-distilled": "medficientsam_distilled_p1024",
    "l1-distilled": "medficientsam_distilled_p1024",
    "l2-distilled": "medficientsam_distilled_p1024",
}


def z_plan(z_min, z_max, depth: int, pipeline: Pipeline) -> Tuple[int, List[int], List[int]]:
    """(z_middle, upward slices, downward slices) for one 3D box, as the upstream loops run them.

    The upward list starts at z_middle (prompted with the given box); every later slice is prompted
    from its neighbour towards z_middle.  Indices are as upstream computes them (an unclamped
    ``"exclusive"`` plan can hold negative z, which index from the end, as numpy does).
    """
    if pipeline.clamp_z:
        z_min = max(z_min, 0)
        z_max = min(z_max, depth)
    if pipeline.z_middle == "lite":
        z_mid = int((z_max - z_min) / 2 + z_min)
    else:  # medficientsam keeps boxes as float32 tensors
        z_mid = float(np.floor_divide(np.float32(z_max) + np.float32(z_min), np.float32(2)))
    if pipeline.z_range == "inclusive":
        upward = list(range(int(z_mid), min(int(z_max) + 1, depth)))
        downward = list(range(int(z_mid) - 1, max(-1, int(z_min) - 1), -1))
    else:
        upward = list(range(int(z_mid), int(z_max)))
        downward = list(range(int(z_mid - 1), int(z_min - 1), -1))
    return int(z_mid), upward, downward


def slice_index(z: int, depth: int):
    """The non-negative index slice z reads (numpy indexing), or None if it is out of range."""
    if -depth <= z < 0:
        return z + depth
    return z if 0 <= z < depth else None
