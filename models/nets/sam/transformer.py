"""SAM's two-way transformer: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import MLPBlock


class Attention(nn.Module):
    """Multi-head attention whose internal width can be reduced by ``downsample_rate``.

    q, k and v are projected from ``embedding_dim`` to ``embedding_dim // downsample_rate``,
    split into ``num_heads`` heads, and the result is projected back to ``embedding_dim``.

    Args:
        embedding_dim: width of the inputs and of the output.
        num_heads: number of heads; must divide the internal width.
        downsample_rate: internal width = embedding_dim // downsample_rate.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide internal_dim={self.internal_dim}")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, heads, N, C // heads)."""
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    @staticmethod
    def _merge_heads(x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, d) -> (B, N, heads * d)."""
        b, heads, n, d = x.shape
        return x.transpose(1, 2).reshape(b, n, heads * d)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C)."""
        q = self._split_heads(self.q_proj(q))
        k = self._split_heads(self.k_proj(k))
        v = self._split_heads(self.v_proj(v))
        head_dim = q.shape[-1]
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)
        out = torch.softmax(scores, dim=-1) @ v
        return self.out_proj(self._merge_heads(out))


class TwoWayAttentionBlock(nn.Module):
    """One layer of the two-way transformer.

    Four steps, each followed by a residual add and a LayerNorm: (1) self-attention of the
    tokens, (2) tokens attend to the image, (3) MLP on the tokens, (4) the image attends to
    the tokens. Positional encodings are added to queries and keys, never to values.

    Args:
        embedding_dim: token width.
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLP.
        activation: activation class of the MLP.
        attention_downsample_rate: internal width reduction of the two cross-attentions.
        skip_first_layer_pe: in step (1), use the tokens without their positional encoding
            and without a residual connection (SAM does this in the first layer).
        layer_norm_eps: eps of the four LayerNorms.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)
        self.norm4 = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries/query_pe (B, Nt, C), keys/key_pe (B, Ni, C) -> updated (queries, keys)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock` plus a final token-to-image attention.

    Args:
        depth: number of two-way blocks.
        embedding_dim: channel width of the image embedding and of the tokens.
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLPs.
        activation: activation class of the token MLPs (ReLU in SAM).
        attention_downsample_rate: internal width reduction of the cross-attentions.
        layer_norm_eps: eps of every LayerNorm here (1e-5 in SAM/LiteMedSAM, 1e-6 in the
            MedficientSAM models).
    """

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(index == 0),
                layer_norm_eps=layer_norm_eps,
            )
            for index in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim, eps=layer_norm_eps)

    def forward(
        self,
        image_embedding: torch.Tensor,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the two-way attention.

        Args:
            image_embedding: (B, C, h, w).
            image_pe: (B, C, h, w) positional encoding of the image embedding.
            point_embedding: (B, Nt, C) prompt and output tokens; also their positional encoding.

        Returns:
            tokens (B, Nt, C) and image tokens (B, h*w, C).
        """
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe=point_embedding, key_pe=key_pe)
        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        return queries, keys
