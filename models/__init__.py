"""Segmentation models, in layers:

* :mod:`models.nets`: the networks, pure ``nn.Module`` s (SAM prompt encoder and mask decoder, TinyViT,
  EfficientViT, ViT, and :class:`~models.nets.promptable_sam.PromptableSAM` that joins them);
* :mod:`models.builders`: the built-in models by name (:data:`~models.builders.MODELS`);
* :mod:`models.weights`: checkpoint formats and the weights lookup that loads each built-in model;
* :mod:`models.inference`: pipeline presets, preprocessing, the box-prompt engine and its slice cache,
  and the segmenter that wraps a model for the harness;
* :mod:`models.export`: ONNX / OpenVINO export and runtimes, BatchNorm folding;
* :mod:`models.complexity` (parameters, FLOPs) and :mod:`models.hardware` (CPU features).
"""

from models.builders import MODELS, build_model, list_models
from models.nets.promptable_sam import ModelInfo, PromptableSAM
from models.weights.checkpoints import CheckpointError, default_litemedsam_checkpoint, load_weights

__all__ = [
    "CheckpointError",
    "MODELS",
    "ModelInfo",
    "PromptableSAM",
    "build_model",
    "default_litemedsam_checkpoint",
    "list_models",
    "load_weights",
]
