"""SAM's ViT image encoder in the ViT-B configuration used by MedSAM (1024 px -> (B, 256, 64, 64)).

Layout, all reproduced here:

* a 16x16 stride-16 convolution embeds the image as a 64 x 64 grid of 768-wide tokens, kept
  channels-last (B, 64, 64, 768); a learned absolute position embedding of that shape is added;
* 12 pre-norm transformer blocks. Blocks 2, 5, 8 and 11 attend over the whole 64 x 64 grid; the
  others attend inside 14 x 14 windows, the grid being zero-padded (after the first LayerNorm)
  to 70 x 70 so that it splits into 5 x 5 windows. The padded tokens take part in the attention
  as keys, exactly as upstream, and are dropped afterwards;
* every attention adds decomposed relative-position terms: one learned vector per row offset and
  one per column offset (``rel_pos_h``/``rel_pos_w``, 2 * side - 1 rows each, i.e. 127 for the
  global blocks and 27 for the windowed ones), dotted with the (unscaled) query;
* a neck: 1x1 conv 768 -> 256, LayerNorm2d, 3x3 conv 256 -> 256, LayerNorm2d, convs without bias.

Norms are LayerNorm with eps 1e-6 (blocks and neck); GELU is exact (erf).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .sam.common import MLPBlock, conv_neck

# Upper bound on the elements of one block of attention scores. Global attention over a 64 x 64
# grid has 4096 x 4096 scores per head; computing a few heads at a time keeps the peak memory of
# a 1024 px forward pass to a few hundred MB instead of ~1.6 GB for all twelve at once.
_SCORE_BUDGET = 1 << 25


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: (B, C, H, W) -> channels-last (B, H/p, W/p, embed_dim).

    Args:
        patch_size: side of a square patch (kernel size and stride of ``proj``).
        in_chans: input channels.
        embed_dim: token width.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


def relative_position_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """Gather per-pair embeddings for one axis of a ``size``-long grid.

    Args:
        rel_pos: (2 * size - 1, C); row ``d + size - 1`` belongs to the offset d = i - j.
        size: query length = key length along the axis.

    Returns:
        (size, size, C) where entry [i, j] is the embedding of offset i - j.

    Raises:
        ValueError: if ``rel_pos`` was not made for ``size`` (upstream would resample it; the
            encoder here only runs at its native size, so that path is not needed).
    """
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(
            f"relative-position table has {rel_pos.shape[0]} rows, expected {2 * size - 1} "
            f"for a grid side of {size}"
        )
    positions = torch.arange(size, device=rel_pos.device)
    offsets = positions[:, None] - positions[None, :] + (size - 1)
    return rel_pos[offsets]


class Attention(nn.Module):
    """Multi-head self-attention over a square grid with decomposed relative positions.

    For query position (y, x) and key position (y', x') of one head the score is

        (q * scale) . k  +  q . Rh[y - y']  +  q . Rw[x - x']

    with scale = head_dim ** -0.5, followed by a softmax over all keys. Heads are processed in
    chunks (see ``_SCORE_BUDGET``) so the full (heads, N, N) score tensor never exists at once;
    each chunk is computed exactly like the all-at-once version.

    Args:
        dim: token width.
        num_heads: heads; head width = dim // num_heads.
        grid_size: side of the square token grid the attention runs over (the window side for
            windowed blocks), which fixes the size of the relative-position tables.
        qkv_bias: give the qkv projection a bias.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid_size - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid_size - 1, self.head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, dim) -> (B, H, W, dim), every one of the B grids attended separately."""
        b, h, w, dim = x.shape
        n = h * w
        # The qkv features are laid out as [q | k | v], each split into heads.
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, b * self.num_heads, n, self.head_dim)
        table_h = relative_position_table(self.rel_pos_h, h)  # (h, h, head_dim)
        table_w = relative_position_table(self.rel_pos_w, w)  # (w, w, head_dim)

        rows = b * self.num_heads
        chunk = max(1, _SCORE_BUDGET // (n * n))
        outputs = []
        for start in range(0, rows, chunk):
            part = slice(start, start + chunk)
            outputs.append(
                self._attend(q[part], k[part], v[part], table_h, table_w, h, w)
            )
        out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
        out = out.reshape(b, self.num_heads, h, w, self.head_dim).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(b, h, w, dim))

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        table_h: torch.Tensor,
        table_w: torch.Tensor,
        h: int,
        w: int,
    ) -> torch.Tensor:
        """Attention for a chunk of (grid, head) rows: q, k, v (R, h*w, d) -> (R, h*w, d)."""
        r, n, d = q.shape
        scores = (q * self.scale) @ k.transpose(-2, -1)  # (R, N, N)
        q_grid = q.reshape(r, h, w, d)
        # Row term: query row y against key row y', shared by all key columns; likewise columns.
        row_term = torch.einsum("ryxd,yjd->ryxj", q_grid, table_h)  # (R, h, w, h)
        col_term = torch.einsum("ryxd,xjd->ryxj", q_grid, table_w)  # (R, h, w, w)
        grid_scores = scores.view(r, h, w, h, w)
        grid_scores.add_(row_term[..., :, None])
        grid_scores.add_(col_term[..., None, :])
        return scores.softmax(dim=-1) @ v


class Block(nn.Module):
    """Pre-norm transformer block on a channels-last grid, with global or windowed attention.

    ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``. With ``window_size > 0`` the normalised grid
    is zero-padded at the bottom/right to a multiple of the window, cut into windows that attend
    independently, and reassembled; otherwise the whole grid attends at once.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width = dim * mlp_ratio.
        qkv_bias: give the qkv projection a bias.
        window_size: window side, or 0 for global attention.
        grid_size: side of the full token grid (the attention span of a global block).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        window_size: int,
        grid_size: int,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, window_size or grid_size, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act=nn.GELU)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C): attention inside non-overlapping windows."""
        ws = self.window_size
        b, h, w, c = x.shape
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        windows = (
            x.reshape(b, ph // ws, ws, pw // ws, ws, c)
            .transpose(2, 3)
            .reshape(-1, ws, ws, c)
        )
        windows = self.attn(windows)
        grid = (
            windows.reshape(b, ph // ws, pw // ws, ws, ws, c)
            .transpose(2, 3)
            .reshape(b, ph, pw, c)
        )
        return grid[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, dim) -> (B, H, W, dim)."""
        y = self.norm1(x)
        y = self._windowed_attention(y) if self.window_size > 0 else self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class ViTImageEncoder(nn.Module):
    """SAM's ViT image encoder (ViT-B defaults, as in MedSAM).

    Args:
        img_size: side of the square input image; the position embedding is made for it, so the
            encoder only accepts this size.
        patch_size: side of a patch; the token grid is img_size / patch_size (64).
        in_chans: input channels.
        embed_dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width = embed_dim * mlp_ratio.
        out_chans: channels of the output embedding.
        window_size: window side of the windowed blocks.
        global_attn_indexes: blocks that attend over the whole grid.
        qkv_bias: give the qkv projections a bias.
        use_rel_pos: must be True (the checkpoint layout always holds the relative-position
            tables); kept as an argument to mirror the upstream configuration.

    Input (B, in_chans, img_size, img_size) in [0, 1] (no mean/std normalisation here);
    output (B, out_chans, img_size / patch_size, img_size / patch_size).
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11),
        qkv_bias: bool = True,
        use_rel_pos: bool = True,
    ) -> None:
        super().__init__()
        if not use_rel_pos:
            raise ValueError("only use_rel_pos=True is supported")
        if img_size % patch_size != 0:
            raise ValueError(f"patch_size={patch_size} must divide img_size={img_size}")
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                window_size=0 if index in global_attn_indexes else window_size,
                grid_size=grid,
            )
            for index in range(depth)
        )
        self.neck = conv_neck(embed_dim, out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, img_size, img_size) -> (B, out_chans, grid, grid)."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected a {self.img_size}x{self.img_size} image, got {tuple(x.shape[-2:])}"
            )
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
