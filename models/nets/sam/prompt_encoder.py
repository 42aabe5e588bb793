"""SAM prompt encoder: points, boxes and masks to sparse and dense prompt embeddings."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random Fourier features.

    A normalised coordinate c in [0, 1]^2 is mapped to ``[sin(f), cos(f)]`` with
    ``f = 2*pi * (2c - 1) @ G`` and G a fixed (2, num_pos_feats) Gaussian matrix. G is a
    persistent buffer, so it comes from the checkpoint.

    Args:
        num_pos_feats: number of frequencies; the encoding has 2 * num_pos_feats channels.
        scale: standard deviation of the initial G (1.0 when None or not positive).
    """

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer(
            "positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats))
        )

    def _encode(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode normalised coordinates: (..., 2) in [0, 1] -> (..., 2 * num_pos_feats)."""
        projected = (2.0 * coords - 1.0) @ self.positional_encoding_gaussian_matrix
        projected = projected * (2.0 * math.pi)
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Encoding of the centres of an (h, w) grid: returns (2 * num_pos_feats, h, w)."""
        h, w = size
        matrix = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=matrix.device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=matrix.device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(
            [xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1
        )  # (h, w, 2) as (x, y)
        return self._encode(grid).permute(2, 0, 1)

    def forward_with_coords(
        self, coords_input: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """Encode pixel coordinates.

        Args:
            coords_input: (B, N, 2) as (x, y) in the pixel frame of ``image_size``.
            image_size: (H, W) of that frame; x is divided by W and y by H.

        Returns:
            (B, N, 2 * num_pos_feats).
        """
        height, width = image_size
        coords = torch.stack(
            [coords_input[..., 0] / width, coords_input[..., 1] / height], dim=-1
        )
        return self._encode(coords.to(torch.float32))


class PromptEncoder(nn.Module):
    """Embeds point, box and mask prompts for the SAM mask decoder.

    Sparse prompts (points, box corners) become tokens of width ``embed_dim``; a mask prompt
    (or the learned "no mask" embedding) becomes a dense (embed_dim, h, w) map that is added
    to the image embedding.

    Args:
        embed_dim: token width (256 in every SAM variant here).
        image_embedding_size: (h, w) of the image embedding, e.g. (64, 64).
        input_image_size: (H, W) of the prompt frame: the frame box and point coordinates are
            given in (256 for LiteMedSAM, 512 for MedficientSAM, 1024 for MedSAM ViT-B).
        mask_in_chans: hidden channels of the mask downscaling network.
        activation: activation class of the mask downscaling network.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: tuple[int, int],
        input_image_size: tuple[int, int],
        mask_in_chans: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(image_embedding_size)
        self.input_image_size = tuple(input_image_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        # 0: negative point, 1: positive point, 2: box top-left corner, 3: box bottom-right corner.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: (1, embed_dim, h, w)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(
        self, points: torch.Tensor, labels: torch.Tensor, pad: bool
    ) -> torch.Tensor:
        """(B, N, 2) points and (B, N) labels -> (B, N (+1 if pad), embed_dim).

        Labels: 1 foreground, 0 background, -1 padding ("not a point"). With ``pad`` a padding
        point is appended, as SAM does when no box is given.
        """
        points = points + 0.5  # pixel centres
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight, embedding)
        embedding = embedding + (labels == 0) * self.point_embeddings[0].weight
        embedding = embedding + (labels == 1) * self.point_embeddings[1].weight
        return embedding

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, 4) or (B, 1, 4) xyxy boxes -> (B, 2, embed_dim) corner tokens."""
        corners = (boxes + 0.5).reshape(-1, 2, 2)  # pixel centres
        embedding = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_offsets = torch.cat(
            [self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0
        )  # (2, embed_dim)
        return embedding + corner_offsets

    @staticmethod
    def _batch_size(
        points: Optional[tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor],
    ) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def forward(
        self,
        points: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        boxes: Optional[torch.Tensor] = None,
        masks: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed the given prompts (any of them may be None).

        Args:
            points: ``(coords (B, N, 2), labels (B, N))`` in the prompt frame.
            boxes: (B, 4) or (B, 1, 4) xyxy boxes in the prompt frame.
            masks: (B, 1, 4h, 4w) mask logits.

        Returns:
            sparse: (B, n_tokens, embed_dim), n_tokens = N (+1 padding without boxes) + 2 per box.
            dense: (B, embed_dim, h, w).
        """
        batch = self._batch_size(points, boxes, masks)
        weight = self.no_mask_embed.weight
        sparse = weight.new_empty((batch, 0, self.embed_dim))
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None)], 1)
        if boxes is not None:
            sparse = torch.cat([sparse, self._embed_boxes(boxes)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(batch, -1, h, w)
        return sparse, dense
