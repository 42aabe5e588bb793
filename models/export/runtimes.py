"""Running exported graphs on the CPU: an onnxruntime session (:class:`OrtGraph`) or a compiled OpenVINO
model (:class:`OvGraph`), each called with numpy arrays and returning arrays the caller owns.

onnxruntime runs on the CPU execution provider with ``intra_op_num_threads`` = the given threads and
sequential execution. OpenVINO compiles for ``"CPU"`` with ``INFERENCE_NUM_THREADS``, the latency hint
and an explicit ``INFERENCE_PRECISION_HINT`` (its CPU plugin would otherwise default to bf16 on CPUs
with AMX / AVX512-BF16); it reuses its output buffers, so every output is copied. After compiling, the
resident pages of the IR's memory-mapped ``.bin`` are given back
(:func:`runtime.graphs.release_mapped_pages`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.graphs import release_mapped_pages  # the torch-free runtime's; shared, not copied


class OrtGraph:
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


_OV_CORE = None


class OvGraph:
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
