"""EfficientViT-SAM image encoder (L0/L1/L2) as used by MedficientSAM: (B, 3, 512, 512) -> (B, 256, 64, 64).

The encoder is a convolutional/linear-attention backbone followed by a feature-pyramid neck and
a channel LayerNorm:

* **Backbone** (``EfficientViTLargeBackbone`` upstream), five stages of widths
  32/64/128/256/512. At 512 px input the stage outputs are 256^2, 128^2, 64^2, 32^2 and 16^2.

  - stage 0: 3x3 stride-2 Conv-BN-GELU stem, then ``depths[0]`` residual ``ResBlock`` s
    (two 3x3 Conv-BN, GELU between them);
  - stages 1 and 2: a stride-2 ``FusedMBConv`` of expand 16 (no shortcut), then residual
    ``FusedMBConv`` s of expand 4 (3x3 Conv-BN-GELU, 1x1 Conv-BN);
  - stage 3: a stride-2 ``MBConv`` of expand 16, then residual ``MBConv`` s of expand 4. These are
    the "fewer norm" blocks: the 1x1 expansion and the 3x3 depthwise conv have a bias and no
    norm, only the 1x1 projection has a BatchNorm;
  - stage 4: a stride-2 ``MBConv`` of expand 24, then ``EfficientViTBlock`` s: a residual
    ``LiteMLA`` (multi-scale ReLU linear attention) followed by a residual ``MBConv`` of expand 6.

  The first block of stages 1-4 has stride 2 and no shortcut; every later block adds its input.
* **Neck** (``SamNeck``): stage 4, 3 and 2 each go through a 1x1 Conv-BN to 256 channels and are
  resized to 64x64 with **bicubic** interpolation (align_corners=False; stage 2 is already 64x64
  at 512 px and is passed through), then summed. ``neck_depth`` residual ``FusedMBConv`` s of
  expand 1 follow (4/8/12 for L0/L1/L2), then a 1x1 conv with bias.
* **norm**: ``LayerNorm2d(256)``.

Numerical quirks that matter for parity with upstream:

* Every BatchNorm and the final LayerNorm2d use **eps 1e-6**, not torch's default 1e-5:
  upstream's ``create_sam_model`` calls ``set_norm_eps(model, 1e-6)`` after construction. Here
  the eps is passed when each norm is built.
* GELU is the **tanh approximation** (``nn.GELU(approximate="tanh")``) in the backbone and the
  neck. (The SAM prompt encoder and mask decoder keep the exact erf GELU.)
* ``LiteMLA`` runs its attention in float32 with a ReLU kernel: v gets an extra row of ones, so a
  single pair of matmuls yields both the numerator and the normaliser, and the output is
  ``num / (den + 1e-15)``. Head width is 32; multi-scale tokens come from a depthwise 5x5 conv
  followed by a grouped 1x1 conv (groups = 3 * heads) applied to the q/k/v map.

Submodule names reproduce upstream's state_dict keys (``backbone.stages.N.op_list.M...``,
``neck.input_ops.I.op_list.0...``, ``neck.middle.op_list.I.main...``,
``neck.output_ops.0.op_list.0...``, ``norm...``) so that MedficientSAM checkpoints load strictly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .sam.common import LayerNorm2d

BN_EPS = 1e-6
"""BatchNorm eps of every norm in the backbone and neck (upstream sets it post hoc)."""
LN_EPS = 1e-6
"""eps of the final LayerNorm2d."""
LINEAR_ATTENTION_EPS = 1e-15
"""Added to the linear-attention normaliser."""


@dataclass(frozen=True)
class EfficientViTSamConfig:
    """Shape of one EfficientViT-SAM encoder variant.

    Attributes:
        name: variant name ("l0", "l1", "l2").
        depths: blocks per backbone stage after the stage's opening block (stage 0: after the
            stem conv; stages 1-4: after the stride-2 block).
        neck_depth: FusedMBConv blocks in the neck.
        widths: output channels of the five backbone stages.
        expand_ratios: expansion of the repeated blocks of each stage; a stage's opening
            stride-2 block uses four times this.
        head_dim: channels per LiteMLA head.
        neck_width: channels inside the neck.
        out_chans: channels of the embedding.
        embedding_size: side of the embedding grid the neck resizes to.
    """

    name: str
    depths: tuple[int, int, int, int, int]
    neck_depth: int
    widths: tuple[int, int, int, int, int] = (32, 64, 128, 256, 512)
    expand_ratios: tuple[int, int, int, int, int] = (1, 4, 4, 4, 6)
    head_dim: int = 32
    neck_width: int = 256
    out_chans: int = 256
    embedding_size: int = 64


VARIANTS: dict[str, EfficientViTSamConfig] = {
    "l0": EfficientViTSamConfig("l0", depths=(1, 1, 1, 4, 4), neck_depth=4),
    "l1": EfficientViTSamConfig("l1", depths=(1, 1, 1, 6, 6), neck_depth=8),
    "l2": EfficientViTSamConfig("l2", depths=(1, 2, 2, 8, 8), neck_depth=12),
}


def _gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


# --------------------------------------------------------------------------- basic layers


class ConvLayer(nn.Module):
    """Conv2d with "same" padding, then an optional BatchNorm and an optional GELU.

    Children: ``conv``, and ``norm`` / ``act`` only when enabled (so a norm-free layer has no
    ``norm.*`` keys).

    Args:
        in_chans: input channels.
        out_chans: output channels.
        kernel_size: odd square kernel size; padding is kernel_size // 2.
        stride: convolution stride.
        groups: convolution groups.
        bias: give the convolution a bias.
        norm: follow with BatchNorm2d (eps 1e-6).
        act: finish with tanh-approximate GELU.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        norm: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_chans,
            out_chans,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=bias,
        )
        self.norm = nn.BatchNorm2d(out_chans, eps=BN_EPS) if norm else None
        self.act = _gelu() if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class OpSequential(nn.Module):
    """Applies the modules of ``op_list`` one after the other (keys read ``op_list.<i>``)."""

    def __init__(self, ops: Sequence[nn.Module]) -> None:
        super().__init__()
        self.op_list = nn.ModuleList(ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for op in self.op_list:
            x = op(x)
        return x


class Residual(nn.Module):
    """``main(x) + x``, or just ``main(x)`` when ``shortcut`` is False (the stride-2 blocks).

    The wrapped block is the child ``main``, hence keys ``<...>.main.<...>``.
    """

    def __init__(self, main: nn.Module, shortcut: bool = True) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.main(x)
        return out + x if self.shortcut else out

    def extra_repr(self) -> str:
        return f"shortcut={self.shortcut}"


class Resize(nn.Module):
    """Bicubic resize (align_corners=False) to ``size`` x ``size``; identity if already that size."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}, mode=bicubic"


# --------------------------------------------------------------------------- convolutional blocks


class ResBlock(nn.Module):
    """3x3 Conv-BN-GELU, then 3x3 Conv-BN (channels kept). Used after the stem (stage 0)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvLayer(channels, channels, 3)
        self.conv2 = ConvLayer(channels, channels, 3, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class FusedMBConv(nn.Module):
    """3x3 Conv-BN-GELU expanding to ``in_chans * expand_ratio`` channels, then 1x1 Conv-BN.

    Args:
        in_chans: input channels.
        out_chans: output channels.
        expand_ratio: hidden channels = round(in_chans * expand_ratio).
        stride: stride of the 3x3 conv.
    """

    def __init__(self, in_chans: int, out_chans: int, expand_ratio: float, stride: int = 1) -> None:
        super().__init__()
        hidden = round(in_chans * expand_ratio)
        self.spatial_conv = ConvLayer(in_chans, hidden, 3, stride=stride)
        self.point_conv = ConvLayer(hidden, out_chans, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.spatial_conv(x))


class MBConv(nn.Module):
    """Inverted bottleneck with "fewer norms": 1x1 conv + bias + GELU, 3x3 depthwise conv + bias +
    GELU, 1x1 Conv-BN (no bias, no activation).

    Args:
        in_chans: input channels.
        out_chans: output channels.
        expand_ratio: hidden channels = round(in_chans * expand_ratio).
        stride: stride of the depthwise conv.
    """

    def __init__(self, in_chans: int, out_chans: int, expand_ratio: float, stride: int = 1) -> None:
        super().__init__()
        hidden = round(in_chans * expand_ratio)
        self.inverted_conv = ConvLayer(in_chans, hidden, 1, bias=True, norm=False)
        self.depth_conv = ConvLayer(
            hidden, hidden, 3, stride=stride, groups=hidden, bias=True, norm=False
        )
        self.point_conv = ConvLayer(hidden, out_chans, 1, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


# --------------------------------------------------------------------------- attention


class LiteMLA(nn.Module):
    """Multi-scale ReLU linear attention (channels kept).

    A bias-free 1x1 conv produces q, k and v for ``heads = channels // head_dim`` heads, laid out
    per head as [q | k | v] (3 * head_dim channels each). For every scale s, a depthwise s x s conv
    followed by a grouped 1x1 conv (one group per q, k or v of a head) turns that map into a second
    set of q/k/v heads, so attention runs over ``heads * (1 + len(scales))`` heads. Each uses
    ReLU(q), ReLU(k) and

        out[:, n] = sum_m v[:, m] (k_m . q_n) / (sum_m k_m . q_n + eps),

    computed as two matmuls in float32: (v; 1) @ k^T, then @ q. The heads are concatenated and
    projected back by a 1x1 Conv-BN (no activation).

    When the map has no more positions than ``head_dim`` the same kernel is evaluated in its
    quadratic form (explicit N x N attention map), as upstream does; at 512 px input (16 x 16 in
    the last stage) that never happens.

    Args:
        channels: input and output channels.
        head_dim: channels per head (32).
        scales: kernel sizes of the multi-scale aggregation branches ((5,)).
    """

    def __init__(self, channels: int, head_dim: int = 32, scales: tuple[int, ...] = (5,)) -> None:
        super().__init__()
        heads = channels // head_dim
        qkv_chans = 3 * heads * head_dim
        self.head_dim = head_dim
        self.qkv = ConvLayer(channels, qkv_chans, 1, norm=False, act=False)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(
                    qkv_chans, qkv_chans, scale, padding=scale // 2, groups=qkv_chans, bias=False
                ),
                nn.Conv2d(qkv_chans, qkv_chans, 1, groups=3 * heads, bias=False),
            )
            for scale in scales
        )
        self.proj = ConvLayer(heads * head_dim * (1 + len(scales)), channels, 1, act=False)

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, heads * 3 * d, H, W) -> ReLU(q), ReLU(k), v, each (B, heads, d, H*W), float32."""
        b, _, h, w = qkv.shape
        qkv = qkv.float().reshape(b, -1, 3 * self.head_dim, h * w)
        q, k, v = qkv.split(self.head_dim, dim=2)
        return F.relu(q), F.relu(k), v

    @staticmethod
    def _linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """O(N) form: ((v; 1) @ k^T) @ q, then divide by the appended row."""
        v = F.pad(v, (0, 0, 0, 1), value=1.0)  # (B, heads, d + 1, N)
        out = (v @ k.transpose(-1, -2)) @ q  # (B, heads, d + 1, N)
        return out[:, :, :-1] / (out[:, :, -1:] + LINEAR_ATTENTION_EPS)

    @staticmethod
    def _quadratic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """O(N^2) form of the same kernel, for maps with few positions."""
        scores = k.transpose(-1, -2) @ q  # (B, heads, N_k, N_q)
        scores = scores / (scores.sum(dim=2, keepdim=True) + LINEAR_ATTENTION_EPS)
        return v @ scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(x)
        qkv = torch.cat([qkv] + [branch(qkv) for branch in self.aggreg], dim=1)
        q, k, v = self._split_heads(qkv)
        if h * w > self.head_dim:
            out = self._linear_attention(q, k, v)
        else:
            out = self._quadratic_attention(q, k, v)
        out = out.to(x.dtype).reshape(b, -1, h, w)
        return self.proj(out)


class EfficientViTBlock(nn.Module):
    """Residual LiteMLA (``context_module``), then residual MBConv (``local_module``).

    Args:
        channels: input and output channels.
        head_dim: LiteMLA head width.
        expand_ratio: MBConv expansion.
    """

    def __init__(self, channels: int, head_dim: int, expand_ratio: float) -> None:
        super().__init__()
        self.context_module = Residual(LiteMLA(channels, head_dim))
        self.local_module = Residual(MBConv(channels, channels, expand_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


# --------------------------------------------------------------------------- backbone, neck, encoder


class EfficientViTLargeBackbone(nn.Module):
    """The five-stage EfficientViT-L backbone; returns the output of every stage.

    Args:
        config: the variant (widths, depths, expansion ratios, head width).
    """

    def __init__(self, config: EfficientViTSamConfig) -> None:
        super().__init__()
        widths, depths, expands = config.widths, config.depths, config.expand_ratios

        stem = [ConvLayer(3, widths[0], 3, stride=2)]
        stem += [Residual(ResBlock(widths[0])) for _ in range(depths[0])]
        stages = [OpSequential(stem)]

        for index in (1, 2, 3, 4):
            in_chans, width, expand = widths[index - 1], widths[index], expands[index]
            # Stages 1-2 use FusedMBConv throughout; stages 3-4 open with an MBConv.
            block = FusedMBConv if index <= 2 else MBConv
            ops: list[nn.Module] = [
                Residual(block(in_chans, width, 4 * expand, stride=2), shortcut=False)
            ]
            for _ in range(depths[index]):
                if index == 4:
                    ops.append(EfficientViTBlock(width, config.head_dim, expand))
                else:
                    ops.append(Residual(block(width, width, expand)))
            stages.append(OpSequential(ops))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [stage0, ..., stage4] feature maps (strides 2, 4, 8, 16, 32)."""
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class SamNeck(nn.Module):
    """Fuses backbone stages 4, 3 and 2 into one (B, out_chans, size, size) map (before the norm).

    ``input_ops[i]`` (1x1 Conv-BN, bicubic resize) is applied to stage ``4 - i``; the three maps are
    summed, refined by ``middle`` (residual FusedMBConvs of expand 1) and projected by
    ``output_ops[0]`` (1x1 conv with bias).

    Args:
        in_chans: channels of backbone stages 4, 3 and 2, in that order.
        width: channels inside the neck.
        depth: number of FusedMBConv blocks in ``middle``.
        out_chans: output channels.
        size: side of the output grid.
    """

    def __init__(
        self,
        in_chans: Sequence[int],
        width: int,
        depth: int,
        out_chans: int,
        size: int,
    ) -> None:
        super().__init__()
        self.input_ops = nn.ModuleList(
            OpSequential([ConvLayer(c, width, 1, act=False), Resize(size)]) for c in in_chans
        )
        self.middle = OpSequential(
            [Residual(FusedMBConv(width, width, expand_ratio=1)) for _ in range(depth)]
        )
        self.output_ops = nn.ModuleList(
            [OpSequential([ConvLayer(width, out_chans, 1, bias=True, norm=False, act=False)])]
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``features``: backbone stage 4, 3 and 2 outputs. Returns (B, out_chans, size, size)."""
        mapped = [op(feature) for op, feature in zip(self.input_ops, features)]
        # Upstream sums right to left: a + (b + c).
        fused = mapped[-1]
        for feature in reversed(mapped[:-1]):
            fused = feature + fused
        return self.output_ops[0](self.middle(fused))


class EfficientViTSamEncoder(nn.Module):
    """EfficientViT-SAM image encoder: (B, 3, 512, 512) in [0, 1] -> (B, 256, 64, 64).

    No pixel mean/std is applied: MedficientSAM feeds the min-max scaled image directly.

    Args:
        config: the variant; see :data:`VARIANTS`.
    """

    def __init__(self, config: EfficientViTSamConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = EfficientViTLargeBackbone(config)
        self.neck = SamNeck(
            in_chans=(config.widths[4], config.widths[3], config.widths[2]),
            width=config.neck_width,
            depth=config.neck_depth,
            out_chans=config.out_chans,
            size=config.embedding_size,
        )
        self.norm = LayerNorm2d(config.out_chans, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stages = self.backbone(x)
        return self.norm(self.neck((stages[4], stages[3], stages[2])))

