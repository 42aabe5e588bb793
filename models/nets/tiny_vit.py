"""TinyViT image encoder in the LiteMedSAM configuration (256 px input -> (B, 256, 64, 64)).

LiteMedSAM changes MobileSAM's TinyViT in three places, all reproduced here:

* the patch embedding is two 1x1 stride-1 convolutions, so tokens stay at input resolution;
* the patch merging before a stage of width 320, 448 or 576 has stride 1 instead of 2;
* a SAM-style neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) maps to 256 channels.

Stage layout at 256 px: 256^2 x 64 (MBConv) -> 128^2 x 128 -> 64^2 x 160 -> 64^2 x 320.
Norms: nn.LayerNorm eps 1e-5, BatchNorm eps 1e-5, neck LayerNorm2d eps 1e-6; GELU is exact.

The attention biases are gathered from ``attention_biases`` on every forward call (no cached
copy), so the order of ``eval()`` and ``load_state_dict()`` does not matter.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .sam.common import conv_neck

# Upstream rule: a patch merging that outputs one of these widths keeps the resolution.
_STRIDE_ONE_WIDTHS = (320, 448, 576)


class Conv2dBN(nn.Sequential):
    """Bias-free Conv2d (``c``) followed by BatchNorm2d (``bn``).

    Args:
        in_chans: input channels.
        out_chans: output channels.
        kernel_size: square kernel size.
        stride: convolution stride.
        padding: zero padding on every side.
        groups: convolution groups (``in_chans`` for depthwise).
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(
            in_chans, out_chans, kernel_size, stride, padding, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_chans, eps=1e-5)


class PatchEmbed(nn.Module):
    """Pointwise stem: 1x1 Conv-BN to embed_dim/2, GELU, 1x1 Conv-BN to embed_dim.

    (B, in_chans, H, W) -> (B, embed_dim, H, W).
    """

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, embed_dim // 2),
            nn.GELU(),
            Conv2dBN(embed_dim // 2, embed_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project, add input, GELU.

    (B, C, H, W) -> (B, C, H, W).

    Args:
        channels: input and output channels.
        expand_ratio: hidden channels = channels * expand_ratio.
    """

    def __init__(self, channels: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(channels * expand_ratio)
        self.conv1 = Conv2dBN(channels, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        y = self.act(self.conv2(y))
        return self.act(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 Conv-BN, GELU, 3x3 depthwise Conv-BN (with ``stride``), GELU, 1x1 Conv-BN.

    Accepts a feature map (B, dim, H, W) or tokens (B, H*W, dim) on the
    ``input_resolution`` grid, and returns tokens (B, H'*W', out_dim).

    Args:
        input_resolution: (H, W) of the input grid.
        dim: input channels.
        out_dim: output channels.
        stride: stride of the depthwise convolution (1 or 2).
    """

    def __init__(
        self, input_resolution: tuple[int, int], dim: int, out_dim: int, stride: int
    ) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(
            out_dim, out_dim, kernel_size=3, stride=stride, padding=1, groups=out_dim
        )
        self.conv3 = Conv2dBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.input_resolution
            x = x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Pre-norm feed-forward block: LayerNorm, Linear, GELU, Linear. (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class Attention(nn.Module):
    """Pre-norm multi-head self-attention inside one window, with learned relative-position biases.

    Each head has one learned bias per absolute offset (|dy|, |dx|) between two positions of the
    window_size x window_size window. ``attention_bias_idxs`` (N, N), N = window_size**2, maps a
    pair of positions to its offset index |dy| * window_size + |dx|; it is a non-persistent
    buffer derived from the window size, not part of the checkpoint.

    Args:
        dim: token width.
        num_heads: heads; head width = dim // num_heads.
        window_size: side of the square window.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        ys, xs = torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        offsets = (ys[:, None] - ys[None, :]).abs() * window_size
        offsets = offsets + (xs[:, None] - xs[None, :]).abs()
        self.register_buffer("attention_bias_idxs", offsets, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) tokens of B windows -> (B, N, dim)."""
        b, n, dim = x.shape
        qkv = self.qkv(self.norm(x))
        # The qkv features are laid out per head as [q | k | v].
        qkv = qkv.reshape(b, n, self.num_heads, 3 * self.head_dim).permute(0, 2, 1, 3)
        q, k, v = qkv.chunk(3, dim=-1)  # each (B, heads, N, head_dim)
        bias = self.attention_biases[:, self.attention_bias_idxs]  # (heads, N, N)
        scores = (q @ k.transpose(-2, -1)) * self.scale + bias
        out = torch.softmax(scores, dim=-1) @ v  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))


