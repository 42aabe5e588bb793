"""Glue between a torch model + pipeline preset and the harness's Segmenter protocol."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.complexity import count_parameters, measure_compute
from models.export.optimize import fold_batchnorm, to_channels_last
from models.inference.engine import BoxPromptEngine
from models.inference.pipelines import PipelineConfig
from models.weights.checkpoints import Checkpoint, check_state


class TorchSegmenter:
    """A registered torch model run through the shared :class:`~models.inference.engine.BoxPromptEngine`."""

    def __init__(self, model_name: str, model: torch.nn.Module, config: PipelineConfig, weights: str,
                 path: str | None = None, precision: str = "fp32", backend: str = "torch"):
        """``path`` (``"faithful"`` / ``"fast"``, see :meth:`PipelineConfig.for_path`) overrides the
        execution path of ``config``; None keeps it.  ``precision`` (``"fp32"`` / ``"bf16"``) is the
        image encoder's arithmetic (see :class:`~models.inference.engine.BoxPromptEngine`); ``backend``
        (``"torch"`` / ``"onnxruntime"`` / ``"openvino"``, or ``"auto"``: see
        :func:`harness.choices.resolve_backend`) what executes the encoder and decoder: another
        backend runs graphs exported from ``model`` (:mod:`models.export.backends`), cached by the weights
        file's hash.  When ``"auto"`` picked openvino and the export or compile fails, the segmenter
        warns and runs on torch (``describe()["backend_fallback"]`` says why); an explicitly named
        backend that fails raises.  The segmenter owns ``model``: on the fast torch path it is
        rewritten in place (BatchNorm folded into convs, :mod:`models.export.optimize`); on an export
        backend its weights are released once exported (the module is moved to the ``meta`` device:
        the graphs hold the weights, and a second copy would cost memory), and :meth:`describe`
        still counts its parameters and FLOPs.  Pass a copy to keep the original."""
        from harness.choices import resolve_backend

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
        self.precision = precision
        try:
            device = next(self.model.parameters()).device.type
        except StopIteration:
            device = "cpu"
        self.backend = resolve_backend(backend, config.path, device)
        self._facts: tuple | None = None  # (params, Compute) of the model as loaded, for describe()
        executor = self.model
        if self.backend != "torch":
            from models.export.backends import compile_backend

            try:
                executor = compile_backend(self.backend, self.model, config.input_size, precision=precision,
                                           cache_key=f"{model_name}-{file_sha256(weights) or weights}")
            except Exception as error:  # noqa: BLE001 - "auto" falls back; a named backend must not
                if backend != "auto":
                    raise
                reason = f"{self.backend}: {type(error).__name__}: {error}"
                warnings.warn(f"{model_name}: the {self.backend} backend is unavailable ({reason}); "
                              "running on torch", RuntimeWarning, stacklevel=2)
                self.extra["backend_fallback"] = reason
                self.backend, executor = "torch", self.model
            else:
                point_decoder = _point_decoder(self.model)  # the exported decoder takes boxes only
                self.model.to("meta")  # shapes without storage: enough to count parameters and FLOPs
        has_batchnorm = any(isinstance(m, torch.nn.BatchNorm2d) for m in self.model.modules())
        if config.fast and self.backend == "torch" and ((config.fold_batchnorm and has_batchnorm) or config.channels_last):
            self._facts = (count_parameters(self.model), measure_compute(self.model, config.input_size))
            if config.fold_batchnorm:
                fold_batchnorm(self.model)
            if config.channels_last:
                to_channels_last(self.model)
        self.engine = BoxPromptEngine(executor, config, precision=precision if self.backend == "torch" else "fp32",
                                      device=None if self.backend == "torch" else "cpu")
        if self.backend != "torch":
            self.engine.point_decoder = point_decoder

    @classmethod
    def from_state(cls, name: str, model: torch.nn.Module, checkpoint: Checkpoint, config: PipelineConfig,
                   options=None, what: str | None = None) -> "TorchSegmenter":
        """Load ``checkpoint`` into ``model`` strictly (a mismatch raises CheckpointError naming the
        file and ``what`` the model is, default ``name``), pin the threads and device of ``options``
        and wrap the model with ``config`` on the execution path ``options.path``."""
        check_state(model, checkpoint, model_name=what or name)
        model.load_state_dict(checkpoint.state, strict=True)
        if options is not None and getattr(options, "threads", None):
            torch.set_num_threads(options.threads)
        device = getattr(options, "device", None) or "cpu"
        segmenter = cls(name, model.to(device), config, weights=str(checkpoint.path),
                        path=getattr(options, "path", None),
                        precision=getattr(options, "precision", "fp32"),
                        backend=getattr(options, "backend", "torch"))
        segmenter.extra["checkpoint_format"] = checkpoint.format
        return segmenter

    #: What :meth:`segment` uses of a case (:attr:`harness.plugin_api.SegmenterSpec.prompts`): the boxes, the
    #: interactive protocol's clicks and the previous step's segmentation.
    prompts = frozenset({"box", "points", "mask"})

    def segment(self, case) -> np.ndarray:
        """The case's segs: box-prompted (:meth:`BoxPromptEngine.segment`), or, when ``case.clicks`` holds
        clicks, corrected by them (:meth:`BoxPromptEngine.segment_with_clicks`, 3D: the clicked slice is
        decoded again with its box and clicks, and propagation resumes from it; ``case.prev_segs`` is the
        prediction the other labels keep). On an export backend (onnxruntime, openvino) the exported
        decoder takes boxes only: point prompts are decoded by a torch copy of the model's prompt
        encoder and mask decoder, kept at load (the image embeddings still come from the backend)."""
        clicks = getattr(case, "clicks", None)
        if clicks:
            return self.engine.segment_with_clicks(case.imgs, case.boxes, clicks, getattr(case, "prev_segs", None))
        return self.engine.segment(case.imgs, case.boxes)

    def describe(self) -> dict[str, Any]:
        """Facts of the model as loaded (counted before any fast-path rewrite such as BatchNorm folding;
        counted once: a FLOP count traces the model, 0.5-1.4 s)."""
        if self._facts is None:
            self._facts = (count_parameters(self.model), measure_compute(self.model, self.config.input_size))
        params, compute = self._facts
        return {
            "params": params,
            "flops": compute.macs,
            "flops_fvcore_style": compute.fvcore_style_macs,
            "weights": self.weights,
            "weights_sha256": file_sha256(self.weights),
            "pipeline": self.config.name,
            "path": self.config.path,
            "precision": self.precision,
            "backend": self.backend,
            **({"export": str(self.engine.model.folder)} if self.backend != "torch" else {}),
            **self.extra,
        }


def _point_decoder(model: torch.nn.Module) -> torch.nn.Module | None:
    """A torch copy of ``model``'s prompt encoder and mask decoder (a few MB), for point prompts on an
    export backend; None for a model without them."""
    import copy

    from models.nets.promptable_sam import PromptDecoder

    encoder, decoder = getattr(model, "prompt_encoder", None), getattr(model, "mask_decoder", None)
    if encoder is None or decoder is None:
        return None
    return PromptDecoder(copy.deepcopy(encoder), copy.deepcopy(decoder)).eval()


def file_sha256(path: str | Path) -> str | None:
    """Hex sha256 of a file's bytes; None when there is no such file."""
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
