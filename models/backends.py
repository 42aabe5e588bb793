"""Exported executors for the box-prompt engine: ``--backend onnxruntime`` and ``--backend openvino``.

:func:`compile_backend` turns a :class:`~models.segmenter_module.PromptableSAM` into two graphs,

* the **image encoder** ``image`` (1, 3, S, S) float32 -> ``embedding`` (1, 256, 64, 64), a static
  shape: a batch of B images (the fast path's ``encoder_batch``) runs as B calls.  A static batch of 1 is
  what the CPU runs fastest (OpenVINO plans its kernels for the exact shape: 10-25% faster than a dynamic
  batch here), and it is the one shape every encoder exports (ViT-B's exported graph keeps the example's
  batch), and
* the **box decoder** (prompt encoder + mask decoder for box prompts, single mask, as
  :meth:`PromptableSAM.decode_boxes`) ``embedding`` (1, 256, 64, 64), ``boxes`` (B, 4) float32 in the
  prompt frame -> ``low_res`` (B, 1, 256, 256), ``iou`` (B, 1), B dynamic,

and returns an :class:`ExportedSAM` that the engine uses in place of the torch model (same
``image_encoder`` / ``decode_boxes`` interface, torch tensors in and out, always on the CPU).

**Exporter.**  The graphs are exported with ``torch.onnx.export(..., dynamo=True)``: the
``torch.export``-based exporter, the default and recommended one since torch 2.9.  It needs the
packages ``onnx`` and ``onnxscript``.  The TorchScript exporter (``dynamo=False``) still exists in
torch 2.13 but warns that it is deprecated, so it is not used.  The decoder's dynamic box count is
declared with ``torch.export.Dim``.  The default opset of the exporter is kept and recorded in the
manifest.  The export and the conversion to IR run in a child Python process (:func:`_run_job`): the
exporter keeps its memory (285 MB for L0) until the process exits, and the harness's process, which
then runs every case, should not carry that.

**OpenVINO** converts the exported ONNX graphs (``openvino.convert_model`` on the ``.onnx`` file) and
saves them as IR (``openvino.save_model``, ``compress_to_fp16=False``: the weights stay float32).
Converting from the ONNX file takes about a second, whereas ``convert_model`` on the torch module
traces it with TorchScript again (about 30 s for LiteMedSAM's encoder).  The two backends therefore
share one export.  The IR is compiled for ``"CPU"`` with ``INFERENCE_NUM_THREADS`` =
``torch.get_num_threads()``, the latency hint, and an explicit ``INFERENCE_PRECISION_HINT``: f32
for ``precision="fp32"``.  This matters because OpenVINO's CPU plugin *defaults* to bf16 on CPUs
with AMX / AVX512-BF16.  ``precision="bf16"`` sets bf16 for the image encoder only, like the torch
path's encoder autocast, and the decoder stays f32.  OpenVINO hands out its output buffers for
reuse (a later ``infer()`` overwrites an earlier result, as medficientsam's C++ runtime,
``cpp/src/main.cpp``, found with its embedding cache), so every output is copied
before it is returned.  After compiling, the resident pages of the IR's memory-mapped ``.bin`` are
given back (:func:`release_mapped_pages`): the CPU plugin has repacked the weights into its own
buffers, and without this RSS counts them twice (L0: +117 MB, which put the fast path 28% above the
faithful path's peak).

**onnxruntime** runs the ONNX graphs on the CPU execution provider with ``intra_op_num_threads`` =
``torch.get_num_threads()`` and sequential execution.  It has no sound bf16 path for these graphs:
its CPU execution provider lacks bf16 kernels for most of their operators, so a bf16 graph would run
as casts around float32 kernels.  So ``precision="bf16"`` with onnxruntime raises ValueError.

**Cache.**  The exports are made once and kept on disk under
``cache_dir`` (argument) or ``$HARNESS_CACHE_DIR/exports`` or ``~/.cache/medsam-harness/exports``::

    <root>/<cache_key>/onnx-<S>px-v<EXPORT_FORMAT_VERSION>-<fingerprint>/      encoder.onnx, decoder.onnx, manifest.json
    <root>/<cache_key>/openvino-<S>px-v<EXPORT_FORMAT_VERSION>-<fingerprint>/  encoder.xml/.bin, decoder.xml/.bin, manifest.json

``fingerprint`` is a hash of the model's class names and of every state_dict entry: name, dtype,
shape and bytes.  A cache key that does not identify the weights (the segmenter falls back to the
weights *path* when that is not a file) therefore never serves another model's graphs.  A folder is
built under a temporary name beside its final name and renamed into place when complete, so a
reader sees either no folder or a complete one.  Two processes that export at the same time both
build it, the first rename wins, and the other process uses the folder that won.  A second
:func:`compile_backend` with the same key loads the folder and does not export
(``ExportedSAM.exported`` is False).  ``EXPORT_FORMAT_VERSION`` changes whenever what is exported
changes.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from harness.choices import AUTO, EXPORT_BACKENDS, EXPORTER_PACKAGES, missing_packages, resolve_backend
from harness.choices import missing as _missing_packages
from models.engine import PRECISIONS, cpu_bf16_support

__all__ = [
    "AUTO",
    "BACKENDS",
    "EXPORT_FORMAT_VERSION",
    "ExportedSAM",
    "compile_backend",
    "default_cache_dir",
    "model_fingerprint",
    "missing_packages",
    "resolve_backend",
]

# The vocabulary (which backends exist, what each needs installed, what ``auto`` picks) is torch-free
# and lives in harness.choices; the harness resolves ``auto`` there without importing this module.
BACKENDS = EXPORT_BACKENDS

# Bump when the exported graphs change (inputs, outputs, exporter settings): old cache folders are
# then left alone and new ones made.
EXPORT_FORMAT_VERSION = 2  # 2: the encoder's batch is static (1)

EMBEDDING_SHAPE = (256, 64, 64)
_INSTALL_HINT = "pip install 'medsam-harness[backends]'"
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
    if backend not in BACKENDS:
        hint = " (the torch backend runs the model itself: no export)" if backend == "torch" else ""
        raise ValueError(f"unknown backend {backend!r}{hint}; expected one of {BACKENDS}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {PRECISIONS}")
    name = _model_name(model)
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
        exported = _ensure_folder(onnx_dir, lambda tmp: _export_onnx(model, input_size, tmp), cache_key)
    if backend == "onnxruntime":
        encoder = _OrtGraph(onnx_dir / "encoder.onnx", threads)
        decoder = _OrtGraph(onnx_dir / "decoder.onnx", threads)
        folder = onnx_dir
    else:
        folder = key_dir / _ov_name(input_size, fingerprint)
        exported = _ensure_folder(folder, lambda tmp: _convert_openvino(onnx_dir, tmp), cache_key) or exported
        encoder = _OvGraph(folder / "encoder.xml", threads, precision)
        decoder = _OvGraph(folder / "decoder.xml", threads, "fp32")
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


# ------------------------------------------------------------------------------------------ helpers
def _model_name(model: nn.Module) -> str:
    info = getattr(model, "info", None)
    return getattr(info, "name", None) or type(model).__name__


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
                          f"or {_INSTALL_HINT}") from error


def _import_exporter() -> None:
    """Fail early, in this process, when the exporter's packages are missing (the export itself runs
    in a child process: :func:`_export_onnx`)."""
    missing = _missing_packages(EXPORTER_PACKAGES)
    if missing:
        raise ImportError(f"exporting to ONNX (torch.onnx.export, dynamo exporter) needs {', '.join(missing)}: "
                          f"pip install {' '.join(missing)}, or {_INSTALL_HINT}")


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


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress lines and warnings (they go to stdout / warnings)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ------------------------------------------------------------------------------------------ export
class _BoxDecoder(nn.Module):
    """``PromptableSAM.decode_boxes`` as a module: the decoder graph's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor):
        return self.model.decode_boxes(embedding, boxes)


