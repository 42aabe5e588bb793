"""Containers: the Docker engine connection and the challenge-style images of the segmenters, built offline.

* :mod:`.client`: connecting to a Docker engine (``connect``, ``EngineUnavailable``).
* :mod:`.common`: what the builders share (fixed paths and labels, errors, cache, digests, tag checks).
* :mod:`.base_image`: the Debian base image (mmdebstrap + import).
* :mod:`.wheelhouse`: the runtime dependencies' wheels, downloaded once per requirement set.
* :mod:`.layers`: the deps image (venv with the dependencies) and the runtime image (plus the project).
* :mod:`.model_image`: a model's image (weights, ``predict.sh``, baked exports): ``build_image``.
* :mod:`.slim_image`: a model's slim image: the torch-free ``runtime`` package on its exported OpenVINO
  graphs.
* :mod:`.archives`: ``docker save | gzip`` archives as the challenge exchanges them: ``export_image``,
  ``load_image``.

Each layer is built once and reused while its inputs are unchanged. The per-case container runner is
:mod:`harness.runners.docker`. Nothing here is imported by the native runner; ``docker`` is loaded only
when a container command runs.
"""
