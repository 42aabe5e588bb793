"""Export: ONNX / OpenVINO executors (:mod:`.backends`, with :mod:`.exporter` and :mod:`.runtimes`) and
graph rewrites such as BatchNorm folding (:mod:`.optimize`)."""
