"""Loading the exported OpenVINO graphs of a box-prompt model (no torch, no exporter).

An export folder (made by the harness's ``--backend openvino``, see the exporter of the ``models`` package: under
``$HARNESS_CACHE_DIR/exports`` or ``~/.cache/medsam-harness/exports/<key>/openvino-<S>px-v<N>-<fp>/``)
holds two OpenVINO IR graphs and a ``manifest.json``:

* ``encoder.xml``/``.bin``  ``image`` (1, 3, S, S) float32 -> ``embedding`` (1, 256, 64, 64);
* ``decoder.xml``/``.bin``  ``embedding`` (1, 256, 64, 64), ``boxes`` (B, 4) float32 in the prompt
  frame -> ``low_res`` (B, 1, 256, 256), ``iou`` (B, 1).

They are compiled for ``"CPU"`` as the harness compiles them: an explicit f32 inference precision
(OpenVINO's CPU plugin otherwise defaults to bf16 on CPUs with AMX / AVX512-BF16), the latency hint
and, when given, a thread count (without one, the latency hint picks the threads; a compiled-model cache
made without one then serves any thread count, whereas a given count is part of the cache's key).  An infer request reuses its output buffers at the next ``infer()``, so
outputs are copied before they are handed out.  After compiling, the resident pages of the memory-mapped
``.bin`` are given back (:func:`release_mapped_pages`): the CPU plugin has repacked the weights into its
own buffers, and without this the resident set counts them twice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["Graphs", "GraphError", "release_mapped_pages", "find_graph_folder"]

EMBEDDING_SHAPE = (1, 256, 64, 64)
# The compiled-model cache's mode: OPTIMIZE_SIZE writes blobs without the weights (OpenVINO >= 2025).
WEIGHTLESS_CACHE = ("CACHE_MODE", "OPTIMIZE_SIZE")


class GraphError(RuntimeError):
    """An export folder that cannot be used, with the file and the problem in the message."""


_MADV_DONTNEED = 4  # linux/mman.h


def release_mapped_pages(path: Path) -> int:
    """Give back this process's resident pages of the read-only mappings of file ``path``; returns the
    bytes of those mappings (0 where there are none, or off Linux).

    OpenVINO maps the IR's ``.bin`` into memory, and its CPU plugin reads every weight once while
    compiling, repacking most of them into its own layouts. The original pages stay resident, so RSS
    counts the weights twice (L0: 117 MB for the encoder). ``madvise(MADV_DONTNEED)`` on a read-only
    mapping only unmaps the pages; they stay in the page cache, and any page read later (weights the
    plugin uses in place: about 25 MB for L0) faults back in from there, unchanged. A writable mapping
    is never touched, since dropping it could lose data."""
    import ctypes

    target = str(Path(path).resolve())
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[5] != target or "w" in parts[1]:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if madvise(start, end - start, _MADV_DONTNEED) == 0:
            released += end - start
    return released


def find_graph_folder(path: str | os.PathLike) -> Path:
    """``path`` itself when it holds ``encoder.xml`` and ``decoder.xml``, else its one subfolder that
    does (an export cache key folder holding a single ``openvino-*`` folder)."""
    path = Path(path)
    if not path.is_dir():
        raise GraphError(f"{path}: no such folder (expected an exported OpenVINO folder with encoder.xml and decoder.xml)")
    if (path / "encoder.xml").is_file() and (path / "decoder.xml").is_file():
        return path
    found = sorted(p.parent for p in path.glob("*/encoder.xml") if (p.parent / "decoder.xml").is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise GraphError(f"{path}: no encoder.xml and decoder.xml here or in a subfolder (an OpenVINO export "
                         "folder made by harness run --backend openvino)")
    raise GraphError(f"{path}: several export folders ({', '.join(p.name for p in found)}); name one")


class _Graph:
    def __init__(self, core, path: Path, threads: Optional[int], cache_dir: Optional[Path]):
        import openvino.properties as props
        import openvino.properties.hint as hints
        from openvino import Type

        config = {
            hints.inference_precision: Type.f32,
            hints.performance_mode: hints.PerformanceMode.LATENCY,
        }
        if threads is not None:
            config[props.inference_num_threads] = int(threads)
        if cache_dir is not None:
            config[props.cache_dir] = str(cache_dir)
            # A weightless blob: the compiled graph without the weights, which are read from the IR's
            # .bin at import (L0: 0.6 MB instead of 137 MB, a second copy of the weights in the image).
            config[WEIGHTLESS_CACHE[0]] = WEIGHTLESS_CACHE[1]
        if not path.with_suffix(".bin").is_file():
            raise GraphError(f"{path.with_suffix('.bin')}: missing (the weights of {path.name})")
        try:
            try:
                self.compiled = core.compile_model(str(path), "CPU", config)
            except RuntimeError as error:
                if WEIGHTLESS_CACHE[0] not in config or WEIGHTLESS_CACHE[0] not in str(error):
                    raise
                del config[WEIGHTLESS_CACHE[0]]  # an OpenVINO without weightless caching: a full blob
                self.compiled = core.compile_model(str(path), "CPU", config)
        except Exception as error:  # openvino raises RuntimeError subclasses with long texts
            raise GraphError(f"{path}: OpenVINO cannot load this graph ({type(error).__name__}: {error})") from error
        self.released_bytes = release_mapped_pages(path.with_suffix(".bin"))
        self.request = self.compiled.create_infer_request()
        self.outputs = list(self.compiled.outputs)
        self.path = path

    def __call__(self, *arrays: np.ndarray) -> list:
        results = self.request.infer(list(arrays))
        # Copies: the request reuses its output buffers at the next infer().
        return [np.array(results[output], dtype=np.float32, copy=True) for output in self.outputs]


class Graphs:
    """The compiled encoder and box decoder of one export folder.

    ``threads``: OpenVINO's inference threads (default None: the latency hint's choice, the physical
    cores; :attr:`threads` then reports what it picked).
    ``cache_dir``: an OpenVINO compiled-model cache folder (``CACHE_DIR``), in its weightless mode
    (``CACHE_MODE=OPTIMIZE_SIZE``: a blob holds the compiled graph, the weights are read from the IR's
    ``.bin``): a blob is imported when one matches (same graph, configuration and CPU), else the graph is
    compiled and the blob written there; where the folder is read-only the write fails quietly and the run
    goes on.  The encoder and the decoder load at once, in two threads.
    """

    def __init__(self, folder: str | os.PathLike, threads: Optional[int] = None,
                 cache_dir: Optional[str | os.PathLike] = None):
        import openvino as ov

        self.folder = find_graph_folder(folder)
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.manifest = read_manifest(self.folder)
        core = ov.Core()
        cache = Path(cache_dir) if cache_dir else None
        # The two graphs compile (or import from the cache) at once: OpenVINO's Core is thread-safe and
        # compile_model releases the GIL, so the decoder's load hides behind the encoder's.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="graph-load") as pool:
            pending = [pool.submit(_Graph, core, self.folder / f"{name}.xml", threads, cache)
                       for name in ("encoder", "decoder")]
            self.encoder, self.decoder = (future.result() for future in pending)
        import openvino.properties as props

        self.threads = int(self.encoder.compiled.get_property(props.inference_num_threads))
        if cache is not None and cache.is_dir():
            # A model imported from the cache maps its blob; as with the IR's .bin, the resident copy is
            # given back, and any page read later faults back in from the page cache.
            for blob in cache.glob("*.blob"):
                release_mapped_pages(blob)
        shape = self.encoder.compiled.inputs[0].get_partial_shape()
        try:
            dims = [int(d.get_length()) for d in shape]
        except Exception as error:  # a dynamic dimension has no length
            raise GraphError(f"{self.encoder.path}: the encoder input must be static (1, 3, S, S), got {shape}") from error
        if len(dims) != 4 or dims[:2] != [1, 3] or dims[2] != dims[3]:
            raise GraphError(f"{self.encoder.path}: the encoder input must be (1, 3, S, S), got {tuple(dims)}")
        self.input_size = dims[2]

    def encode(self, image: np.ndarray) -> np.ndarray:
        """(1, 3, S, S) float32 -> embedding (1, 256, 64, 64) float32."""
        s = self.input_size
        if image.shape != (1, 3, s, s):
            raise ValueError(f"{self.encoder.path}: takes (1, 3, {s}, {s}), got {image.shape}")
        return self.encoder(np.ascontiguousarray(image, dtype=np.float32))[0]

    def decode(self, embedding: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Embedding (1, 256, 64, 64) and (B, 4) boxes in the prompt frame -> low-res logits (B, 1, 256, 256)."""
        if embedding.shape != EMBEDDING_SHAPE:
            raise ValueError(f"{self.decoder.path}: takes a {EMBEDDING_SHAPE} embedding, got {embedding.shape}")
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).astype(np.float32)
        if boxes.shape[0] == 0:
            return np.zeros((0, 1, 256, 256), np.float32)
        return self.decoder(embedding, boxes)[0]


def read_manifest(folder: Path) -> dict:
    """The folder's ``manifest.json`` (empty when absent); an unreadable one is an error naming it."""
    path = folder / "manifest.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise GraphError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(data, dict):
        raise GraphError(f"{path}: the manifest must be a JSON object")
    return data
