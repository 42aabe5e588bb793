"""The built-in models, by name: one builder each and the literal registry :data:`MODELS`.

As segment-anything's ``build_sam.py`` does, every builder assembles a network from the parts in
:mod:`models.nets` with the settings of the released checkpoints (random weights, eval mode), and
:data:`MODELS` maps each name to its builder. Weights are loaded afterwards
(:mod:`models.weights`); the pipeline a model runs in is chosen by its plugin (:mod:`plugins`) from
:mod:`models.inference.pipelines`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from models.nets.efficientvit import VARIANTS, EfficientViTSamEncoder
from models.nets.promptable_sam import ModelInfo, PromptableSAM
from models.nets.sam import MaskDecoder, PromptEncoder, build_prompt_parts
from models.nets.tiny_vit import TinyViT
from models.nets.vit import ViTImageEncoder

Builder = Callable[[], nn.Module]

MEDSAM_INPUT_SIZE = 1024
"""Side of the square [0, 1] image MedSAM's ViT-B encoder takes."""

INPUT_SIZE = 512
"""Side of the square [0, 1] image the EfficientViT-SAM encoders (MedficientSAM) take."""


# --------------------------------------------------------------------------- LiteMedSAM
def build_litemedsam() -> PromptableSAM:
    """LiteMedSAM (9,791,300 parameters): TinyViT at 256 px, SAM prompt encoder and decoder.

    Prompt frame 256, embedding (1, 256, 64, 64), low-res masks (B, 1, 256, 256). The
    state_dict keys, shapes and order are those of the released ``lite_medsam.pth``.
    """
    image_encoder = TinyViT(
        img_size=256,
        in_chans=3,
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
        mlp_ratio=4.0,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        out_chans=256,
    )
    prompt_encoder, mask_decoder = build_prompt_parts(prompt_size=256, layer_norm_eps=1e-5)
    model = PromptableSAM(
        image_encoder,
        prompt_encoder,
        mask_decoder,
        info=ModelInfo(name="litemedsam", input_size=256, prompt_size=256),
        part_order=("image_encoder", "mask_decoder", "prompt_encoder"),
    )
    return model.eval()


# --------------------------------------------------------------------------- MedSAM
def build_medsam_prompt_parts(prompt_size: int = MEDSAM_INPUT_SIZE) -> tuple[PromptEncoder, MaskDecoder]:
    """MedSAM's prompt encoder and mask decoder (6,220 + 4,058,340 parameters).

    Prompt frame ``prompt_size`` (MedSAM: 1024), embedding (256, 64, 64), decoder LayerNorm eps
    1e-5: :func:`models.nets.sam.build_prompt_parts` with MedSAM's settings.
    """
    return build_prompt_parts(prompt_size, layer_norm_eps=1e-5)


def build_medsam_vit_b(prompt_size: int = MEDSAM_INPUT_SIZE) -> PromptableSAM:
    """MedSAM ViT-B (93,735,472 parameters) at 1024 px, in eval mode.

    MedSAM keeps SAM's ``Sam`` layout: image encoder, prompt encoder, mask decoder registered in
    that order, so ``state_dict()`` matches the released ``medsam_vit_b.pth`` key for key.
    Embedding (1, 256, 64, 64), low-res masks (B, 1, 256, 256). ``prompt_size`` is the frame the
    boxes are given in (MedSAM: 1024).
    """
    prompt_encoder, mask_decoder = build_medsam_prompt_parts(prompt_size)
    model = PromptableSAM(
        ViTImageEncoder(
            img_size=MEDSAM_INPUT_SIZE,
            patch_size=16,
            embed_dim=768,
            depth=12,
            num_heads=12,
            mlp_ratio=4.0,
            out_chans=256,
            window_size=14,
            global_attn_indexes=(2, 5, 8, 11),
            qkv_bias=True,
            use_rel_pos=True,
        ),
        prompt_encoder,
        mask_decoder,
        info=ModelInfo(name="medsam", input_size=MEDSAM_INPUT_SIZE, prompt_size=prompt_size),
    )
    return model.eval()


# --------------------------------------------------------------------------- MedficientSAM
def build_efficientvit_encoder(variant: str) -> EfficientViTSamEncoder:
    """The EfficientViT-SAM image encoder of ``variant`` ("l0", "l1", "l2"), random weights.

    (B, 3, 512, 512) in [0, 1] -> (B, 256, 64, 64). Its state_dict keys are those of the
    ``image_encoder.`` part of a MedficientSAM checkpoint, without that prefix.

    Raises:
        ValueError: for an unknown variant; the message lists the known ones.
    """
    try:
        config = VARIANTS[variant]
    except KeyError:
        known = ", ".join(sorted(VARIANTS))
        raise ValueError(f"unknown EfficientViT-SAM variant {variant!r}; known: {known}") from None
    return EfficientViTSamEncoder(config)


def build_medficientsam(
    variant: str, prompt_size: int = 512, decoder_ln_eps: float = 1e-6
) -> PromptableSAM:
    """MedficientSAM ``variant`` ("l0", "l1", "l2") with random weights, in eval mode.

    The assembled model has the key layout of medficientsam's ``BaseSAM`` (parts registered as
    image_encoder, mask_decoder, prompt_encoder), which its finetuned checkpoints and the Docker
    submission (``infer_torch.py``) use. Upstream builds the whole EfficientViT-SAM and then sets
    every norm eps to 1e-6, which also reaches the mask decoder's ``nn.LayerNorm`` s (1e-5 in
    MedSAM/LiteMedSAM); both are set at construction here.

    Args:
        variant: encoder variant.
        prompt_size: side of the box prompt frame. 512 for the finetuned/exported models; the
            distilled-encoder configs pair the encoder with MedSAM's prompt encoder at 1024.
        decoder_ln_eps: eps of the two-way transformer's LayerNorms (1e-6 upstream for l0-l2).

    Raises:
        ValueError: for an unknown variant.
    """
    image_encoder = build_efficientvit_encoder(variant)
    prompt_encoder, mask_decoder = build_prompt_parts(prompt_size, layer_norm_eps=decoder_ln_eps)
    model = PromptableSAM(
        image_encoder,
        prompt_encoder,
        mask_decoder,
        info=ModelInfo(name=variant, input_size=INPUT_SIZE, prompt_size=prompt_size),
        part_order=("image_encoder", "mask_decoder", "prompt_encoder"),
    )
    return model.eval()


def build_l0() -> PromptableSAM:
    """MedficientSAM-L0 (34,792,784 parameters), 512 px input, prompt frame 512."""
    return build_medficientsam("l0")


def build_l1() -> PromptableSAM:
    """MedficientSAM-L1 (47,650,128 parameters), 512 px input, prompt frame 512."""
    return build_medficientsam("l1")


def build_l2() -> PromptableSAM:
    """MedficientSAM-L2 (61,328,592 parameters), 512 px input, prompt frame 512."""
    return build_medficientsam("l2")


# --------------------------------------------------------------------------- the registry
MODELS: dict[str, Builder] = {
    "litemedsam": build_litemedsam,
    "medsam": build_medsam_vit_b,
    "l0": build_l0,
    "l1": build_l1,
    "l2": build_l2,
}
"""Every built-in model: name -> zero-argument builder (random weights, eval mode)."""


def list_models() -> list[str]:
    """Sorted names of all built-in models."""
    return sorted(MODELS)


def build_model(name: str) -> nn.Module:
    """Build the model ``name`` of :data:`MODELS` with random weights, in eval mode.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    try:
        builder = MODELS[name]
    except KeyError:
        known = ", ".join(list_models())
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None
    return builder()
