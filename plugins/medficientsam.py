"""MedficientSAM-L0/L1/L2 (hieplpvip/medficientsam): EfficientViT-SAM encoders at 512 distilled
from MedSAM, then fine-tuned; prompt frame 512.

Segmenters:

* ``l0``, ``l1``, ``l2``: fine-tuned models, run as the medficientsam Docker submission script
  ``infer_scripts/infer_torch.py`` (commit 59504938) runs them: letterbox to 512 with a bilinear
  resize of the uint8 image (no antialiasing), min-max, zero pad, integer box scaling, one box
  per decoder call, 256 -> 512 -> crop -> original-size postprocessing; 3D from the middle slice
  with z_max exclusive and the tight previous-slice box at original resolution. See
  ``models.inference.pipelines.MEDFICIENTSAM_DOCKER``.
* ``l0-distilled``, ``l1-distilled``, ``l2-distilled``: the distilled student encoder completed
  with MedSAM's prompt encoder and mask decoder (prompt frame 1024), run as ``src/infer.py`` with
  the ``infer_distilled_*`` configs (the "Distillation" column of the seed tables). They need
  ``--weights medsam=PATH`` as well.

Weights are not bundled: ``--weights l0=PATH`` or ``--weights-dir``, accepting plain state_dicts,
medficientsam Lightning checkpoints (``model.*`` fine-tuned, ``student_encoder.*`` distilled) and
medsam-harness weights files; all read with ``torch.load(weights_only=True)``. The exported pickled
``model.pth`` is refused unless ``--allow-pickle`` (see ``models.weights.checkpoints``).
"""
from __future__ import annotations

from functools import partial

from harness import LoadOptions, Reported, SegmenterSpec, hookimpl
from harness.plugin_api import ENGINE_CHOICES

_SOURCE = "medficientsam README; medficientsam-reproduce README tables 1 and 2 (CVPR 2024 validation set)"
_HARDWARE = "Intel Core i9-10900K"

# Published figures (hieplpvip/medficientsam README.md; RicoLeehdu/medficientsam-reproduce README.md).
# "reproduced" = the reproduction README's -R columns.
_REPORTED = {
    "l0": dict(dsc=85.85, nsd=87.05, dsc_reproduced=84.93, nsd_reproduced=86.76, params_m=34.79, gflops=36.80,
               runtime_2d_s=0.9, runtime_3d_s=7.4, memory_2d_mb=448, memory_3d_mb=687),
    "l1": dict(dsc=86.42, nsd=87.95, dsc_reproduced=85.16, nsd_reproduced=86.68, params_m=47.65, gflops=51.05,
               runtime_2d_s=1.0, runtime_3d_s=9.0, memory_2d_mb=553, memory_3d_mb=793),
    "l2": dict(dsc=86.08, nsd=87.53, dsc_reproduced=85.07, nsd_reproduced=86.63, params_m=61.33, gflops=70.71,
               runtime_2d_s=1.1, runtime_3d_s=11.1, memory_2d_mb=663, memory_3d_mb=903),
}
# Reproduction README table 2, per modality (DSC, NSD), for MedficientSAM-L1 and the distilled model.
_L1_MODALITIES = {
    "CT": (92.15, 94.80), "MR": (86.98, 90.77), "PET": (73.00, 58.03), "US": (82.50, 87.24),
    "X-Ray": (80.47, 86.23), "Dermoscopy": (94.16, 95.54), "Endoscopy": (96.10, 98.37),
    "Fundus": (94.32, 96.05), "Microscopy": (78.09, 84.47),
}
_L1_MODALITIES_R = {
    "CT": (93.19, 95.78), "MR": (89.51, 92.99), "PET": (66.97, 52.52), "US": (81.39, 86.09),
    "X-Ray": (75.78, 80.88), "Dermoscopy": (93.17, 94.62), "Endoscopy": (94.62, 97.26),
    "Fundus": (94.16, 95.90), "Microscopy": (77.67, 84.11),
}
_DISTILLED_MODALITIES = {
    "CT": (91.13, 93.75), "MR": (85.73, 89.75), "PET": (70.49, 54.52), "US": (84.43, 89.29),
    "X-Ray": (78.92, 84.64), "Dermoscopy": (92.84, 94.16), "Endoscopy": (96.88, 98.81),
    "Fundus": (94.10, 95.83), "Microscopy": (75.63, 82.15),
}
_DISTILLED_MODALITIES_R = {
    "CT": (92.15, 94.74), "MR": (87.87, 91.40), "PET": (68.30, 50.17), "US": (84.52, 89.37),
    "X-Ray": (75.40, 80.38), "Dermoscopy": (92.54, 93.88), "Endoscopy": (95.92, 98.16),
    "Fundus": (93.85, 95.54), "Microscopy": (75.90, 82.45),
}


def load(variant: str, distilled_only: bool, options: LoadOptions):
    """Build the variant, read the user's checkpoint and wrap it in its faithful pipeline."""
    from models.weights.zoo import load_medficientsam

    return load_medficientsam(variant, options, distilled_only=distilled_only)


def _reported(variant: str) -> Reported:
    extra = {}
    if variant == "l1":
        extra = dict(per_modality=_L1_MODALITIES, per_modality_reproduced=_L1_MODALITIES_R)
    return Reported(source=_SOURCE, hardware=_HARDWARE, **_REPORTED[variant], **extra)


@hookimpl
def harness_segmenters():
    specs = []
    for variant in ("l0", "l1", "l2"):
        title = f"MedficientSAM-{variant.upper()}"
        specs.append(SegmenterSpec(
            name=variant,
            title=title,
            family="efficientvit-sam",
            load=partial(load, variant, False),
            resolution=512,
            choices=ENGINE_CHOICES,
            reference="hieplpvip/medficientsam infer_scripts/infer_torch.py (Docker submission)",
            description=f"EfficientViT-SAM-{variant.upper()} distilled from MedSAM and fine-tuned on the challenge data.",
            reported=_reported(variant),
        ))
    for variant in ("l0", "l1", "l2"):
        reported = None
        if variant == "l1":
            reported = Reported(
                source="medficientsam-reproduce README table 2, Distillation / Distillation-R columns (the variant is not stated; shown with L1, the model of its other columns)",
                dsc=85.57, nsd=86.99, dsc_reproduced=85.16, nsd_reproduced=86.23,
                per_modality=_DISTILLED_MODALITIES, per_modality_reproduced=_DISTILLED_MODALITIES_R,
            )
        specs.append(SegmenterSpec(
            name=f"{variant}-distilled",
            title=f"MedficientSAM-{variant.upper()} (distilled)",
            family="efficientvit-sam",
            load=partial(load, variant, True),
            resolution=512,
            choices=ENGINE_CHOICES,
            reference="hieplpvip/medficientsam src/infer.py experiment=infer_distilled_" + variant,
            description="The distilled student encoder with MedSAM's prompt encoder and mask decoder (prompt frame 1024).",
            reported=reported,
        ))
    return specs
