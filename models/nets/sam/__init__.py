"""SAM prompt encoder and mask decoder (shared by MedSAM, LiteMedSAM and MedficientSAM)."""

from .common import MLP, LayerNorm2d, MLPBlock
from .mask_decoder import MaskDecoder
from .prompt_encoder import PositionEmbeddingRandom, PromptEncoder
from .transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

__all__ = [
    "build_prompt_parts",
    "Attention",
    "LayerNorm2d",
    "MLP",
    "MLPBlock",
    "MaskDecoder",
    "PositionEmbeddingRandom",
    "PromptEncoder",
    "TwoWayAttentionBlock",
    "TwoWayTransformer",
]


def build_prompt_parts(prompt_size: int, layer_norm_eps: float = 1e-5) -> tuple[PromptEncoder, MaskDecoder]:
    """SAM's prompt encoder and single-scale mask decoder as every model here configures them.

    Embedding 256 x 64 x 64, mask-input channels 16, a two-way transformer of depth 2 (8 heads,
    MLP 2048), 3 multimask outputs and a 3-layer IoU head (6,220 + 4,058,340 parameters). Only two
    things differ between the models: the prompt frame ``prompt_size`` (LiteMedSAM 256,
    MedficientSAM 512, MedSAM 1024) and the eps of the transformer's LayerNorms (1e-5 in SAM,
    MedSAM and LiteMedSAM; 1e-6 in MedficientSAM L0-L2, whose builder sets every norm's eps).
    """
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(64, 64),
        input_image_size=(prompt_size, prompt_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        transformer_dim=256,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048,
                                      layer_norm_eps=layer_norm_eps),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder
