"""Exported executors for the box-prompt engine: ``--backend onnxruntime`` and ``--backend openvino``.

:func:`compile_backend` turns a :class:`~models.nets.promptable_sam.PromptableSAM` into two graphs,
the **image encoder** ``image`` (1, 3, S, S) float32 -> ``embedding`` (1, 256, 64, 64) (a static
batch of 1: a batch of B images runs as B calls) and the **box decoder** ``embedding``, ``boxes``
(B, 4) in the prompt frame -> ``low_res`` (B, 1, 256, 256), ``iou`` (B, 1) (B dynamic), and returns an
:class:`ExportedSAM` that the engine uses in place of the torch model (same ``image_encoder`` /
``decode_boxes`` interface, torch tensors in and out, always on the CPU). The export runs in a child
process (:mod:`models.export.exporter`); the graphs run in :mod:`models.export.runtimes`. OpenVINO
converts the ONNX export, so the two backends share one export. ``precision="bf16"`` runs the
OpenVINO image encoder in bf16 (the decoder stays f32); onnxruntime has no sound bf16 path for these
graphs and refuses it.

**Cache.**  The exports are made once and kept on disk under ``cache_dir`` (argument) or
``$HARNESS_CACHE_DIR/exports`` or ``~/.cache/medsam-harness/exports``::

    <root>/<cache_key>/onnx-<S>px-v<EXPORT_FORMAT_VERSION>-<fingerprint>/      encoder.onnx, decoder.onnx, manifest.json
    <root>/<cache_key>/openvino-<S>px-v<EXPORT_FORMAT_VERSION>-<fingerprint>/  encoder.xml/.bin, decoder.xml/.bin, manifest.json

``fingerprint`` hashes the model's class names and every state_dict entry (name, dtype, shape,
bytes), so a cache key that does not identify the weights never serves another model's graphs. A
folder is built under a temporary name and renamed into place when complete: a reader sees no folder
or a complete one, and of two processes exporting at once the first rename wins. A second
:func:`compile_backend` with the same key loads the folder (``ExportedSAM.exported`` is False).
``EXPORT_FORMAT_VERSION`` changes whenever what is exported changes.

Why these choices, and what they measured: docs/performance-notes.md (Exported backends).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from harness.choices import AUTO, EXPORT_BACKENDS, missing_packages, resolve_backend
from models.export.exporter import EMBEDDING_SHAPE, INSTALL_HINT, convert_openvino, export_onnx, model_name
from models.export.runtimes import OrtGraph, OvGraph, release_mapped_pages
from models.hardware import cpu_bf16_support
from models.inference.engine import PRECISIONS

__all__ = [
    "AUTO",
    "EXPORT_BACKENDS",
    "EXPORT_FORMAT_VERSION",
    "ExportedSAM",
    "compile_backend",
    "default_cache_dir",
    "model_fingerprint",
    "missing_packages",
    "release_mapped_pages",
    "resolve_backend",
]

# Bump when the exported graphs change (inputs, outputs, exporter settings): old cache folders are
# then left alone and new ones made.
EXPORT_FORMAT_VERSION = 2  # 2: the encoder's batch is static (1)

_STALE_TEMP_SECONDS = 24 * 3600


# ---------------------------------------------------------------------------------------------- API
def default_cache_dir() -> Path:
    """``$HARNESS_CACHE_DIR/exports`` if that variable is set, else ``~/.cache/medsam-harness/exports``."""
    root = os.environ.get("HARNESS_CACHE_DIR")
    base = Path(root).expanduser() if root else Path("~/.cache/medsam-harness").expanduser()
    return base / "exports"


def compile_backend(backend: str, model: nn.Module, input_size: int, precision: str = "fp32", *,
                    cache_key: str, cache_dir: Optional[Path] = None) -> "ExportedSAM":
    """The exported encoder and box decoder of ``model`` run by ``backend``.

    The graphs are exported on the first call for (``cache_key``, model fingerprint, ``input_size``,
    :data:`EXPORT_FORMAT_VERSION`) and loaded from the cache afterwards (see the module docstring).

    Args:
        backend: ``"onnxruntime"`` or ``"openvino"``.
        model: a PromptableSAM-like module (``image_encoder``, ``decode_boxes``, ``info``).
        input_size: side S of the encoder input (the pipeline's letterbox size).
        precision: ``"fp32"``; or ``"bf16"`` with openvino on a CPU with bf16 arithmetic (the
            image encoder in bf16, the decoder in f32).
        cache_key: names the model and its weights (e.g. ``"litemedsam-<sha256 of the weights>"``).
        cache_dir: root of the cache (default :func:`default_cache_dir`).

    Raises:
        ValueError: unknown backend or precision, bf16 with onnxruntime, bf16 on a CPU without it.
        ImportError: the backend's package (or, for a new export, the exporter's) is missing.
        RuntimeError: the export failed, or a cached graph cannot be loaded (naming the file).
    """
    if backend not in EXPORT_BACKENDS:
        hint = " (the torch backend runs the model itself: no export)" if backend == "torch" else ""
        raise ValueError(f"unknown backend {backend!r}{hint}; expected one of {EXPORT_BACKENDS}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
    name = model_name(model)
    if precision == "bf16" and backend == "onnxruntime":
        raise ValueError(f"{name}: precision bf16 is not supported with the onnxruntime backend (its CPU "
                         "execution provider runs these graphs in float32 only); use --precision fp32, "
                         "or --backend openvino / torch for bf16")
    if precision == "bf16" and not cpu_bf16_support():
        raise ValueError(f"{name}: precision bf16 needs a CPU with AMX-BF16 or AVX512-BF16 (not found in "
                         "/proc/cpuinfo flags); use --precision fp32")
    if not isinstance(cache_key, str) or not cache_key:
        raise ValueError(f"{name}: cache_key must be a non-empty string, got {cache_key!r}")
    input_size = int(input_size)
    info = getattr(model, "info", None)
    if info is not None and getattr(info, "input_size", input_size) != input_size:
        raise ValueError(f"{name} takes {info.input_size}px input, not {input_size}px")
    _import_backend(backend)

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key_dir = root / _slug(cache_key)
    fingerprint = model_fingerprint(model)[:16]
    threads = max(1, torch.get_num_threads())

    onnx_dir = key_dir / f"onnx-{input_size}px-v{EXPORT_FORMAT_VERSION}-{fingerprint}"
    exported = False
    if backend == "onnxruntime" or not (key_dir / _ov_name(input_size, fingerprint)).is_dir():
        exported = _ensure_folder(onnx_dir, lambda tmp: export_onnx(model, input_size, tmp), cache_key)
    if backend == "onnxruntime":
        encoder = OrtGraph(onnx_dir / "encoder.onnx", threads)
        decoder = OrtGraph(onnx_dir / "decoder.onnx", threads)
        folder = onnx_dir
    else:
        folder = key_dir / _ov_name(input_size, fingerprint)
        exported = _ensure_folder(folder, lambda tmp: convert_openvino(onnx_dir, tmp), cache_key) or exported
        encoder = OvGraph(folder / "encoder.xml", threads, precision)
        decoder = OvGraph(folder / "decoder.xml", threads, "fp32")
    return ExportedSAM(backend=backend, precision=precision, info=info, name=name, input_size=input_size,
                       folder=folder, exported=exported, threads=threads, encoder=encoder, decoder=decoder)


class ExportedSAM:
    """The engine's model interface over an exported encoder and box decoder (CPU, float32 tensors).

    Attributes: ``backend``, ``precision``, ``info`` (the torch model's), ``folder`` (the cache
    folder the graphs were loaded from), ``exported`` (whether this compile exported or converted
    anything, False when it was all loaded from the cache), ``threads``.
    """

    def __init__(self, *, backend, precision, info, name, input_size, folder, exported, threads, encoder, decoder):
        self.backend = backend
        self.precision = precision
        self.info = info
        self.name = name
        self.input_size = input_size
        self.folder = Path(folder)
        self.exported = bool(exported)
        self.threads = threads
        self._encoder = encoder
        self._decoder = decoder

    def __repr__(self) -> str:
        return f"ExportedSAM({self.name}, backend={self.backend}, precision={self.precision}, folder={self.folder})"

    def image_encoder(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float32 -> (B, 256, 64, 64) float32 (one graph call per image)."""
        s = self.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s) or x.shape[0] < 1:
            raise ValueError(f"{self.name} ({self.backend}) image encoder takes (B, 3, {s}, {s}), got {tuple(x.shape)}")
        images = _to_numpy(x)
        embeddings = [self._encoder(images[i : i + 1])[0] for i in range(images.shape[0])]
        return torch.from_numpy(embeddings[0] if len(embeddings) == 1 else np.concatenate(embeddings))

    def decode_boxes(self, image_embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 256, 64, 64) embedding and (B, 4) xyxy boxes in the prompt frame -> low-res logits
        (B, 1, 256, 256) and IoU predictions (B, 1)."""
        if tuple(image_embedding.shape) != (1, *EMBEDDING_SHAPE):
            raise ValueError(f"{self.name} ({self.backend}) decoder takes a (1, 256, 64, 64) embedding, "
                             f"got {tuple(image_embedding.shape)}")
        boxes = boxes.reshape(-1, 4)
        if boxes.shape[0] == 0:
            return torch.zeros(0, 1, 256, 256), torch.zeros(0, 1)
        low_res, iou = self._decoder(_to_numpy(image_embedding), _to_numpy(boxes))
        return torch.from_numpy(low_res), torch.from_numpy(iou)


def model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's module classes and of every state_dict entry (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    h.update(" ".join(f"{n}:{type(m).__qualname__}" for n, m in model.named_modules()).encode())
    for key, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"|{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the bytes, without a copy
    return h.hexdigest()


def _slug(key: str) -> str:
    """A file-name-safe folder name for ``key``; a short hash of the key keeps altered keys distinct."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "model"
    if safe != key or len(safe) > 120:
        safe = f"{safe[:100]}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return safe


