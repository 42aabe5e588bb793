"""MedficientSAM L0/L1/L2 builders: EfficientViT-SAM encoder at 512 px + SAM prompt encoder/decoder.

The assembled models have the key layout of medficientsam's ``BaseSAM`` (parts registered as
image_encoder, mask_decoder, prompt_encoder), which is what its finetuned checkpoints and the
Docker submission (``infer_torch.py``) use: prompt frame 512, embedding (1, 256, 64, 64), low-res
masks (B, 1, 256, 256).

Upstream builds the whole EfficientViT-SAM and then sets every norm eps to 1e-6, which also
reaches the mask decoder's ``nn.LayerNorm`` s (1e-5 in MedSAM/LiteMedSAM). Both are set at
construction here.
"""

from __future__ import annotations

from .efficientvit import VARIANTS, EfficientViTSamEncoder
from .registry import register_model
from .sam import build_prompt_parts
from .segmenter_module import ModelInfo, PromptableSAM

INPUT_SIZE = 512
"""Side of the square [0, 1] image the EfficientViT-SAM encoders take."""


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


@register_model("l0")
def build_l0() -> PromptableSAM:
    """MedficientSAM-L0 (34,792,784 parameters), 512 px input, prompt frame 512."""
    return build_medficientsam("l0")


@register_model("l1")
def build_l1() -> PromptableSAM:
    """MedficientSAM-L1 (47,650,128 parameters), 512 px input, prompt frame 512."""
    return build_medficientsam("l1")


@register_model("l2")
def build_l2() -> PromptableSAM:
    """MedficientSAM-L2 (61,328,592 parameters), 512 px input, prompt frame 512."""
    return build_medficientsam("l2")
