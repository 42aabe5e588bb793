"""Small building blocks shared by the SAM prompt encoder and mask decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) feature map.

    Every spatial position is normalised on its own across the C channels, then scaled and
    shifted by per-channel ``weight`` and ``bias``. SAM uses eps 1e-6 for this layer everywhere.

    Args:
        num_channels: C, the number of channels.
        eps: added to the variance before the square root.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        centred = x - x.mean(dim=1, keepdim=True)
        variance = centred.pow(2).mean(dim=1, keepdim=True)
        normalised = centred / torch.sqrt(variance + self.eps)
        return self.weight[:, None, None] * normalised + self.bias[:, None, None]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def conv_neck(in_chans: int, out_chans: int = 256) -> nn.Sequential:
    """SAM's image-encoder neck: 1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d, no biases,
    eps 1e-6 (ViT-B and TinyViT both end in it; keys ``0.weight``, ``1.weight`` ... ``3.bias``)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size=1, bias=False),
        LayerNorm2d(out_chans, eps=1e-6),
        nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_chans, eps=1e-6),
    )


class MLPBlock(nn.Module):
    """Two-layer feed-forward block ``lin2(act(lin1(x)))`` of the two-way transformer.

    Args:
        embedding_dim: input and output width.
        mlp_dim: hidden width.
        act: activation class, instantiated once.
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., embedding_dim) -> (..., embedding_dim)."""
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """A stack of ``num_layers`` Linear layers with ReLU between them (none after the last).

    Used for the hypernetwork heads and the IoU head of the mask decoder. The layers are kept
    in ``self.layers`` so checkpoint keys read ``<name>.layers.<i>.weight``.

    Args:
        input_dim: width of the input features.
        hidden_dim: width of every hidden layer.
        output_dim: width of the output.
        num_layers: number of Linear layers (>= 1).
        sigmoid_output: apply a sigmoid to the output.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        widths_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        widths_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths_in, widths_out))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., input_dim) -> (..., output_dim)."""
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < last:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