def _ov_name(input_size: int, fingerprint: str) -> str:
    return f"openvino-{input_size}px-v{EXPORT_FORMAT_VERSION}-{fingerprint}"


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())


def _import_backend(backend: str) -> None:
    try:
        __import__(backend)
    except ImportError as error:
        raise ImportError(f"backend {backend!r} needs the package {backend} ({error}): pip install {backend}, "
                          f"or {INSTALL_HINT}") from error


def _manifest_ok(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        return all((folder / f).is_file() for f in manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _ensure_folder(folder: Path, build: Callable[[Path], dict], cache_key: str) -> bool:
    """Make ``folder`` if it does not exist (build into a temporary folder, then rename); True if
    this call built it.  ``build(tmp)`` writes the files and returns the manifest's facts."""
    if folder.is_dir():
        if not _manifest_ok(folder):
            raise RuntimeError(f"{folder}: the cached export is incomplete (missing manifest.json or a file it "
                               "lists); delete the folder to export again")
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(folder.parent)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        start = time.perf_counter()
        facts = build(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"cache_key": cache_key, "export_format_version": EXPORT_FORMAT_VERSION,
                    "seconds": round(time.perf_counter() - start, 3), "torch": torch.__version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files, **facts}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _manifest_ok(folder):  # not another process's complete folder
                raise
            return False  # another process published the same export first: use that one
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _sweep_stale(parent: Path) -> None:
    """Remove temporary folders that killed exporters left behind (older than a day)."""
    now = time.time()
    for tmp in parent.glob(".*.tmp"):
        try:
            if tmp.is_dir() and now - tmp.stat().st_mtime > _STALE_TEMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
