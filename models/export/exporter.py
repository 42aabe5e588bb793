"""Exporting a PromptableSAM-like model to ONNX and converting it to OpenVINO IR, in a child process.

Two graphs are exported with ``torch.onnx.export(..., dynamo=True)`` (the ``torch.export``-based
exporter; it needs the packages ``onnx`` and ``onnxscript``): the image encoder (static batch 1) and
the box decoder (prompt encoder + mask decoder, dynamic box count declared with
``torch.export.Dim``). OpenVINO IR is converted from the ONNX files (``openvino.convert_model``) and
saved with float32 weights. Each job runs in a fresh Python process (:func:`_run_job`), because the
exporter keeps its memory until its process exits. :mod:`models.export.backends` calls
:func:`export_onnx` and :func:`convert_openvino` and caches their output.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from harness.choices import EXPORTER_PACKAGES
from harness.choices import missing as _missing_packages

EMBEDDING_SHAPE = (256, 64, 64)
INSTALL_HINT = "pip install 'medsam-harness[backends]'"


def model_name(model: nn.Module) -> str:
    info = getattr(model, "info", None)
    return getattr(info, "name", None) or type(model).__name__


def _import_exporter() -> None:
    """Fail early, in this process, when the exporter's packages are missing (the export itself runs
    in a child process: :func:`export_onnx`)."""
    missing = _missing_packages(EXPORTER_PACKAGES)
    if missing:
        raise ImportError(f"exporting to ONNX (torch.onnx.export, dynamo exporter) needs {', '.join(missing)}: "
                          f"pip install {' '.join(missing)}, or {INSTALL_HINT}")


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress lines and warnings (they go to stdout / warnings)."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class _BoxDecoder(nn.Module):
    """``PromptableSAM.decode_boxes`` as a module: the decoder graph's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, embedding: torch.Tensor, boxes: torch.Tensor):
        return self.model.decode_boxes(embedding, boxes)


def export_onnx(model: nn.Module, input_size: int, out: Path) -> dict:
    """Export the encoder (batch 1) and the box decoder (dynamic box count) to ``out``, in a child
    process (:func:`_run_job`)."""
    _import_exporter()
    return _run_job("onnx", out, model=model, input_size=input_size)


def convert_openvino(onnx_dir: Path, out: Path) -> dict:
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
        done = subprocess.run([sys.executable, "-c", "import models.export.exporter as e; e._job_main()", str(work)],
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
    name = model_name(model)
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