class TinyViTBlock(nn.Module):
    """Windowed attention + residual, 3x3 depthwise Conv-BN, MLP + residual.

    Tokens (B, H*W, dim) on the ``input_resolution`` grid. The grid is zero-padded at the
    bottom/right to a multiple of ``window_size`` before window partitioning; the padded tokens
    take part in the attention (as upstream) and are dropped afterwards.

    Args:
        dim: token width.
        input_resolution: (H, W) of the token grid.
        num_heads: attention heads.
        window_size: side of the attention window.
        mlp_ratio: MLP hidden width = dim * mlp_ratio.
        local_conv_size: kernel of the depthwise convolution.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        local_conv_size: int = 3,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide dim={dim}")
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.attn = Attention(dim, num_heads, window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(
            dim, dim, kernel_size=local_conv_size, padding=local_conv_size // 2, groups=dim
        )

    def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H*W, C) -> (B, H*W, C): attention within non-overlapping windows."""
        h, w = self.input_resolution
        ws = self.window_size
        b, length, c = x.shape
        if h == ws and w == ws:
            return self.attn(x)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        grid = F.pad(x.reshape(b, h, w, c), (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        windows = (
            grid.reshape(b, ph // ws, ws, pw // ws, ws, c)
            .transpose(2, 3)
            .reshape(-1, ws * ws, c)
        )
        windows = self.attn(windows)
        grid = (
            windows.reshape(b, ph // ws, pw // ws, ws, ws, c)
            .transpose(2, 3)
            .reshape(b, ph, pw, c)
        )
        return grid[:, :h, :w].reshape(b, length, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H*W, dim) -> (B, H*W, dim)."""
        h, w = self.input_resolution
        b, length, c = x.shape
        if length != h * w:
            raise ValueError(f"expected {h}x{w}={h * w} tokens, got {length}")
        x = x + self._window_attention(x)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w))
        x = x.reshape(b, c, length).transpose(1, 2)
        return x + self.mlp(x)


class _Stage(nn.Module):
    """A stage: its ``blocks`` in order, then an optional ``downsample`` (PatchMerging)."""

    blocks: nn.ModuleList
    downsample: Optional[PatchMerging]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class ConvStage(_Stage):
    """Stage 0: ``depth`` MBConv blocks on a (B, C, H, W) map, then an optional PatchMerging.

    (B, dim, H, W) -> tokens (B, H'*W', out_dim), or the map if there is no downsample.
    """

    def __init__(
        self, dim: int, depth: int, expand_ratio: float, downsample: Optional[PatchMerging]
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample


class TransformerStage(_Stage):
    """Stages 1-3: ``depth`` TinyViT blocks on tokens, then an optional PatchMerging.

    (B, H*W, dim) -> (B, H'*W', out_dim).
    """

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        downsample: Optional[PatchMerging],
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, input_resolution, num_heads, window_size, mlp_ratio, local_conv_size)
            for _ in range(depth)
        )
        self.downsample = downsample


class TinyViT(nn.Module):
    """TinyViT encoder with a SAM neck, as configured by LiteMedSAM.

    Args:
        img_size: side of the square input image (the token grid of stage 0).
        in_chans: input channels.
        embed_dims: width of each stage.
        depths: blocks per stage.
        num_heads: attention heads of each stage (stage 0 is convolutional; its entry is unused).
        window_sizes: attention window of each stage (stage 0 entry unused).
        mlp_ratio: MLP expansion of the transformer blocks.
        mbconv_expand_ratio: expansion of the MBConv blocks of stage 0.
        local_conv_size: depthwise kernel inside the transformer blocks.
        out_chans: channels of the output embedding.

    Input (B, in_chans, img_size, img_size); output (B, out_chans, g, g), g = img_size / 2**k
    where k counts the stride-2 patch mergings (64 for LiteMedSAM at 256).
    """

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        self.layers = nn.ModuleList()
        resolution = img_size
        num_stages = len(depths)
        for i in range(num_stages):
            downsample = None
            next_resolution = resolution
            if i < num_stages - 1:
                out_dim = embed_dims[i + 1]
                stride = 1 if out_dim in _STRIDE_ONE_WIDTHS else 2
                downsample = PatchMerging((resolution, resolution), embed_dims[i], out_dim, stride)
                next_resolution = (resolution - 1) // stride + 1
            if i == 0:
                stage = ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, downsample)
            else:
                stage = TransformerStage(
                    embed_dims[i],
                    (resolution, resolution),
                    depths[i],
                    num_heads[i],
                    window_sizes[i],
                    mlp_ratio,
                    local_conv_size,
                    downsample,
                )
            self.layers.append(stage)
            resolution = next_resolution
        self.embedding_size = resolution
        self.neck = conv_neck(embed_dims[-1], out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, img_size, img_size) in [0, 1] -> (B, out_chans, g, g) embedding."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"TinyViT expects {self.img_size}x{self.img_size} input, got {tuple(x.shape[-2:])}"
            )
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        b, _, c = x.shape
        g = self.embedding_size
        return self.neck(x.transpose(1, 2).reshape(b, c, g, g))