def _export_onnx(model: nn.Module, input_size: int, out: Path) -> dict:
    """Export the encoder (batch 1) and the box decoder (dynamic box count) to ``out``, in a child
    process (:func:`_run_job`)."""
    _import_exporter()
    return _run_job("onnx", out, model=model, input_size=input_size)


def _convert_openvino(onnx_dir: Path, out: Path) -> dict:
    """Convert the ONNX graphs of ``onnx_dir`` to OpenVINO IR (float32 weights) in ``out``, in a
    child process (:func:`_run_job`)."""
    return _run_job("openvino", out, onnx_dir=str(onnx_dir))


def _run_job(job: str, out: Path, **request) -> dict:
    """Run an export job in a fresh Python process and return its manifest facts.

    The exporter does not give its memory back: onnxscript's rewrite rules keep the last graph they
    matched, with the model's weights, in module globals, and the allocator keeps the rest. Exporting
    L0 in the harness's own process left it 285 MB larger for the whole run, and MedSAM's first run
    peaked 65% above the faithful path. A child process returns all of it when it exits. The model
    goes to the child as a pickle (``torch.save``) in a temporary folder beside ``out``; a model
    that cannot be pickled (a class defined inside a function) or that the child cannot unpickle (a
    class of the parent's ``__main__`` script) is exported in this process instead.
    The child sees this process's ``sys.path`` and thread count; its error, or the tail of its
    stderr when it dies, is raised here as RuntimeError."""
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=".job-", suffix=".tmp"))  # swept if left behind
    try:
        request = {"job": job, "out": str(out), "threads": torch.get_num_threads(), **request}
        try:
            torch.save(request, work / "request.pt")
        except (pickle.PicklingError, AttributeError, TypeError):
            return _do_job(request)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        done = subprocess.run([sys.executable, "-c", "import models.backends as b; b._job_main()", str(work)],
                              env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, errors="replace")
        result = work / "result.json"
        if not result.is_file():
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"the {job} export process exited with status {done.returncode} and no result:\n{tail}")
        answer = json.loads(result.read_text())
        if "unloadable" in answer:  # the child cannot import the model's class (the parent's __main__)
            return _do_job(request)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer["facts"]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _job_main() -> None:
    """Entry of the child process of :func:`_run_job`: ``argv[1]`` is its work folder."""
    work = Path(sys.argv[1])
    try:
        request = torch.load(work / "request.pt", weights_only=False)  # written by our parent a moment ago
    except Exception as error:  # noqa: BLE001 - e.g. a class of the parent's __main__: it exports instead
        answer = {"unloadable": f"{type(error).__name__}: {error}"}
    else:
        torch.set_num_threads(max(1, int(request["threads"])))
        try:
            answer = {"facts": _do_job(request)}
        except Exception as error:  # noqa: BLE001 - the parent raises it
            answer = {"error": str(error) if isinstance(error, RuntimeError) else f"{type(error).__name__}: {error}"}
    (work / "result.json").write_text(json.dumps(answer))


