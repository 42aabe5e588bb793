"""medsam-harness's torch-free runtime: the built-in box-prompt models on exported OpenVINO graphs.

Only numpy, OpenCV (``cv2``) and ``openvino`` are imported: neither torch, nor the ONNX exporter,
nor the harness's ``models`` package. It is what the slim container image runs, and it starts in
well under a second.

* :mod:`runtime.pipelines`  the pipeline presets (input size, prompt frame, resize, postprocess,
  threshold, 3D propagation) of the upstream scripts the harness reproduces, and the 3D z-plan.
* :mod:`runtime.preprocess`  letterbox, min-max, pad, box scaling, propagated boxes and mask
  upscaling/thresholding in numpy and OpenCV.
* :mod:`runtime.graphs`  loading an exported OpenVINO folder (``encoder.xml``, ``decoder.xml``).
* :mod:`runtime.engine`  2D and 3D inference (the harness's fast path: each slice encoded once).
* :mod:`runtime.cases`  reading and checking challenge ``.npz`` cases, writing ``segs``.
* :mod:`runtime.predict`  ``python -m runtime.predict -i INPUTS -o OUTPUTS --graphs DIR``.
"""

__all__ = ["__version__"]

__version__ = "1.0"
