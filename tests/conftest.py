"""Shared fixtures. Helpers for the reference folder live in ``reference.py``, for the CLI in ``helpers.py``."""
from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="module")
def two_threads():
    """Run a module's tests with 2 torch threads, the setting the reference vectors were made with."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def export_cache_dir(tmp_path_factory):
    """A ``HARNESS_CACHE_DIR`` for the exported graphs (``<dir>/exports``) of the seed-0 reference models,
    shared by the modules that export them (test_backends, test_zoo_e2e): each model is exported once
    per session (same cache key and weights fingerprint), into a temporary folder."""
    return tmp_path_factory.mktemp("harness-cache")


@pytest.fixture(scope="session")
def docker_client():
    """A ``docker.DockerClient`` whose engine answered (``harness.container.client.connect``).

    Without an engine the test is skipped with the reason, unless ``HARNESS_REQUIRE_DOCKER=1`` (set by
    ``.ci/run``, which starts one): then it fails.
    """
    from harness.container.client import EngineUnavailable, connect

    try:
        client = connect()
    except EngineUnavailable as exc:
        if os.environ.get("HARNESS_REQUIRE_DOCKER") == "1":
            pytest.fail(f"HARNESS_REQUIRE_DOCKER=1 but {exc}", pytrace=False)
        pytest.skip(f"no Docker engine: {exc}")
    yield client
    client.close()