def _do_job(request: dict) -> dict:
    out = Path(request["out"])
    if request["job"] == "onnx":
        return _export_onnx_here(request["model"], int(request["input_size"]), out)
    return _convert_openvino_here(Path(request["onnx_dir"]), out)


def _export_onnx_here(model: nn.Module, input_size: int, out: Path) -> dict:
    """Export the encoder (batch 1) and the box decoder (dynamic box count) to ``out`` in this process."""
    name = _model_name(model)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    info = getattr(model, "info", None)
    prompt = float(getattr(info, "prompt_size", input_size))
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, input_size, input_size, generator=gen).to(device)
    embedding = torch.randn(1, *EMBEDDING_SHAPE, generator=gen).to(device)
    boxes = (torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.25, 0.9, 0.8]]) * prompt).to(device)
    graphs = (
        ("encoder", model.image_encoder, (image,), ["image"], ["embedding"], None),
        ("decoder", _BoxDecoder(model), (embedding, boxes), ["embedding", "boxes"], ["low_res", "iou"],
         (None, {0: torch.export.Dim("boxes", min=1, max=65536)})),
    )
    was_training = model.training
    model.eval()
    opset = None
    try:
        for part, module, args, inputs, outputs, dynamic in graphs:
            try:
                with torch.inference_mode(False), torch.no_grad(), _quiet():
                    program = torch.onnx.export(module, args, None, dynamo=True, input_names=inputs,
                                                output_names=outputs, dynamic_shapes=dynamic,
                                                external_data=False, verbose=False)
                    program.save(str(out / f"{part}.onnx"), external_data=False)
                opset = program.model.opset_imports.get("", opset)
            except Exception as error:  # the exporter raises many kinds; name the model and the part
                raise RuntimeError(f"{name}: exporting the {part} to ONNX failed: {type(error).__name__}: {error}") from error
    finally:
        model.train(was_training)
    import onnx

    return {"format": "onnx", "model": name, "input_size": input_size, "exporter": "torch.onnx.export(dynamo=True)",
            "opset": opset, "onnx": onnx.__version__}


