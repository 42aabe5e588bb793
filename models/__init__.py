"""Segmentation models: a name registry, builders and a strict checkpoint loader."""

from .checkpoints import CheckpointError, default_litemedsam_checkpoint, load_weights
from .registry import build_model, list_models, register_model
from .segmenter_module import ModelInfo, PromptableSAM
from . import medficientsam, medsam  # noqa: E402,F401  (registers "medsam", "l0", "l1", "l2")

__all__ = [
    "CheckpointError",
    "ModelInfo",
    "PromptableSAM",
    "build_model",
    "default_litemedsam_checkpoint",
    "list_models",
    "load_weights",
    "register_model",
]
