"""MedSAM ViT-B (bowang-lab/MedSAM): SAM's ViT-B image encoder at 1024, prompt frame 1024.

Upstream reference reproduced: medficientsam ``src/infer.py`` with ``experiment=infer_medsam``
(commit 59504938): letterbox to 1024 with a bilinear resize of the uint8 image (no
antialiasing), per-image min-max, zero pad, integer box scaling, batched 2D decoding,
256 -> 1024 -> crop -> original-size postprocessing; 3D from the middle slice with z_max
exclusive, z clamped, and the tight propagated box. See ``models.inference.pipelines.MEDSAM_MFS``. (MedSAM's
own 2D script squashes the image to 1024x1024 instead; the challenge has no 3D MedSAM script.)

Weights: not bundled. ``--weights medsam=medsam_vit_b.pth`` (the released plain state_dict) or
``medsam_vit_b.pth`` in ``--weights-dir``; read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from harness import LoadOptions, Reported, SegmenterSpec, hookimpl
from harness.plugin_api import ENGINE_CHOICES


def load(options: LoadOptions):
    """Build MedSAM ViT-B, load the user's checkpoint and wrap it in the ``infer_medsam`` pipeline."""
    from models.weights.zoo import load_medsam

    return load_medsam(options)


@hookimpl
def harness_segmenters():
    return [
        SegmenterSpec(
            name="medsam",
            title="MedSAM",
            family="sam",
            load=load,
            resolution=1024,
            choices=ENGINE_CHOICES,
            reference="hieplpvip/medficientsam src/infer.py experiment=infer_medsam",
            description="SAM ViT-B fine-tuned on 1.5M medical image-mask pairs (Nature Communications 2024).",
            reported=Reported(
                source="medficientsam-reproduce README, tables 1 and 2 (CVPR 2024 validation set)",
                dsc=84.91,
                nsd=86.46,
                dsc_reproduced=84.91,
                nsd_reproduced=86.46,
                params_m=93.74,
                gflops=488.24,
            ),
        )
    ]