def _convert_openvino_here(onnx_dir: Path, out: Path) -> dict:
    """Convert the ONNX graphs of ``onnx_dir`` to OpenVINO IR (float32 weights) in ``out`` in this process."""
    import openvino as ov

    for part in ("encoder", "decoder"):
        source = onnx_dir / f"{part}.onnx"
        try:
            converted = ov.convert_model(str(source))
            ov.save_model(converted, str(out / f"{part}.xml"), compress_to_fp16=False)
        except Exception as error:
            raise RuntimeError(f"{source}: converting to OpenVINO IR failed: {type(error).__name__}: {error}") from error
    return {"format": "openvino-ir", "source": onnx_dir.name, "openvino": ov.__version__}


# ------------------------------------------------------------------------------------------ runtimes
class _OrtGraph:
    """One onnxruntime session on the CPU execution provider; call with numpy inputs in order."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:
            raise RuntimeError(f"{path}: onnxruntime cannot load the cached graph ({error}); delete "
                               f"{path.parent} to export it again") from error
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.path = path

    def __call__(self, *arrays: np.ndarray) -> list:
        return self.session.run(None, dict(zip(self.inputs, arrays)))  # fresh arrays, owned by the caller


_MADV_DONTNEED = 4  # linux/mman.h


def release_mapped_pages(path: Path) -> int:
    """Give back this process's resident pages of the read-only mappings of file ``path``; returns
    the bytes of those mappings (0 where there are none, or off Linux).

    OpenVINO maps the IR's ``.bin`` into memory, and its CPU plugin reads every weight once while
    compiling, repacking most of them into its own layouts. The original pages stay resident, so
    RSS counts the weights twice (L0: 117 MB for the encoder). ``madvise(MADV_DONTNEED)`` on a
    read-only mapping only unmaps the pages; they stay in the page cache, and any page read later
    (weights the plugin uses in place: about 25 MB for L0) faults back in from there, unchanged. A
    writable mapping is never touched, since dropping it could lose data."""
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
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[5] != target or "w" in fields[1]:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if madvise(start, end - start, _MADV_DONTNEED) == 0:
            released += end - start
    return released


_OV_CORE = None


class _OvGraph:
    """One compiled OpenVINO model on "CPU" with explicit threads and inference precision."""

    def __init__(self, path: Path, threads: int, precision: str):
        global _OV_CORE
        import openvino as ov
        import openvino.properties as props
        import openvino.properties.hint as hints

        if _OV_CORE is None:
            _OV_CORE = ov.Core()
        self.precision_type = ov.Type.bf16 if precision == "bf16" else ov.Type.f32
        config = {
            props.inference_num_threads: threads,
            hints.inference_precision: self.precision_type,
            hints.performance_mode: hints.PerformanceMode.LATENCY,
        }
        try:
            self.compiled = _OV_CORE.compile_model(_OV_CORE.read_model(str(path)), "CPU", config)
        except Exception as error:
            raise RuntimeError(f"{path}: OpenVINO cannot load the cached graph ({error}); delete "
                               f"{path.parent} to export it again") from error
        self.released_bytes = release_mapped_pages(path.with_suffix(".bin"))
        self.request = self.compiled.create_infer_request()
        self.path = path

    def property(self, name):
        return self.compiled.get_property(name)

    def __call__(self, *arrays: np.ndarray) -> list:
        results = self.request.infer(list(arrays))
        # Copies: the request reuses its output buffers at the next infer().
        return [np.array(results[output], dtype=np.float32, copy=True) for output in self.compiled.outputs]
