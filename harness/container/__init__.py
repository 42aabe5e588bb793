"""Containers: the Docker engine connection (:mod:`.engine`) and challenge-style images (:mod:`.images`).
The per-case container runner is :mod:`harness.runners.docker`.

Nothing here is imported by the native runner; ``docker`` is loaded only when a container command runs.
"""
