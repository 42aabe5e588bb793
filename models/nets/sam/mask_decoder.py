"""SAM mask decoder: image embedding + prompt embeddings -> low-resolution mask logits and IoU."""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm2d
from .transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Predicts masks from an image embedding and prompt embeddings.

    An IoU token and ``num_multimask_outputs + 1`` mask tokens are prepended to the sparse
    prompt tokens and run through the two-way transformer with the image embedding. The image
    tokens are upscaled 4x by two transposed convolutions, and each mask token is turned into a
    per-channel weight vector by its own hypernetwork MLP; the mask logits are the dot product
    of those weights with the upscaled features at every pixel.

    Args:
        transformer_dim: channel width of the image embedding and of the tokens (256).
        transformer: the :class:`TwoWayTransformer`.
        num_multimask_outputs: masks returned with ``multimask_output=True`` (3 in SAM).
        activation: activation class of the upscaling network.
        iou_head_depth: Linear layers of the IoU head.
        iou_head_hidden_dim: hidden width of the IoU head.
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks for B prompts.

        Args:
            image_embeddings: (B, C, h, w), or (1, C, h, w) shared by all B prompts.
            image_pe: (1, C, h, w) positional encoding of the embedding grid.
            sparse_prompt_embeddings: (B, Nt, C) point/box tokens.
            dense_prompt_embeddings: (B, C, h, w) mask-prompt (or "no mask") embedding.
            multimask_output: return the 3 multimask outputs instead of the single mask.

        Returns:
            low_res_masks: (B, M, 4h, 4w) logits, M = 3 if multimask_output else 1.
            iou_pred: (B, M) predicted IoU (no sigmoid; may be negative).
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        selected = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, selected], iou_pred[:, selected]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask tokens: masks (B, num_mask_tokens, 4h, 4w) and IoU (B, num_mask_tokens)."""
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        src = _repeat_to_batch(image_embeddings, batch, "image_embeddings")
        src = src + dense_prompt_embeddings
        pos_src = _repeat_to_batch(image_pe, batch, "image_pe")
        _, channels, h, w = src.shape

        hs, image_tokens = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        image_features = image_tokens.transpose(1, 2).reshape(batch, channels, h, w)
        upscaled = self.output_upscaling(image_features)  # (B, C/8, 4h, 4w)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )  # (B, num_mask_tokens, C/8)
        b, c, uh, uw = upscaled.shape
        masks = (hyper_in @ upscaled.reshape(b, c, uh * uw)).reshape(b, -1, uh, uw)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred


def _repeat_to_batch(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Return x (B or 1, ...) with batch size ``batch``, repeating a single item if needed."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise ValueError(f"{name} has batch {x.shape[0]}, expected 1 or {batch}")
