"""Model size and compute: parameter counts and FLOPs for one image plus one box.

FLOPs are counted with :mod:`torch.utils.flop_counter` over the image encoder, the prompt encoder
and the mask decoder, for one image at the model's input size and one box. torch counts a
multiply-add as 2 FLOPs and counts only convolutions and matrix products; the published figures
(fvcore: MedSAM 488.24G, LiteMedSAM 39.98G, MedficientSAM-L0/L1/L2 36.80G/51.05G/70.71G) count a
multiply-add as 1, so :func:`count_macs` halves torch's count to be comparable with them.

The remaining gap is normalisation: the published counts were made on models left in training
mode, where fvcore charges every ``BatchNorm`` and ``nn.LayerNorm`` 5 FLOPs per output element
(in eval mode it would charge BatchNorm 1 and LayerNorm 5). :func:`fvcore_style_macs` adds exactly
that to our count and reproduces every published figure to the printed precision; the README
shows both.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

# fvcore's charge per output element of a training-mode BatchNorm / an affine LayerNorm.
FVCORE_NORM_FLOPS_PER_ELEMENT = 5


@dataclass(frozen=True)
class Compute:
    """One forward pass (one image + one box) measured: torch FLOPs and normalised elements."""

    flops: int
    norm_elements: int

    @property
    def macs(self) -> int:
        """Multiply-accumulates: the unit fvcore (and the published tables) call FLOPs."""
        return self.flops // 2

    @property
    def fvcore_style_macs(self) -> int:
        """What fvcore reports for the same model in training mode (see the module docstring)."""
        return self.macs + FVCORE_NORM_FLOPS_PER_ELEMENT * self.norm_elements


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())


def shape_only_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the ``meta`` device: same modules, same
    shapes, no storage.  Counting FLOPs needs only shapes, and on ``meta`` every operator returns at once,
    so a count costs milliseconds instead of a real forward pass (seconds for an encoder on a CPU)."""
    memo: dict[int, object] = {}
    for parameter in model.parameters():
        memo[id(parameter)] = nn.Parameter(torch.empty_like(parameter, device="meta"),
                                           requires_grad=parameter.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(model, memo)


def measure_compute(model: nn.Module, input_size: int) -> Compute:
    """Count FLOPs and BatchNorm/LayerNorm output elements of encoder + prompt encoder + decoder
    for one zero image at ``input_size`` and one box, in one forward pass on a shape-only copy of
    ``model`` (:func:`shape_only_copy`), or on ``model`` itself where an operator of its forward cannot
    run without data (a data-dependent shape)."""
    return _count(model, input_size, encoder_only=False)


def _count(model: nn.Module, input_size: int, encoder_only: bool) -> Compute:
    try:
        return _count_on(shape_only_copy(model), "meta", input_size, encoder_only)
    except (NotImplementedError, RuntimeError):
        device = next(model.parameters()).device
        return _count_on(model, device, input_size, encoder_only)


def _count_on(model: nn.Module, device, input_size: int, encoder_only: bool) -> Compute:
    image = torch.zeros(1, 3, input_size, input_size, device=device)
    norm_elements = 0

    def count(_module, _inputs, output):
        nonlocal norm_elements
        norm_elements += output.numel()

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm))]
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            embedding = model.image_encoder(image)
            if not encoder_only:  # one box, in the prompt encoder's frame
                prompt_size = model.prompt_encoder.input_image_size[0]
                box = torch.tensor([[0.25, 0.25, 0.75, 0.75]]).to(device) * prompt_size
                model.decode_boxes(embedding, box)
    finally:
        for handle in handles:
            handle.remove()
    return Compute(flops=int(counter.get_total_flops()), norm_elements=norm_elements)


def count_flops(model: nn.Module, input_size: int) -> int:
    """torch FLOPs (multiply-add = 2) of encoder + prompt encoder + decoder for one image and one box."""
    return measure_compute(model, input_size).flops


def count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates for one image and one box: the unit fvcore (and the published tables) call FLOPs."""
    return measure_compute(model, input_size).macs


def fvcore_style_macs(model: nn.Module, input_size: int) -> int:
    """Our MACs plus fvcore's training-mode normalisation charge: comparable to published figures."""
    return measure_compute(model, input_size).fvcore_style_macs


def encoder_flops(model: nn.Module, input_size: int) -> int:
    """torch FLOPs (multiply-add = 2) of the image encoder alone for one image at ``input_size``:
    the numerator of the encoder's achieved GFLOP/s (counted as :func:`measure_compute` counts)."""
    return _count(model, input_size, encoder_only=True).flops
