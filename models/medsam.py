"""MedSAM (SAM ViT-B fine-tuned on medical images) and its prompt encoder / mask decoder.

MedSAM keeps SAM's ``Sam`` layout: image encoder, prompt encoder, mask decoder registered in that
order, so ``state_dict()`` matches the released ``medsam_vit_b.pth`` key for key. Its prompt
encoder works in a 1024 px frame and its mask decoder keeps the default LayerNorm eps 1e-5.
"""

from __future__ import annotations

from .registry import register_model
from .sam import MaskDecoder, PromptEncoder, build_prompt_parts
from .segmenter_module import ModelInfo, PromptableSAM
from .vit import ViTImageEncoder

MEDSAM_INPUT_SIZE = 1024


def build_medsam_prompt_parts(prompt_size: int = MEDSAM_INPUT_SIZE) -> tuple[PromptEncoder, MaskDecoder]:
    """MedSAM's prompt encoder and mask decoder (6,220 + 4,058,340 parameters).

    Prompt frame ``prompt_size`` (MedSAM: 1024), embedding (256, 64, 64), decoder LayerNorm eps
    1e-5: :func:`models.sam.build_prompt_parts` with MedSAM's settings.
    """
    return build_prompt_parts(prompt_size, layer_norm_eps=1e-5)


@register_model("medsam")
def build_medsam_vit_b(prompt_size: int = MEDSAM_INPUT_SIZE) -> PromptableSAM:
    """MedSAM ViT-B (93,735,472 parameters) at 1024 px, in eval mode.

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
