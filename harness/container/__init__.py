"""Containers: the Docker engine connection (:mod:`.engine`), challenge-style images (:mod:`.images`)
and the per-case container runner lives in :mod:`harness.external`.

Nothing here is imported by the native runner; ``docker`` is loaded only when a container command runs.
"""
