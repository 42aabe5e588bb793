"""SAM prompt encoder and mask decoder (shared by MedSAM, LiteMedSAM and MedficientSAM)."""

from .common import MLP, LayerNorm2d, MLPBlock
from .mask_decoder import MaskDecoder
from .prompt_encoder import PositionEmbeddingRandom, PromptEncoder
from .transformer import Attention, TwoWayAttentionBlock, TwoWayTransformer

__all__ = [
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
