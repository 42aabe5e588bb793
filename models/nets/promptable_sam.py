"""A thin container for SAM-style box-promptable segmenters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .sam.mask_decoder import MaskDecoder
from .sam.prompt_encoder import PromptEncoder

_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about a built model.

    Attributes:
        name: registry name.
        input_size: side of the square [0, 1] image the encoder takes.
        prompt_size: side of the square frame that box coordinates are given in.
    """

    name: str
    input_size: int
    prompt_size: int


class PromptableSAM(nn.Module):
    """Image encoder + SAM prompt encoder + SAM mask decoder, without pre/post-processing.

    No pixel mean/std buffers: every pipeline here feeds the encoder a min-max scaled [0, 1]
    image directly.

    Args:
        image_encoder: maps (B, 3, S, S) to an embedding (B, 256, 64, 64).
        prompt_encoder: the SAM prompt encoder.
        mask_decoder: the SAM mask decoder.
        info: static facts (input size, prompt frame).
        part_order: order in which the three parts are registered, which fixes the key order of
            ``state_dict()``. Upstream ``Sam`` uses the default; LiteMedSAM/MedficientSAM
            ``BaseSAM`` use ("image_encoder", "mask_decoder", "prompt_encoder").
    """

    image_encoder: nn.Module
    prompt_encoder: PromptEncoder
    mask_decoder: MaskDecoder

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        info: ModelInfo,
        part_order: Sequence[str] = _PARTS,
    ) -> None:
        super().__init__()
        if sorted(part_order) != sorted(_PARTS):
            raise ValueError(f"part_order must be a permutation of {_PARTS}, got {part_order}")
        parts = {
            "image_encoder": image_encoder,
            "prompt_encoder": prompt_encoder,
            "mask_decoder": mask_decoder,
        }
        for name in part_order:
            self.add_module(name, parts[name])
        self.info = info

    def decode_boxes(
        self, image_embedding: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode single-mask predictions for B boxes against one image embedding.

        Args:
            image_embedding: (1, 256, h, w) from ``image_encoder``.
            boxes: (B, 4) xyxy boxes in the prompt frame (``info.prompt_size``).

        Returns:
            low_res_masks (B, 1, 4h, 4w) logits and iou_predictions (B, 1).
        """
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        return self.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )

    def decode_prompts(
        self,
        image_embedding: torch.Tensor,
        boxes: torch.Tensor,
        points: torch.Tensor,
        point_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode_boxes` with labelled points beside each box (see :func:`decode_prompts`)."""
        return decode_prompts(self.prompt_encoder, self.mask_decoder, image_embedding, boxes, points, point_labels)

    def forward(
        self, image: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode one (1, 3, S, S) image in [0, 1] and decode (B, 4) boxes.

        Returns:
            low_res_masks (B, 1, 4h, 4w) logits and iou_predictions (B, 1).
        """
        return self.decode_boxes(self.image_encoder(image), boxes)


def decode_prompts(
    prompt_encoder: PromptEncoder,
    mask_decoder: MaskDecoder,
    image_embedding: torch.Tensor,
    boxes: torch.Tensor,
    points: torch.Tensor,
    point_labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-mask predictions for B boxes, each with N labelled points, against one image embedding.

    SAM's prompt encoder embeds the points beside the box (no padding point when a box is given, as
    upstream ``PromptEncoder._embed_points(pad=boxes is None)``); label 1 is a foreground point, 0 a
    background one. The models here were trained with boxes only: the point embeddings are SAM's.

    Args:
        image_embedding: (1, 256, h, w).
        boxes: (B, 4) xyxy in the prompt frame.
        points: (B, N, 2) as (x, y) in the prompt frame.
        point_labels: (B, N) of 1 (foreground) or 0 (background).

    Returns:
        low_res_masks (B, 1, 4h, 4w) logits and iou_predictions (B, 1).
    """
    sparse, dense = prompt_encoder(points=(points, point_labels), boxes=boxes, masks=None)
    return mask_decoder(
        image_embeddings=image_embedding,
        image_pe=prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )


class PromptDecoder(nn.Module):
    """The prompt encoder and mask decoder of a :class:`PromptableSAM` on their own: what decodes point
    prompts when the model's graphs run on an export backend whose decoder takes boxes only."""

    def __init__(self, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def decode_prompts(self, image_embedding, boxes, points, point_labels):
        return decode_prompts(self.prompt_encoder, self.mask_decoder, image_embedding, boxes, points, point_labels)
