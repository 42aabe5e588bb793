"""A small name -> builder registry for the segmentation models, and the LiteMedSAM builder."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .sam import build_prompt_parts
from .segmenter_module import ModelInfo, PromptableSAM
from .tiny_vit import TinyViT

Builder = Callable[[], nn.Module]

_BUILDERS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering a zero-argument builder under ``name``.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def decorator(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_BUILDERS)


def build_model(name: str) -> nn.Module:
    """Build the registered model ``name`` with random weights, in eval mode.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    try:
        builder = _BUILDERS[name]
    except KeyError:
        known = ", ".join(list_models())
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None
    return builder()


@register_model("litemedsam")
def build_litemedsam() -> PromptableSAM:
    """LiteMedSAM (9,791,300 parameters): TinyViT at 256 px, SAM prompt encoder and decoder.

    Prompt frame 256, embedding (1, 256, 64, 64), low-res masks (B, 1, 256, 256). The
    state_dict keys, shapes and order are those of the released ``lite_medsam.pth``.
    """
    image_encoder = TinyViT(
        img_size=256,
        in_chans=3,
        embed_dims=(64, 128, 160, 320),
        depths=(2, 2, 6, 2),
        num_heads=(2, 4, 5, 10),
        window_sizes=(7, 7, 14, 7),
        mlp_ratio=4.0,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        out_chans=256,
    )
    prompt_encoder, mask_decoder = build_prompt_parts(prompt_size=256, layer_norm_eps=1e-5)
    model = PromptableSAM(
        image_encoder,
        prompt_encoder,
        mask_decoder,
        info=ModelInfo(name="litemedsam", input_size=256, prompt_size=256),
        part_order=("image_encoder", "mask_decoder", "prompt_encoder"),
    )
    return model.eval()
