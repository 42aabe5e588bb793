"""Inference-only rewrites of a loaded model that keep its function: BatchNorm folding and
channels-last memory format.

Both run after the weights are loaded (they change the module tree or the tensors' layout, not the
checkpoint) and only on the fast execution path; the faithful path runs the model as upstream
builds it.  Folding changes the arithmetic order (``conv(x) * s + t`` becomes ``conv'(x)`` with
``w' = w * s``), so outputs move in the last float bits; tests/test_fast_path.py holds the folded
model to the parity vectors' bars.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["fold_batchnorm", "to_channels_last"]

# (conv attribute, norm attribute) pairs of the conv + BatchNorm blocks in this package:
# EfficientViT ``ConvLayer`` (conv, norm) and TinyViT ``Conv2dBN`` (c, bn).
_PAIRS = (("conv", "norm"), ("c", "bn"))


def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Make ``conv`` compute ``bn(conv(x))`` (BatchNorm in eval mode: running statistics)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    with torch.no_grad():
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.weight = nn.Parameter(weight, requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d in a known conv block into the conv's
    weight and bias, replacing the norm with ``nn.Identity``; returns how many were folded.

    The model must be in eval mode (a training-mode BatchNorm uses batch statistics and cannot be
    folded); raises ValueError otherwise.
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (call model.eval() first)")
    folded = 0
    for module in model.modules():
        for conv_name, norm_name in _PAIRS:
            conv = getattr(module, conv_name, None)
            norm = getattr(module, norm_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
                _fold_into(conv, norm)
                setattr(module, norm_name, nn.Identity())
                folded += 1
    return folded


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store the 4D weights of ``model`` in channels-last order (NHWC), which oneDNN's convolutions
    run without layout conversions when the input is channels-last too."""
    return model.to(memory_format=torch.channels_last)
