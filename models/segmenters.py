"""Glue between a torch model + pipeline preset and the harness's Segmenter protocol."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoints import load_weights
from models.complexity import count_parameters, measure_compute
from models.engine import BoxPromptEngine, PipelineConfig
from models.registry import build_model


class TorchSegmenter:
    """A registered torch model run through the shared :class:`~models.engine.BoxPromptEngine`."""

    def __init__(self, model_name: str, model: torch.nn.Module, config: PipelineConfig, weights: str,
                 path: str | None = None):
        """``path`` (``"faithful"`` / ``"fast"``, see :meth:`PipelineConfig.for_path`) overrides the
        execution path of ``config``; None keeps it."""
        if path is not None:
            config = config.for_path(path)
        info = getattr(model, "info", None)
        if info is not None and info.input_size != config.input_size:
            raise ValueError(f"{model_name} takes {info.input_size}px input but pipeline {config.name} "
                             f"feeds {config.input_size}px")
        self.model_name = model_name
        self.model = model.eval()
        self.config = config
        self.weights = weights
        self.extra: dict[str, Any] = {}  # loader facts for describe(): checkpoint format, completed_with, ...
        self.engine = BoxPromptEngine(self.model, config)

    @classmethod
    def from_checkpoint(cls, model_name: str, path: str | Path, config: PipelineConfig, options=None) -> "TorchSegmenter":
        """Build ``model_name``, load ``path`` (weights_only=True, strict) and wrap it with ``config``."""
        if options is not None and options.threads:
            torch.set_num_threads(options.threads)
        model = build_model(model_name)
        load_weights(model, path, allow_pickle=bool(getattr(options, "allow_pickle", False)))
        device = options.device if options is not None else "cpu"
        return cls(model_name, model.to(device), config, weights=str(path), path=getattr(options, "path", None))

    def segment(self, case) -> np.ndarray:
        return self.engine.segment(case.imgs, case.boxes)

    def describe(self) -> dict[str, Any]:
        compute = measure_compute(self.model, self.config.input_size)
        return {
            "params": count_parameters(self.model),
            "flops": compute.macs,
            "flops_fvcore_style": compute.fvcore_style_macs,
            "weights": self.weights,
            "weights_sha256": _sha256(self.weights),
            "pipeline": self.config.name,
            "path": self.config.path,
            **self.extra,
        }


def _sha256(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
