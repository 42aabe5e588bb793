"""Model size and compute: parameter counts and FLOPs for one image plus one box.

FLOPs are counted with :mod:`torch.utils.flop_counter` over the image encoder, the prompt encoder
and the mask decoder, for one image at the model's input size and one box. torch counts a
multiply-add as 2 FLOPs; the published figures (fvcore, e.g. LiteMedSAM 39.98G) count it as 1, so
:func:`count_macs` halves torch's count to be comparable with them.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers such as BatchNorm statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_size: int) -> int:
    """torch FLOPs (multiply-add = 2) of encoder + prompt encoder + decoder for one image and one box."""
    device = next(model.parameters()).device
    image = torch.zeros(1, 3, input_size, input_size, device=device)
    prompt_size = model.prompt_encoder.input_image_size[0]
    box = torch.tensor([[0.25, 0.25, 0.75, 0.75]], device=device) * prompt_size
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.decode_boxes(model.image_encoder(image), box)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates for one image and one box: the unit fvcore (and the published tables) call FLOPs."""
    return count_flops(model, input_size) // 2
